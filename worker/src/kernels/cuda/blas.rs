//! Linear layers on cuBLAS, written into memory the model chose (the layer scratch), not into a
//! tensor candle allocates: a step then allocates nothing inside its layers, which a CUDA graph
//! needs (see `graph.rs`) and which saves the stream-ordered allocation and free per product.
//! Used by a model that captures graphs (`CudaKernels::use_own_gemm`); others keep candle's
//! matmul until this path has been measured on a GPU.
//!
//! The call is the one candle's `matmul` makes for `x · Wᵀ` (`cublasGemmStridedBatchedEx`, one
//! batch, f32 accumulation, the default tensor-op algorithm), on a handle of the kernels' own on
//! their stream, with a workspace of its own ([`Blas`]): cuBLAS never allocates while a graph is
//! captured, and eager and captured steps pick the same algorithms.

use std::ffi::c_void;

use candle_core::{DType, Tensor};
use cudarc::cublas::sys as blas;

use super::{CudaKernels, device_ptr, gpu_error};
use crate::{Result, WorkerError};

/// Bytes of the cuBLAS workspace (cuBLAS's own default on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle on the kernels' stream with a workspace of its own (the handle is declared
/// first, so it is destroyed before the memory it uses is freed).
pub struct Blas {
    handle: cudarc::cublas::CudaBlas,
    _workspace: Tensor,
}

impl Blas {
    /// A handle on `stream` with its workspace on `device`.
    pub fn new(device: &candle_core::Device, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Blas> {
        let handle =
            cudarc::cublas::CudaBlas::new(stream.clone()).map_err(|e| gpu_error("creating a cuBLAS handle", e))?;
        let workspace = super::alloc_tensor(device, (WORKSPACE_BYTES / 4).into(), DType::U32)?;
        // SAFETY: the workspace is device memory of WORKSPACE_BYTES bytes that outlives the
        // handle (see the field order).
        let status = unsafe {
            blas::cublasSetWorkspace_v2(*handle.handle(), device_ptr(&workspace)? as *mut c_void, WORKSPACE_BYTES)
        };
        if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(WorkerError::Engine(format!("cuda: setting the cuBLAS workspace: {status:?}")));
        }
        Ok(Blas { handle, _workspace: workspace })
    }
}

impl CudaKernels {
    /// `x · Wᵀ` (`x`: `[m, k]`, `W`: `[n, k]`, both contiguous, of the kernels' element type) by
    /// cuBLAS into a tensor from [`CudaKernels::alloc`].
    pub(crate) fn gemm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let dims = |t: &Tensor| t.dims2().map_err(|e| WorkerError::Engine(format!("cuda gemm: {e}")));
        let ((m, k), (n, w_k)) = (dims(x)?, dims(w)?);
        if k != w_k || x.dtype() != self.dtype || w.dtype() != self.dtype || !x.is_contiguous() || !w.is_contiguous() {
            return Err(WorkerError::Engine(format!(
                "cuda gemm: x {:?} {:?} against W {:?} {:?}",
                x.dims(),
                x.dtype(),
                w.dims(),
                w.dtype()
            )));
        }
        let y = self.alloc((m, n))?;
        if m == 0 || n == 0 {
            return Ok(y);
        }
        if let Some(lt) = &self.lt {
            lt.gemm(x, w, &y, (m, n, k), self.capturing())?;
            return Ok(y);
        }
        self.gemm_raw((m, n, k), device_ptr(x)?, device_ptr(w)?, device_ptr(&y)?, n)?;
        Ok(y)
    }

    /// `y = x · Wᵀ` by cuBLAS on device addresses: `x` m rows of k, `W` n rows of k (the
    /// kernels' element type, contiguous), `y` m rows of which the first n values are written,
    /// rows `ldy` apart (`ldy >= n`: a column block of a wider output).
    pub(crate) fn gemm_raw(&self, (m, n, k): (usize, usize, usize), x: u64, w: u64, y: u64, ldy: usize) -> Result<()> {
        let data_type = match self.dtype {
            DType::BF16 => blas::cudaDataType_t::CUDA_R_16BF,
            DType::F32 => blas::cudaDataType_t::CUDA_R_32F,
            other => return Err(WorkerError::Engine(format!("cuda gemm: {other:?} is not supported"))),
        };
        let int = |what: &str, v: usize| super::int(what, v);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let blas =
            self.blas.as_ref().ok_or_else(|| WorkerError::Engine("cuda gemm: no cuBLAS handle of ours".into()))?;
        let handle = blas.handle.handle();
        // cuBLAS is column-major: Y (n x m, column-major, leading dimension ldy) = op(W) (n x k)
        // · X (k x m), with W read transposed from its row-major [n, k] storage.
        // SAFETY: the caller guarantees W holds n rows of k, x m rows of k and y m rows of ldy
        // (n of them written), all on this device; alpha and beta are f32, as the f32 compute
        // type requires; the handle's stream is the kernels' stream.
        let status = unsafe {
            blas::cublasGemmStridedBatchedEx(
                *handle,
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                int("n", n)?,
                int("m", m)?,
                int("k", k)?,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                data_type,
                int("k", k)?,
                (n * k) as i64,
                x as *const c_void,
                data_type,
                int("k", k)?,
                (m * k) as i64,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                data_type,
                int("ldy", ldy)?,
                (m * ldy) as i64,
                1,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        };
        if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(WorkerError::Engine(format!("cuda gemm of {m} x {k} by {n} x {k}: {status:?}")));
        }
        Ok(())
    }
}
