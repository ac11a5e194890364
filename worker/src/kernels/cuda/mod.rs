//! CUDA kernels (built only with the `cuda` feature): our own `.cu` files, compiled by the
//! worker's build script into fatbins (sm_90a machine code + compute_80 PTX), loaded once per
//! model and launched on candle's stream, so they order with candle's cuBLAS matmuls without any
//! synchronisation.
//!
//! Kernels work on contiguous candle tensors of one element type (f32 or bf16; the arithmetic
//! is f32) and on device addresses of the step's metadata (one packed u32 upload per step, see
//! [`pack::HostPack`]). Every kernel has a CPU reference in `kernels::cpu` and a test comparing
//! the two on random inputs (`tests.rs`, run on a GPU machine).
//!
//! - `ops.cu`: RMSNorm with the residual add fused in; rotary embeddings fused with
//!   `reshape_and_cache` (the K/V of new tokens into their paged slots); SwiGLU; row gather.
//! - `attention_mma.cu`: paged attention on tensor cores (bf16) for prefill chunks and decode
//!   tokens (causal, varlen, grouped-query, split over long contexts); `attention.cu` the same on
//!   CUDA cores (f32, and bf16 with `LUMEN_CUDA_ATTENTION=simt`); `attention_common.cuh` the
//!   merge of split contexts both use.
//! - `gemv.cu`: linear layers for steps of one or two tokens (decode), at memory bandwidth;
//!   larger ones are cuBLAS (`blas.rs`).
//! - `graph.rs`: CUDA graphs of decode steps (capture, the attention update, replay).
//! - `fp8.cu`: FP8 E4M3 weights: row quantization, the decode GEMV, the helpers of larger
//!   products (`fp8.rs`).
//! - `sample.cu`: the sampler's edits and row reductions (argmax, top-k) over f32 logits, exact
//!   to the CPU sampler (`sampling::reduce`).

#[macro_use]
pub mod launch;

pub mod attention;
pub mod blas;
pub mod blas_lt;
pub mod fp8;
#[cfg(test)]
mod fp8_tests;
pub mod gemv;
pub mod graph;
pub mod ops;
pub mod pack;
pub mod sample;
#[cfg(test)]
mod sample_tests;
pub mod scratch;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Shape, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::Ptx;

use crate::{Result, WorkerError};

/// One kernel file, compiled twice by build.rs: the fatbin (sm_90a machine code and compute_80
/// PTX) and the compute_80 PTX alone (`LUMEN_CUDA_KERNEL_IMAGE=ptx`: what an Ampere GPU such as
/// the A10G JIT-compiles, runnable on Hopper for tests).
#[derive(Clone, Copy)]
pub(crate) struct KernelImage {
    pub fatbin: &'static [u8],
    pub ptx: &'static str,
}

macro_rules! kernel_image {
    ($stem:literal) => {
        $crate::kernels::cuda::KernelImage {
            fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".fatbin")),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")),
        }
    };
}
pub(crate) use kernel_image;

const OPS: KernelImage = kernel_image!("ops");
const GEMV: KernelImage = kernel_image!("gemv");
const SAMPLE: KernelImage = kernel_image!("sample");
const FP8: KernelImage = kernel_image!("fp8");

/// Whether the kernels load from their PTX alone (`LUMEN_CUDA_KERNEL_IMAGE=ptx`) rather than the
/// fatbin (`fatbin`, the default).
fn kernels_from_ptx() -> Result<bool> {
    match std::env::var("LUMEN_CUDA_KERNEL_IMAGE").as_deref() {
        Err(_) | Ok("fatbin") => Ok(false),
        Ok("ptx") => Ok(true),
        Ok(other) => Err(WorkerError::invalid("LUMEN_CUDA_KERNEL_IMAGE", format!("{other:?} is not fatbin or ptx"))),
    }
}

/// Head sizes the attention kernel is instantiated for.
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// A GPU failure (driver, cuBLAS, candle) as a worker error.
pub fn gpu_error(what: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Engine(format!("cuda: {what}: {e}"))
}

