//! Kernel launches on candle's stream, with programmatic dependent launch where the GPU has it.
//!
//! A decode step at one token is ~300 small launches, and with plain launches each kernel starts
//! only once the previous one has drained: its blocks are scheduled onto an idle GPU, which costs
//! about a microsecond per kernel and leaves the memory system idle in between. With the
//! programmatic-stream-serialization attribute (sm_90 and later) the next kernel is launched
//! while the previous one finishes; each of our kernels begins with `await_previous_kernel()`
//! (common.cuh), which waits for the previous kernel's completion before it touches memory, so
//! the order of every read and write is unchanged. On the H200 this took a 32-layer chain of the
//! 8B shape's kernels from 5.23 to 4.59 ms (`scripts/gpu/decode_chain_bench.cu`).
//! Kernels of others (cuBLAS, candle) are launched without the attribute and keep plain order.
//!
//! Only steps of one or two token rows use it by default, the steps whose projections are our
//! GEMV too: on the H200 one stream went from 206 to 221 tokens/s and two streams from 387 to 409
//! (all launches dependent, the third session). From 3 rows the projections are cuBLAS kernels,
//! which never let a dependent start early; when the GEMV still took 8 rows, dependent launches
//! made those steps slower (8.3 vs 7.7 ms, whichever order the kernels wait and trigger in).
//! `LUMEN_CUDA_PDL=0` turns it off, `LUMEN_CUDA_PDL=all` uses it for every step.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use crate::{Result, WorkerError};

/// Launches a kernel of a [`super::CudaKernels`]: `launch!(kernels, &func, cfg; arg, arg, ...)`,
/// each argument a `u64` device address, an `i32` size or an `f32`, in the kernel's parameter
/// order. Expands to an unsafe launch: the call site guarantees that the arguments match the
/// kernel's parameters and that every address is valid for the accesses the kernel makes with
/// those sizes.
macro_rules! launch {
    ($kernels:expr, $func:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let mut params = $crate::kernels::cuda::launch::Params::default();
        $( params.push($arg); )*
        // SAFETY: upheld by the call site (see the macro's documentation).
        unsafe { $crate::kernels::cuda::launch::launch(&$kernels.stream, $func, $cfg, &mut params, $kernels.dependent_launch.get()) }
    }};
}

/// Most parameters a kernel of ours takes.
const MAX_PARAMS: usize = 24;

/// A kernel's parameters, each in an 8-byte slot (a 4-byte value in its first bytes: the slot's
/// address is then a valid address of the value on a little-endian GPU host).
#[derive(Clone, Default)]
pub struct Params {
    slots: [u64; MAX_PARAMS],
    len: usize,
}

/// A value a kernel parameter can hold.
pub trait Param {
    fn into_slot(self) -> u64;
}

impl Param for u64 {
    fn into_slot(self) -> u64 {
        self
    }
}

impl Param for usize {
    fn into_slot(self) -> u64 {
        self as u64
    }
}

impl Param for u32 {
    fn into_slot(self) -> u64 {
        u64::from(self)
    }
}

impl Param for i32 {
    fn into_slot(self) -> u64 {
        u64::from(self as u32)
    }
}

impl Param for f32 {
    fn into_slot(self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Params {
    /// Appends the next parameter. Panics past [`MAX_PARAMS`], a programming error.
    pub fn push(&mut self, value: impl Param) {
        assert!(self.len < MAX_PARAMS, "a kernel takes at most {MAX_PARAMS} parameters");
        self.slots[self.len] = value.into_slot();
        self.len += 1;
    }

    /// Replaces parameter `index` (a value of the parameter's type, as [`Param`] stores it).
    /// Panics past the parameters pushed, a programming error.
    pub fn set(&mut self, index: usize, slot: u64) {
        assert!(index < self.len, "parameter {index} of {}", self.len);
        self.slots[index] = slot;
    }

    /// A pointer to each parameter, as a launch takes them; valid while `self` is neither moved
    /// nor changed.
    pub fn pointers(&mut self) -> [*mut c_void; MAX_PARAMS] {
        let mut pointers = [std::ptr::null_mut(); MAX_PARAMS];
        for (pointer, slot) in pointers.iter_mut().zip(self.slots.iter_mut()).take(self.len) {
            *pointer = (slot as *mut u64).cast();
        }
        pointers
    }
}

/// Most token rows of a step whose kernels launch as dependents by default: the steps whose
/// projections are all our GEMV by default (measured faster at one and two rows; see the module
/// documentation).
pub const DEPENDENT_LAUNCH_ROWS: usize = super::gemv::GEMV_DEFAULT_ROWS;

/// Which steps launch our kernels as programmatic dependents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DependentLaunch {
    Off,
    /// Steps of at most [`DEPENDENT_LAUNCH_ROWS`] token rows (the default).
    FewRows,
    All,
}

impl DependentLaunch {
    /// For this device: `Off` below compute capability 9.0, else as `LUMEN_CUDA_PDL` says
    /// (`0`, `all`, anything else the default).
    pub fn for_device(stream: &CudaStream) -> Result<DependentLaunch> {
        let major = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| super::gpu_error("reading the compute capability", e))?;
        Ok(match std::env::var("LUMEN_CUDA_PDL").as_deref() {
            _ if major < 9 => DependentLaunch::Off,
            Ok("0") => DependentLaunch::Off,
            Ok("all") => DependentLaunch::All,
            _ => DependentLaunch::FewRows,
        })
    }

    /// Whether a step of `rows` token rows uses it.
    pub fn applies_to(self, rows: usize) -> bool {
        match self {
            DependentLaunch::Off => false,
            DependentLaunch::FewRows => rows <= DEPENDENT_LAUNCH_ROWS,
            DependentLaunch::All => true,
        }
    }
}

/// Launches `func` on `stream` with `params`, as a programmatic dependent of the kernel before
/// it when `dependent` is set.
///
/// # Safety
/// `params` must match the kernel's parameters in order and size, and every address among them
/// must be valid for the accesses the kernel makes.
pub unsafe fn launch(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut Params,
    dependent: bool,
) -> Result<()> {
    stream.context().bind_to_thread().map_err(|e| super::gpu_error("binding the context", e))?;
    let mut pointers = params.pointers();
    // SAFETY: an all-zero attribute is a valid value of this plain C struct.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: u32::from(dependent),
    };
    // SAFETY: the function, stream and configuration are valid; the parameters are upheld by the
    // caller and live until the call returns (the driver copies them at launch).
    let status =
        unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), pointers.as_mut_ptr(), std::ptr::null_mut()) };
    if status == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(WorkerError::Engine(format!("cuda: kernel launch: {status:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_launches_steps_of_one_or_two_rows_as_dependents() {
        let rows = [1, 2, 3, 8, 256];
        let applies = |mode: DependentLaunch| rows.map(|r| mode.applies_to(r));
        assert_eq!(applies(DependentLaunch::FewRows), [true, true, false, false, false]);
        assert_eq!(applies(DependentLaunch::All), [true; 5]);
        assert_eq!(applies(DependentLaunch::Off), [false; 5]);
    }
}
