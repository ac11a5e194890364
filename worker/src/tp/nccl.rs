//! NCCL for the GPU ranks of one tensor-parallel model: the library, loaded when the first GPU
//! group is made, and one communicator per rank with the two collectives the Llama block needs
//! (a sum all-reduce after the row-parallel projections, an all-gather of the vocabulary's logit
//! columns), queued on the rank's own stream so a captured CUDA graph holds them too.
//!
//! The library is opened at run time (`dlopen`: `LUMEN_NCCL_LIBRARY` when set, else
//! `libnccl.so.2` / `libnccl.so` on the loader's path) rather than linked: a `cuda` build then
//! starts on machines without NCCL (every single-GPU deployment), and only a replica with
//! `tensor_parallel_size` > 1 on GPUs needs it; its absence is an error naming the library and
//! the variable. cudarc's NCCL bindings would link `libnccl` into every CUDA build, since this
//! crate links the other CUDA libraries.
//!
//! Invariants:
//! - every rank enters every collective, in the same order, with the same count (the model's
//!   steps are identical on every rank); one thread driving several communicators wraps the
//!   calls in [`group`] (NCCL's group calls), or the first call waits forever for the others;
//! - buffers are device pointers on the communicator's device, `count` elements of the given
//!   type, live until the stream has run the collective;
//! - a communicator that may hang (a rank failed) is aborted ([`Comm::abort`], or from another
//!   thread through an [`AbortHandle`]), which makes its queued collectives return; a failed
//!   rank aborts every rank's communicator, since aborting its own does not release the others'
//!   waiting kernels; an aborted communicator is never used again and is not destroyed.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::{Result, WorkerError};