/// The kernels of one element type and head size, loaded on one device.
pub struct CudaKernels {
    device: Device,
    stream: Arc<CudaStream>,
    dtype: DType,
    head_dim: usize,
    num_sms: usize,
    add_rms_norm: CudaFunction,
    rotary_and_cache: CudaFunction,
    silu_mul: CudaFunction,
    gather_rows: CudaFunction,
    attention: attention::AttentionKernels,
    /// `gemv[m - 1]` multiplies m token rows.
    gemv: Vec<CudaFunction>,
    /// One token row, two output features per warp (long outputs).
    gemv_wide: CudaFunction,
    /// One token row, two output features per pair of warps (short outputs).
    gemv_split: CudaFunction,
    /// Most token rows a linear layer gives the GEMV (see `gemv`).
    gemv_rows: usize,
    reduce_rows: CudaFunction,
    /// One zeroed u32 per (tile, head group) of a split attention launch: its last CTA merges
    /// (see attention_common.cuh) and zeroes it again. Splits happen only below `split_ctas`
    /// CTAs, so that many counters always suffice.
    split_counters: Tensor,
    /// CTAs an attention launch aims for (see [`attention::AttentionSetup`]); also the number of
    /// split counters.
    split_ctas: usize,
    /// Which prefill tiles attention plans take (`LUMEN_CUDA_PREFILL_TILES`; tall ones only
    /// where they loaded).
    pub prefill_tiles: attention::PrefillTiles,
    /// Merge split attention in the launch itself (default) or in a second launch
    /// (`LUMEN_CUDA_SPLIT_MERGE=launch`).
    pub merge_splits: bool,
    /// Which steps launch our kernels as programmatic dependents of the kernel before them
    /// (see `launch`), and whether the current step does (every launch, until a model calls
    /// [`CudaKernels::begin_step`]).
    dependent_mode: launch::DependentLaunch,
    dependent_launch: std::cell::Cell<bool>,
    /// Where outputs come from inside a model's layers, once the model set it (see `scratch`).
    scratch: Option<scratch::LayerScratch>,
    /// While a graph is captured: the attention launches captured so far (see `graph`).
    capture: std::cell::RefCell<Option<Vec<graph::CapturedLaunch>>>,
    /// Our cuBLAS handle for the linear layers the GEMV does not take, writing into the layer
    /// scratch (see `blas`), once [`CudaKernels::use_own_gemm`] asked for it (a model that
    /// captures graphs); until then candle's matmul.
    blas: Option<blas::Blas>,
    /// The same through cuBLASLt with an algorithm per shape, when `LUMEN_CUDA_GEMM` asks for it
    /// (see `blas_lt`).
    lt: Option<blas_lt::LtGemm>,
    /// FP8 weights' products (see `fp8`).
    fp8: fp8::Fp8Kernels,
}

impl CudaKernels {
    /// Loads the modules on `device` (a CUDA device) for `dtype` (F32 or BF16) and `head_dim`,
    /// with the attention kernels [`attention::AttentionKind::for_dtype`] picks.
    pub fn load(device: &Device, dtype: DType, head_dim: usize) -> Result<CudaKernels> {
        Self::load_with(device, dtype, head_dim, attention::AttentionKind::for_dtype(dtype))
    }

