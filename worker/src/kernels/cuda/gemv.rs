//! `x · Wᵀ` for the model's linear layers: our GEMV (`gemv.cu`) when a step has few tokens (decode:
//! reading the weights at full bandwidth is all that matters), cuBLAS through candle otherwise.

use candle_core::Tensor;

use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::{Result, WorkerError};

/// Most token rows the GEMV kernel takes (`gemv_*_m1` .. `gemv_*_m8`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per block; must match `WARPS` in gemv.cu.
const WARPS: usize = 8;

/// Output features per block for `m` token rows: WARPS times the features per warp of
/// `Shape<M>::R` in gemv.cu.
fn rows_per_block(m: usize) -> usize {
    let per_warp = match m {
        0 | 1 => 1,
        2 | 3 => 2,
        _ => 4,
    };
    WARPS * per_warp
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
        launch!(self.stream, &self.gemv[m - 1], grid((n.div_ceil(rows_per_block(m)) as u32, 1, 1), (WARPS * 32) as u32);
            device_ptr(w)?, device_ptr(x)?, device_ptr(&y)?, int("n", n)?, int("k", k)?)?;
        Ok(y)
    }
}
