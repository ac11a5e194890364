//! The collectives of a tensor-parallel model's GPU ranks, over NCCL when every rank has a GPU
//! of its own, or staged through host memory and a [`LocalGroup`] when the ranks share one GPU
//! (how a single-GPU machine runs, and tests, a model split N ways: correct but slow, and never
//! inside a captured CUDA graph).
//!
//! Every call takes a device tensor of the rank's model and queues the collective on that
//! tensor's device stream (the model's one stream), so it is ordered after the kernels that
//! wrote the tensor and before those that read the result, with no host wait on the NCCL path.
//!
//! Invariants: as `tp::nccl` and `tp::comm` (every rank calls the same collectives in the same
//! order with tensors of the same size, or one aborts the group); tensors are contiguous bf16 or
//! f32. A staged collective blocks its thread until every rank has reached it; a failed rank
//! aborts every rank's end ([`CommHandle`]) so the others return an error instead of waiting.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::comm::LocalGroup;
use super::nccl::{self, ElementType};
use crate::kernels::cuda::{device_ptr, gpu_error};
use crate::{Result, WorkerError};

/// One rank's end of the group.
pub enum RankComm {
    Nccl(nccl::Comm),
    Staged { group: Arc<LocalGroup>, rank: usize },
}

fn element_type(t: &Tensor) -> Result<ElementType> {
    match t.dtype() {
        DType::F32 => Ok(ElementType::F32),
        DType::BF16 => Ok(ElementType::Bf16),
        other => Err(WorkerError::Engine(format!("tensor parallelism: no collectives over {other:?} tensors"))),
    }
}

/// The stream the tensor's device queues work on.
fn stream_of(t: &Tensor) -> Result<nccl::RawStream> {
    let cuda = t.device().as_cuda_device().map_err(|e| gpu_error("a collective's tensor", e))?;
    Ok(cuda.cuda_stream().cu_stream() as nccl::RawStream)
}

fn staged_abort() -> WorkerError {
    WorkerError::Engine("tensor parallelism: another rank failed during the step".into())
}

/// `t`'s values as f32 on the host (waits for the kernels that wrote them).
fn download(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|f| f.flatten_all())
        .and_then(|f| f.to_vec1::<f32>())
        .map_err(|e| gpu_error("staging a collective through the host", e))
}

/// `values` written over `t` (same element count), in `t`'s element type.
fn upload_into(values: Vec<f32>, t: &Tensor) -> Result<()> {
    let what = "staging a collective back to the device";
    let staged = Tensor::from_vec(values, t.shape(), t.device())
        .and_then(|s| s.to_dtype(t.dtype()))
        .map_err(|e| gpu_error(what, e))?;
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    let stream = stream_of(t)?;
    // SAFETY: both are contiguous device buffers of `bytes` bytes on the same device; the copy is
    // queued on the stream that wrote `staged`, and `staged` is freed in that stream's order.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(device_ptr(t)?, device_ptr(&staged)?, bytes, stream as _)
            .map_err(|e| gpu_error(what, e))
    }
}

impl RankComm {
    /// One end per rank of a model whose rank i runs on GPU `devices[i]`: NCCL when the devices
    /// are distinct, staged when they are all one device.
    pub fn group(devices: &[usize]) -> Result<Vec<RankComm>> {
        let mut distinct = devices.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if devices.is_empty() {
            return Err(WorkerError::invalid("tensor_parallel_size", "a model needs at least one rank"));
        }
        if distinct.len() == devices.len() {
            let ordinals: Vec<i32> = devices.iter().map(|&d| d as i32).collect();
            return Ok(nccl::Comm::init_all(&ordinals)?.into_iter().map(RankComm::Nccl).collect());
        }
        if distinct.len() == 1 {
            let group = Arc::new(LocalGroup::new(devices.len()));
            return Ok((0..devices.len()).map(|rank| RankComm::Staged { group: group.clone(), rank }).collect());
        }
        Err(WorkerError::invalid(
            "tensor_parallel_size",
            format!("ranks on GPUs {devices:?}: each rank needs a GPU of its own (or all share one)"),
        ))
    }