    /// As [`CudaKernels::load`], with the attention kernels of `kind` (tensor cores need BF16).
    pub fn load_with(
        device: &Device,
        dtype: DType,
        head_dim: usize,
        kind: attention::AttentionKind,
    ) -> Result<CudaKernels> {
        if kind == attention::AttentionKind::TensorCore && dtype != DType::BF16 {
            return Err(WorkerError::invalid("dtype", format!("tensor-core attention needs bf16, not {dtype:?}")));
        }
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => return Err(WorkerError::invalid("dtype", format!("{other:?} is not supported on the GPU"))),
        };
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            return Err(WorkerError::ModelConfig(format!(
                "head_dim {head_dim} is not supported by the CUDA attention kernel (supported: {SUPPORTED_HEAD_DIMS:?})"
            )));
        }
        let cdev = device.as_cuda_device().map_err(|e| gpu_error("not a CUDA device", e))?;
        let stream = cdev.cuda_stream();
        let ctx = stream.context().clone();
        let from_ptx = kernels_from_ptx()?;
        let load = |image: KernelImage| -> Result<Arc<CudaModule>> {
            let image = if from_ptx { Ptx::from_src(image.ptx) } else { Ptx::from_binary(image.fatbin.to_vec()) };
            ctx.load_module(image).map_err(|e| gpu_error("loading a kernel module", e))
        };
        let (ops, gemv_module, sample) = (load(OPS)?, load(GEMV)?, load(SAMPLE)?);
        let func = |module: &Arc<CudaModule>, name: String| -> Result<CudaFunction> {
            module.load_function(&name).map_err(|e| gpu_error(&format!("kernel {name}"), e))
        };
        let attribute = |a, what: &str| -> Result<usize> {
            Ok(ctx.attribute(a).map_err(|e| gpu_error(&format!("reading the {what}"), e))? as usize)
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let num_sms = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "multiprocessor count")?;
        let compute_capability = (
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "compute capability")?,
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "compute capability")?,
        );
        let fp8 = fp8::Fp8Kernels::load(&load(FP8)?, compute_capability)?;
        let max_shared =
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, "shared memory per block")?;
        let attention = attention::AttentionKernels::load(
            kind,
            &load,
            &format!("{suffix}_d{head_dim}"),
            head_dim,
            max_shared,
            num_sms,
        )?;
        let prefill_tiles = match attention::PrefillTiles::from_env()? {
            _ if !attention.has_tall_prefill() => attention::PrefillTiles::Short,
            tiles => tiles,
        };
        let dependent_mode = launch::DependentLaunch::for_device(&stream)?;
        // The split aims for one wave of the decode kernel (`LUMEN_CUDA_SPLIT_CTAS_PER_SM` sets
        // the CTAs per multiprocessor instead).
        let per_sm = match std::env::var("LUMEN_CUDA_SPLIT_CTAS_PER_SM") {
            Ok(v) => v.parse::<usize>().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| {
                WorkerError::invalid("LUMEN_CUDA_SPLIT_CTAS_PER_SM", format!("{v:?} is not a count from 1 to 64"))
            })?,
            Err(_) => attention.decode_ctas_per_sm,
        };
        let split_ctas = per_sm * num_sms;
        let kernels = CudaKernels {
            device: device.clone(),
            dtype,
            head_dim,
            num_sms,
            add_rms_norm: func(&ops, format!("add_rms_norm_{suffix}"))?,
            rotary_and_cache: func(&ops, format!("rotary_and_cache_{suffix}"))?,
            silu_mul: func(&ops, format!("silu_mul_{suffix}"))?,
            gather_rows: func(&ops, format!("gather_rows_{suffix}"))?,
            attention,
            gemv: (1..=gemv::GEMV_MAX_ROWS)
                .map(|m| func(&gemv_module, format!("gemv_{suffix}_m{m}")))
                .collect::<Result<Vec<_>>>()?,
            gemv_wide: func(&gemv_module, format!("gemv_{suffix}_m1_wide"))?,
            gemv_split: func(&gemv_module, format!("gemv_{suffix}_m1_split"))?,
            gemv_rows: gemv::gemv_rows_from_env()?,
            reduce_rows: func(&sample, "reduce_rows".into())?,
            split_counters: Tensor::zeros(split_ctas, DType::U32, device)
                .map_err(|e| gpu_error("allocating split counters", e))?,
            split_ctas,
            prefill_tiles,
            merge_splits: std::env::var("LUMEN_CUDA_SPLIT_MERGE").map_or(true, |v| v != "launch"),
            dependent_mode,
            dependent_launch: std::cell::Cell::new(dependent_mode != launch::DependentLaunch::Off),
            scratch: None,
            capture: std::cell::RefCell::new(None),
            blas: None,
            lt: None,
            fp8,
            stream,
        };
        Ok(kernels)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Streaming multiprocessors of the device (sizes the attention split).
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// What attention plans for these kernels need (plans must be made with it).
    pub fn attention_setup(&self) -> attention::AttentionSetup {
        attention::AttentionSetup {
            kind: self.attention.kind,
            split_ctas: self.split_ctas,
            prefill_tiles: self.prefill_tiles,
        }
    }

    /// A new uninitialised tensor of the kernels' element type on their device: from the layer
    /// scratch when it is active and has room, else allocated.
    pub fn alloc(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.alloc_of(shape.into(), self.dtype)
    }

    /// Like [`CudaKernels::alloc`] for another element type.
    pub fn alloc_of(&self, shape: Shape, dtype: DType) -> Result<Tensor> {
        if let Some(scratch) = &self.scratch
            && let Some(t) = scratch.take(&shape, dtype)?
        {
            return Ok(t);
        }
        if self.capturing() {
            return Err(WorkerError::Engine(format!(
                "cuda graph: {shape:?} {dtype:?} does not fit the layer scratch (nothing is allocated while capturing)"
            )));
        }
        alloc_tensor(&self.device, shape, dtype)
    }

    /// Linear layers the GEMV does not take go through our own cuBLAS handle into the layer
    /// scratch (what a graph capture needs) instead of candle's matmul.
    pub fn use_own_gemm(&mut self) -> Result<()> {
        self.use_own_gemm_with(blas_lt::GemmLibrary::from_env()?)
    }

    /// As [`CudaKernels::use_own_gemm`], through `library`.
    pub fn use_own_gemm_with(&mut self, library: blas_lt::GemmLibrary) -> Result<()> {
        if self.blas.is_none() {
            self.blas = Some(blas::Blas::new(&self.device, &self.stream)?);
        }
        if library != blas_lt::GemmLibrary::Cublas && self.lt.is_none() {
            let tune = library == blas_lt::GemmLibrary::LtTuned;
            self.lt = Some(blas_lt::LtGemm::new(&self.device, &self.stream, self.dtype, tune)?);
        }
        Ok(())
    }

    /// Whether the linear layers tune their algorithm per shape when they first meet it
    /// (`LUMEN_CUDA_GEMM=lt-tuned`): a model then runs a graph's layers eagerly once before
    /// capturing them.
    pub fn tunes_gemm(&self) -> bool {
        self.lt.as_ref().is_some_and(blas_lt::LtGemm::tunes)
    }

    /// Starts capturing the stream's work into a graph: until [`CudaKernels::end_capture`],
    /// allocations outside the layer scratch fail and attention launches are recorded.
    pub fn begin_capture(&self) -> Result<()> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| gpu_error("starting a graph capture", e))?;
        self.capture.replace(Some(Vec::new()));
        Ok(())
    }

    /// Ends a capture: the graph, instantiated, and the attention launches it holds, in order.
    /// Also ends a capture that failed midway (then with its error or an empty graph's).
    pub fn end_capture(&self) -> Result<(cudarc::driver::CudaGraph, Vec<graph::CapturedLaunch>)> {
        let launches = self.capture.take().unwrap_or_default();
        let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
        let graph = self.stream.end_capture(flags).map_err(|e| gpu_error("ending a graph capture", e))?;
        let graph = graph.ok_or_else(|| WorkerError::Engine("cuda graph: the capture is empty".into()))?;
        Ok((graph, launches))
    }

    /// Whether a graph is being captured.
    pub fn capturing(&self) -> bool {
        self.capture.borrow().is_some()
    }

    /// Records an attention launch of the capture under way.
    fn record_capture(&self, launch: graph::CapturedLaunch) {
        if let Some(launches) = self.capture.borrow_mut().as_mut() {
            launches.push(launch);
        }
    }

    /// A step of `rows` token rows starts: whether its kernels launch as dependents.
    pub fn begin_step(&self, rows: usize) {
        self.dependent_launch.set(self.dependent_mode.applies_to(rows));
    }

    /// Gives the kernels per-layer scratch memory (see `scratch`).
    pub fn set_scratch(&mut self, scratch: scratch::LayerScratch) {
        self.scratch = Some(scratch);
    }

    /// The layer scratch, if set.
    pub fn scratch(&self) -> Option<&scratch::LayerScratch> {
        self.scratch.as_ref()
    }

    /// Fails unless `t` is a contiguous tensor of the kernels' element type.
    fn expect(&self, what: &str, t: &Tensor) -> Result<()> {
        if t.dtype() != self.dtype || !t.is_contiguous() {
            return Err(WorkerError::Engine(format!(
                "cuda kernel input `{what}`: expected a contiguous {:?} tensor, found {:?} {:?} (contiguous: {})",
                self.dtype,
                t.dtype(),
                t.dims(),
                t.is_contiguous()
            )));
        }
        Ok(())
    }
}