/// `ncclResult_t`.
type Status = c_int;
/// `ncclComm_t`.
type RawComm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream` is the same pointer).
pub type RawStream = *mut c_void;

/// The element types the collectives carry (`ncclDataType_t`'s values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    F32,
    Bf16,
}

impl ElementType {
    fn code(self) -> c_int {
        match self {
            ElementType::F32 => 7,
            ElementType::Bf16 => 9,
        }
    }
}

/// `ncclSum`.
const SUM: c_int = 0;

/// The entry points used, resolved once.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> Status,
    comm_init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> Status,
    comm_destroy: unsafe extern "C" fn(RawComm) -> Status,
    comm_abort: unsafe extern "C" fn(RawComm) -> Status,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut Status) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> Status,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, RawStream) -> Status,
    group_start: unsafe extern "C" fn() -> Status,
    group_end: unsafe extern "C" fn() -> Status,
    /// Keeps the symbols above valid; never unloaded.
    _library: libloading::Library,
}

/// The variable naming the library to load.
pub const LIBRARY_VAR: &str = "LUMEN_NCCL_LIBRARY";

fn open() -> std::result::Result<Api, String> {
    let names: Vec<String> = match std::env::var(LIBRARY_VAR) {
        Ok(path) if !path.is_empty() => vec![path],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    };
    let mut failures = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => return resolve(library).map_err(|e| format!("{name}: {e}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "NCCL could not be loaded ({}); tensor parallelism on GPUs needs libnccl.so.2 on the loader's path or {LIBRARY_VAR} naming it",
        failures.join("; ")
    ))
}

fn resolve(library: libloading::Library) -> std::result::Result<Api, String> {
    // SAFETY: each symbol is looked up by its NCCL name and given NCCL's C signature for it
    // (nccl.h, stable since 2.x); the library is kept in `Api`, so the pointers stay valid.
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *library.get($name).map_err(|e| e.to_string())?
            };
        }
        Ok(Api {
            get_version: sym!(b"ncclGetVersion\0"),
            comm_init_all: sym!(b"ncclCommInitAll\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            comm_abort: sym!(b"ncclCommAbort\0"),
            comm_get_async_error: sym!(b"ncclCommGetAsyncError\0"),
            get_error_string: sym!(b"ncclGetErrorString\0"),
            all_reduce: sym!(b"ncclAllReduce\0"),
            all_gather: sym!(b"ncclAllGather\0"),
            group_start: sym!(b"ncclGroupStart\0"),
            group_end: sym!(b"ncclGroupEnd\0"),
            _library: library,
        })
    }
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(open).as_ref().map_err(|e| WorkerError::Engine(e.clone()))
}

/// `status` as a result, naming the call.
fn check(api: &Api, what: &str, status: Status) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any status.
    let text = unsafe { CStr::from_ptr((api.get_error_string)(status)) }.to_string_lossy().into_owned();
    Err(WorkerError::Engine(format!("nccl: {what} failed: {text} (status {status})")))
}

/// The loaded library's version as (major, minor, patch), loading it if needed.
pub fn version() -> Result<(u32, u32, u32)> {
    let api = api()?;
    let mut code: c_int = 0;
    // SAFETY: writes one int.
    check(api, "ncclGetVersion", unsafe { (api.get_version)(&mut code) })?;
    // NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z since 2.9 (X*1000 + Y*100 + Z before).
    let code = code as u32;
    Ok(if code >= 10000 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    })
}

/// Runs `calls` between `ncclGroupStart` and `ncclGroupEnd`: how one thread queues a collective
/// on several communicators without the first waiting for the rest.
pub fn group<R>(calls: impl FnOnce() -> Result<R>) -> Result<R> {
    let api = api()?;
    // SAFETY: no arguments; group calls nest.
    check(api, "ncclGroupStart", unsafe { (api.group_start)() })?;
    let out = calls();
    // SAFETY: as above; ends the group begun here even when a call inside failed.
    let end = check(api, "ncclGroupEnd", unsafe { (api.group_end)() });
    let out = out?;
    end.map(|_| out)
}

/// One rank's communicator.
pub struct Comm {
    raw: RawComm,
    rank: usize,
    ranks: usize,
    /// Set once the communicator is aborted (by its rank or through an [`AbortHandle`]).
    aborted: Arc<AtomicBool>,
}

/// Aborts a communicator from any thread (NCCL allows `ncclCommAbort` while another thread
/// waits on the communicator's collectives): how a failed rank releases the others, whose
/// kernels would otherwise wait for it forever. Used only while the communicator lives.
#[derive(Clone)]
pub struct AbortHandle {
    raw: usize,
    rank: usize,
    aborted: Arc<AtomicBool>,
}

// SAFETY: the handle carries the communicator's address; `abort` is the only call made with it,
// once (the flag), and NCCL allows it from any thread.
unsafe impl Send for AbortHandle {}
unsafe impl Sync for AbortHandle {}

impl AbortHandle {
    /// Stops the communicator's collectives; later calls and the owner's drop do nothing more.
    pub fn abort(&self) {
        if self.aborted.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(api) = api() {
            // SAFETY: the communicator lives (the handle is used only while it does) and is
            // aborted once (the flag above).
            let status = unsafe { (api.comm_abort)(self.raw as RawComm) };
            if status != 0 {
                tracing::warn!(rank = self.rank, status, "ncclCommAbort failed");
            }
        }
    }
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `Comm`'s
// methods take `&self` only for calls NCCL allows concurrently with nothing else on this
// communicator, and the model gives each rank's communicator to that rank's thread alone.
unsafe impl Send for Comm {}

impl Comm {
    /// One communicator per device of `devices` (CUDA ordinals, distinct), rank i on
    /// `devices[i]`, made together by this thread (`ncclCommInitAll`).
    pub fn init_all(devices: &[i32]) -> Result<Vec<Comm>> {
        let api = api()?;
        if devices.is_empty() {
            return Err(WorkerError::Engine("nccl: a group needs at least one device".into()));
        }
        let mut raw = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `raw` has room for one communicator per device; `devices` is read only.
        check(api, "ncclCommInitAll", unsafe {
            (api.comm_init_all)(raw.as_mut_ptr(), devices.len() as c_int, devices.as_ptr())
        })?;
        let ranks = devices.len();
        Ok(raw
            .into_iter()
            .enumerate()
            .map(|(rank, raw)| Comm { raw, rank, ranks, aborted: Arc::new(AtomicBool::new(false)) })
            .collect())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Queues on `stream` the sum over every rank of `count` elements at `send`, written to
    /// `recv` (may equal `send`: in place).
    ///
    /// # Safety
    /// `send` and `recv` are device pointers on this communicator's device holding `count`
    /// elements of `ty`, live until `stream` has run the collective; `stream` is a stream of
    /// that device.
    pub unsafe fn all_reduce_sum(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        ty: ElementType,
        stream: RawStream,
    ) -> Result<()> {
        let api = self.usable()?;
        // SAFETY: the caller's contract above.
        check(api, "ncclAllReduce", unsafe {
            (api.all_reduce)(send as *const c_void, recv as *mut c_void, count, ty.code(), SUM, self.raw, stream)
        })
    }

    /// Queues on `stream` the concatenation, in rank order, of every rank's `count` elements at
    /// `send`, written to `recv` (`ranks * count` elements).
    ///
    /// # Safety
    /// As [`Comm::all_reduce_sum`], with `recv` holding `ranks * count` elements.
    pub unsafe fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        ty: ElementType,
        stream: RawStream,
    ) -> Result<()> {
        let api = self.usable()?;
        // SAFETY: the caller's contract above.
        check(api, "ncclAllGather", unsafe {
            (api.all_gather)(send as *const c_void, recv as *mut c_void, count, ty.code(), self.raw, stream)
        })
    }

    /// An error NCCL met while running queued collectives (a peer gone, a network failure), if
    /// any.
    pub fn async_error(&self) -> Result<()> {
        let api = self.usable()?;
        let mut status: Status = 0;
        // SAFETY: writes one status.
        check(api, "ncclCommGetAsyncError", unsafe { (api.comm_get_async_error)(self.raw, &mut status) })?;
        check(api, "a queued collective", status)
    }

    /// Stops every collective of this communicator, queued or running, so streams waiting on a
    /// rank that will never come return; the communicator cannot be used afterwards.
    pub fn abort(&mut self) {
        self.abort_handle().abort();
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { raw: self.raw as usize, rank: self.rank, aborted: self.aborted.clone() }
    }

    fn usable(&self) -> Result<&'static Api> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(WorkerError::Engine(format!("nccl: rank {}'s communicator was aborted", self.rank)));
        }
        api()
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::Acquire) {
            return;
        }
        if let Ok(api) = api() {
            // SAFETY: `raw` is live and dropped once; aborted communicators are freed by the abort.
            let status = unsafe { (api.comm_destroy)(self.raw) };
            if status != 0 {
                tracing::warn!(rank = self.rank, status, "ncclCommDestroy failed");
            }
        }
    }
}

#[cfg(test)]
#[path = "nccl_tests.rs"]
mod tests;