    pub fn rank(&self) -> usize {
        match self {
            RankComm::Nccl(c) => c.rank(),
            RankComm::Staged { rank, .. } => *rank,
        }
    }

    pub fn ranks(&self) -> usize {
        match self {
            RankComm::Nccl(c) => c.ranks(),
            RankComm::Staged { group, .. } => group.ranks(),
        }
    }

    /// Whether a CUDA graph can hold this group's collectives (NCCL's can; staged ones wait on
    /// the host).
    pub fn capturable(&self) -> bool {
        matches!(self, RankComm::Nccl(_))
    }

    /// `t` becomes the sum of every rank's `t`, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        let ty = element_type(t)?;
        match self {
            RankComm::Nccl(c) => {
                let p = device_ptr(t)?;
                // SAFETY: `t` is a contiguous device tensor of `ty` on the communicator's device
                // (the rank's model), alive until its stream has run the queued collective (the
                // stream orders its free after it).
                unsafe { c.all_reduce_sum(p, p, t.elem_count(), ty, stream_of(t)?) }
            }
            RankComm::Staged { group, rank } => {
                if group.ranks() == 1 {
                    return Ok(());
                }
                let mut values = download(t)?;
                group.all_reduce_sum(*rank, &mut values).map_err(|_| staged_abort())?;
                upload_into(values, t)
            }
        }
    }

    /// `out` (`ranks` times `part`'s elements) becomes every rank's `part`, in rank order.
    pub fn all_gather(&self, part: &Tensor, out: &Tensor) -> Result<()> {
        let ty = element_type(part)?;
        let count = part.elem_count();
        if out.elem_count() != count * self.ranks() || out.dtype() != part.dtype() {
            return Err(WorkerError::Engine(format!(
                "tensor parallelism: gathering {count} elements of {} ranks into {} of {:?}",
                self.ranks(),
                out.elem_count(),
                out.dtype()
            )));
        }
        match self {
            RankComm::Nccl(c) => {
                // SAFETY: as in `all_reduce_sum`; `out` holds `ranks * count` elements.
                unsafe { c.all_gather(device_ptr(part)?, device_ptr(out)?, count, ty, stream_of(part)?) }
            }
            RankComm::Staged { group, rank } => {
                let values = download(part)?;
                let mut gathered = vec![0f32; out.elem_count()];
                group
                    .all_gather_columns(*rank, &values, 1, |r| r * count..(r + 1) * count, &mut gathered)
                    .map_err(|_| staged_abort())?;
                upload_into(gathered, out)
            }
        }
    }

    /// A handle that aborts this rank's end from any thread.
    pub fn handle(&self) -> CommHandle {
        match self {
            RankComm::Nccl(c) => CommHandle::Nccl(c.abort_handle()),
            RankComm::Staged { group, .. } => CommHandle::Staged(group.clone()),
        }
    }
}

/// Aborts one rank's end of the group from any thread, so ranks waiting in a collective for a
/// rank that failed return an error instead of waiting forever. Every rank's end must be
/// aborted: an NCCL communicator's abort releases only its own rank's kernels.
#[derive(Clone)]
pub enum CommHandle {
    Nccl(nccl::AbortHandle),
    Staged(Arc<LocalGroup>),
}

impl CommHandle {
    pub fn abort(&self) {
        match self {
            CommHandle::Nccl(h) => h.abort(),
            CommHandle::Staged(group) => group.abort(),
        }
    }

    /// After every rank has left the failed step: a staged group can meet again; an aborted
    /// NCCL communicator cannot (every later collective on it fails).
    pub fn reset(&self) {
        if let CommHandle::Staged(group) = self {
            group.reset();
        }
    }
}

#[cfg(test)]
#[path = "gpu_comm_tests.rs"]
mod tests;