/// A new uninitialised tensor of `shape` and `dtype` on a CUDA device (kernels overwrite it).
pub fn alloc_tensor(device: &Device, shape: Shape, dtype: DType) -> Result<Tensor> {
    let cdev = device.as_cuda_device().map_err(|e| gpu_error("not a CUDA device", e))?;
    // At least one element: an empty tensor still needs an address to hand to a kernel.
    let n = shape.elem_count().max(1);
    let fail = |e| gpu_error(&format!("allocating {n} elements"), e);
    // SAFETY: the memory is uninitialised; every caller writes all of it before reading.
    let storage = unsafe {
        match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(cdev.alloc::<f32>(n).map_err(fail)?, cdev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(cdev.alloc::<half::bf16>(n).map_err(fail)?, cdev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(cdev.alloc::<u32>(n).map_err(fail)?, cdev.clone()),
            DType::U8 => CudaStorage::wrap_cuda_slice(cdev.alloc::<u8>(n).map_err(fail)?, cdev.clone()),
            other => return Err(WorkerError::Engine(format!("cuda: cannot allocate {other:?} tensors"))),
        }
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

/// The device address of the first element of a contiguous CUDA tensor.
///
/// The address stays valid while the tensor (or a clone sharing its storage) lives; memory
/// freed afterwards is released in stream order, after every kernel launched before the free.
pub fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(WorkerError::Engine("cuda kernel input is not on a CUDA device".into()));
    };
    if !layout.is_contiguous() {
        return Err(WorkerError::Engine(format!("cuda kernel input {:?} is not contiguous", layout.dims())));
    }
    let stream = cuda.device().cuda_stream();
    let fail = |e| gpu_error("reading a tensor's device address", e);
    let (base, elem) = match cuda.dtype() {
        DType::F32 => (cuda.as_cuda_slice::<f32>().map_err(fail)?.device_ptr(&stream).0, 4),
        DType::BF16 => (cuda.as_cuda_slice::<half::bf16>().map_err(fail)?.device_ptr(&stream).0, 2),
        DType::U32 => (cuda.as_cuda_slice::<u32>().map_err(fail)?.device_ptr(&stream).0, 4),
        DType::U8 => (cuda.as_cuda_slice::<u8>().map_err(fail)?.device_ptr(&stream).0, 1),
        other => return Err(WorkerError::Engine(format!("cuda: {other:?} tensors are not kernel inputs"))),
    };
    Ok(base + (layout.start_offset() * elem) as u64)
}

/// A launch of `grid` blocks of `threads` threads with static shared memory only.
pub(crate) fn grid(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// A size as the `int` kernel parameter it becomes, failing if it does not fit.
pub(crate) fn int(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| WorkerError::Engine(format!("cuda: {what} = {n} does not fit a kernel's int")))
}
