//! `x · Wᵀ` for the model's linear layers: our GEMV (`gemv.cu`) when a step has few tokens (decode:
//! reading the weights at full bandwidth is all that matters), cuBLAS through candle otherwise.

use candle_core::Tensor;

use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::{Result, WorkerError};

/// Most token rows the GEMV kernel takes (`gemv_*_m1` .. `gemv_*_m8`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per block; must match `WARPS` in gemv.cu.
const WARPS: usize = 8;
/// From this many output features on, one token row takes `gemv_*_m1_wide` (two features per
/// warp; see gemv.cu).
pub const GEMV_WIDE_N: usize = 16384;
/// Up to this many output features, one token row takes `gemv_*_m1_split` (two features per
/// pair of warps, each over half of k).
pub const GEMV_SPLIT_MAX_N: usize = 4096;

/// The kernel shape for `m` token rows and `n` outputs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    /// `gemv_*_m{m}`: `Shape<M>::R` features per warp.
    Rows(usize),
    Wide,
    Split,
}

impl Variant {
    fn of(m: usize, n: usize) -> Variant {
        match m {
            1 if n >= GEMV_WIDE_N => Variant::Wide,
            1 if n <= GEMV_SPLIT_MAX_N => Variant::Split,
            m => Variant::Rows(m),
        }
    }

    /// Output features per block of WARPS warps.
    fn features_per_block(self) -> usize {
        let per_warp = match self {
            Variant::Wide => 2,
            Variant::Split => 1, // two features per two warps
            Variant::Rows(1) => 1,
            Variant::Rows(2 | 3) => 2,
            Variant::Rows(_) => 4,
        };
        WARPS * per_warp
    }
}

impl CudaKernels {
    /// `x · Wᵀ` with `x` `[m, k]` and `W` `[n, k]` (a linear layer's Hugging Face layout):
    /// `[m, n]`, accumulated in f32.
    pub fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let dims = |t: &Tensor| t.dims2().map_err(|e| WorkerError::Engine(format!("cuda linear: {e}")));
        let ((m, k), (n, w_k)) = (dims(x)?, dims(w)?);
        if k != w_k {
            return Err(WorkerError::Engine(format!("cuda linear: x {:?} against W {:?}", x.dims(), w.dims())));
        }
        let per_vector = 16 / self.dtype.size_in_bytes();
        let fits = (1..=GEMV_MAX_ROWS).contains(&m)
            && k % per_vector == 0
            && x.dtype() == self.dtype
            && w.dtype() == self.dtype
            && x.is_contiguous()
            && w.is_contiguous()
            && device_ptr(x)? % 16 == 0
            && device_ptr(w)? % 16 == 0;
        if !fits {
            return w.t().and_then(|wt| x.matmul(&wt)).map_err(|e| gpu_error("matmul", e));
        }
        let y = self.alloc((m, n))?;
        // SAFETY: W holds n rows of k, x m rows of k, y m rows of n, all 16-byte aligned with k a
        // whole number of 16-byte vectors (checked above).
        let variant = Variant::of(m, n);
        let func = match variant {
            Variant::Wide => &self.gemv_wide,
            Variant::Split => &self.gemv_split,
            Variant::Rows(m) => &self.gemv[m - 1],
        };
        let blocks = n.div_ceil(variant.features_per_block()) as u32;
        launch!(self, func, grid((blocks, 1, 1), (WARPS * 32) as u32);
            device_ptr(w)?, device_ptr(x)?, device_ptr(&y)?, int("n", n)?, int("k", k)?)?;
        Ok(y)
    }
}
