//! `x · Wᵀ` for the model's linear layers: our GEMV (`gemv.cu`) for steps of one or two tokens
//! (decode: reading the weights at full bandwidth is all that matters), cuBLAS through candle
//! otherwise.
//!
//! Where the line lies was measured on the H200 for the 8B shape's projections
//! (`scripts/gpu/linear_bench.cu`, docs/benchmarks.md): at one and two rows the GEMV reads the
//! weights faster than cuBLAS (o: 11.2 against 13.3 µs), from three rows cuBLAS does, by far at
//! eight (a layer's four products 122 against 196 µs): its kernels keep their time flat from 1 to
//! 32 rows (65-94% of the read rate) while the GEMV's arithmetic grows with the rows.
//! `LUMEN_CUDA_GEMV_MAX_ROWS` (1-8) moves the line for other GPUs.

use candle_core::Tensor;

use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::{Result, WorkerError};

/// Most token rows the GEMV kernel takes (`gemv_*_m1` .. `gemv_*_m8`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Most token rows a linear layer gives the GEMV by default; cuBLAS takes larger steps.
pub const GEMV_DEFAULT_ROWS: usize = 2;
/// Warps per block; must match `gemv_core::WARPS` in gemv.cuh.
const WARPS: usize = 8;
/// From this many output features on, one token row takes `gemv_*_m1_wide` (two features per
/// warp; see gemv.cu).
pub const GEMV_WIDE_N: usize = 16384;
/// Up to this many output features, one token row takes `gemv_*_m1_split` (two features per
/// pair of warps, each over half of k).
pub const GEMV_SPLIT_MAX_N: usize = 4096;

/// The kernel shape for `m` token rows and `n` outputs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Variant {
    /// `gemv_*_m{m}`: `Shape<M>::R` features per warp.
    Rows(usize),
    Wide,
    Split,
}

impl Variant {
    pub(super) fn of(m: usize, n: usize) -> Variant {
        match m {
            1 if n >= GEMV_WIDE_N => Variant::Wide,
            1 if n <= GEMV_SPLIT_MAX_N => Variant::Split,
            m => Variant::Rows(m),
        }
    }

    /// Output features per block of WARPS warps.
    pub(super) fn features_per_block(self) -> usize {
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

/// Most token rows a linear layer gives the GEMV: `LUMEN_CUDA_GEMV_MAX_ROWS` (1 to 8), else
/// [`GEMV_DEFAULT_ROWS`].
pub fn gemv_rows_from_env() -> Result<usize> {
    match std::env::var("LUMEN_CUDA_GEMV_MAX_ROWS") {
        Err(_) => Ok(GEMV_DEFAULT_ROWS),
        Ok(v) => v.parse().ok().filter(|r| (1..=GEMV_MAX_ROWS).contains(r)).ok_or_else(|| {
            WorkerError::invalid(
                "LUMEN_CUDA_GEMV_MAX_ROWS",
                format!("{v:?} is not a number of rows from 1 to {GEMV_MAX_ROWS}"),
            )
        }),
    }
}

/// A product the GEMV kernel can take: its sizes and device addresses.
struct GemvOperands {
    m: usize,
    n: usize,
    k: usize,
    x: u64,
    w: u64,
}

impl CudaKernels {
    /// `x · Wᵀ` with `x` `[m, k]` and `W` `[n, k]` (a linear layer's Hugging Face layout):
    /// `[m, n]`, accumulated in f32.
    pub fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let m = x.dims2().map_err(|e| WorkerError::Engine(format!("cuda linear: {e}")))?.0;
        if m <= self.gemv_rows
            && let Some(operands) = self.gemv_operands(x, w)?
        {
            return self.launch_gemv(operands);
        }
        match self.blas {
            Some(_) => self.gemm(x, w),
            None => w.t().and_then(|wt| x.matmul(&wt)).map_err(|e| gpu_error("matmul", e)),
        }
    }

    /// `x · Wᵀ` by the GEMV kernel, whatever the row limit (the tests cover every row count);
    /// an error when the kernel cannot take it.
    #[cfg(test)]
    pub(crate) fn gemv(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.gemv_operands(x, w)? {
            Some(operands) => self.launch_gemv(operands),
            None => {
                Err(WorkerError::Engine(format!("cuda gemv: cannot take x {:?} against W {:?}", x.dims(), w.dims())))
            }
        }
    }

    /// The operands when the GEMV kernel can multiply `x` by `Wᵀ`: 1 to 8 rows of the kernels'
    /// element type, contiguous and 16-byte aligned, k a whole number of 16-byte vectors.
    fn gemv_operands(&self, x: &Tensor, w: &Tensor) -> Result<Option<GemvOperands>> {
        let dims = |t: &Tensor| t.dims2().map_err(|e| WorkerError::Engine(format!("cuda linear: {e}")));
        let ((m, k), (n, w_k)) = (dims(x)?, dims(w)?);
        if k != w_k {
            return Err(WorkerError::Engine(format!("cuda linear: x {:?} against W {:?}", x.dims(), w.dims())));
        }
        let fits = (1..=GEMV_MAX_ROWS).contains(&m)
            && k % (16 / self.dtype.size_in_bytes()) == 0
            && x.dtype() == self.dtype
            && w.dtype() == self.dtype
            && x.is_contiguous()
            && w.is_contiguous();
        if !fits {
            return Ok(None);
        }
        let (x, w) = (device_ptr(x)?, device_ptr(w)?);
        Ok((x % 16 == 0 && w % 16 == 0).then_some(GemvOperands { m, n, k, x, w }))
    }

    fn launch_gemv(&self, GemvOperands { m, n, k, x, w }: GemvOperands) -> Result<Tensor> {
        let y = self.alloc((m, n))?;
        let variant = Variant::of(m, n);
        let func = match variant {
            Variant::Wide => &self.gemv_wide,
            Variant::Split => &self.gemv_split,
            Variant::Rows(m) => &self.gemv[m - 1],
        };
        let blocks = n.div_ceil(variant.features_per_block()) as u32;
        // SAFETY: W holds n rows of k, x m rows of k, y m rows of n, all 16-byte aligned with k a
        // whole number of 16-byte vectors (checked by gemv_operands).
        // The dense kernels take no scale vector (a null pointer they never read).
        launch!(self, func, grid((blocks, 1, 1), (WARPS * 32) as u32);
            w, 0u64, x, device_ptr(&y)?, int("n", n)?, int("k", k)?)?;
        Ok(y)
    }
}
