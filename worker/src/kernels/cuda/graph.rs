//! CUDA graphs of decode steps: the layers of a step of one token per sequence, captured once
//! per batch size of a ladder and replayed, so a step costs one launch on the host and the GPU
//! runs its ~300 kernels back to back (vLLM's "CUDA graph mode"; `--enforce-eager` turns it off).
//!
//! What a graph owns and the invariants that make a replay equal the eager step:
//! - Every address a captured kernel reads is fixed: the step's token ids, positions and slots are
//!   copied into one buffer of the model's before each replay ([`GraphInputs`]), the residual
//!   stream and the layer outputs come from the layer scratch, and cuBLAS writes there too (see
//!   `blas.rs`); nothing is allocated inside the layers (an allocation while capturing fails the
//!   capture). The KV cache and the weights never move.
//! - A batch is padded to the next size of the ladder: padding rows take token 0, position 0 and
//!   the slot [`PAD_SLOT`], whose key and value are not written (`ops.cu`); attention, which
//!   alone mixes rows, never reads them (its tiles name the real sequences only), and no result
//!   of theirs is read back.
//! - Attention is the one kernel whose launch depends on the step beyond its size (its tiles,
//!   block tables and split over the longest context): each layer's attention node is found
//!   while capturing ([`last_captured_node`]) and updated before a replay with the step's plan
//!   (grid and arguments, [`CapturedLaunch::update`]); a graph's split partials have the largest
//!   size a split can take, so the scratch layout does not depend on the split.
//! - The graphs, the scratch and the inputs buffer belong to one model on one stream; a replay
//!   runs in stream order like the eager kernels, so the step's reads back wait for it.

use candle_core::Tensor;
use cudarc::driver::sys;
use cudarc::driver::{CudaGraph, CudaStream};

use super::gpu_error;
use super::launch::Params;
use crate::{Result, WorkerError};

/// The slot of a padding row: its key and value are not written (`PAD_SLOT` in ops.cu).
pub const PAD_SLOT: u32 = u32::MAX;

/// The batch sizes graphs are captured for, up to `max_rows`: 1, 2, 4, then every multiple of 8
/// (vLLM's ladder), so padding costs at most 7 rows.
pub fn capture_sizes(max_rows: usize) -> Vec<usize> {
    [1, 2, 4].into_iter().chain((8..).step_by(8)).take_while(|&n| n <= max_rows).collect()
}

/// The smallest size of the ladder holding `rows` rows (the rows the layer scratch must hold
/// for graphs up to `rows`).
pub fn ladder_top(rows: usize) -> usize {
    match rows {
        0..=2 => rows.max(1),
        3..=4 => 4,
        _ => rows.next_multiple_of(8),
    }
}

/// The ladder size a decode step of `rows` rows replays, if any.
pub fn padded_rows(sizes: &[usize], rows: usize) -> Option<usize> {
    sizes.iter().copied().find(|&n| n >= rows && rows > 0)
}

/// A kernel launch recorded while capturing: its graph node and the parameters it was captured
/// with.
#[derive(Clone)]
pub struct CapturedLaunch {
    node: sys::CUgraphNode,
    func: sys::CUfunction,
    block: (u32, u32, u32),
    shared_bytes: u32,
    params: Params,
}

// SAFETY: the handles are plain driver handles, used only by the owner of the launch (graphs
// are not accessed from two threads at once: every use goes through `&mut` of the model that
// owns them, which moves between threads but is never shared).
unsafe impl Send for CapturedLaunch {}

impl CapturedLaunch {
    pub fn new(
        node: sys::CUgraphNode,
        func: sys::CUfunction,
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: Params,
    ) -> CapturedLaunch {
        CapturedLaunch { node, func, block, shared_bytes, params }
    }

    /// Sets the node of `exec` to this launch with `grid` and the parameters `changes` replaces
    /// (index in the kernel's parameter list, new value).
    ///
    /// # Safety
    /// The new parameters must be valid for the kernel as the launch it replaces was (the
    /// caller's plan was made for the kernel), and `exec` must be the graph the node was captured
    /// into, not running on another thread.
    pub unsafe fn update(&self, exec: sys::CUgraphExec, grid: (u32, u32, u32), changes: &[(usize, u64)]) -> Result<()> {
        let mut params = self.params.clone();
        for &(index, value) in changes {
            params.set(index, value);
        }
        let mut pointers = params.pointers();
        let node_params = sys::CUDA_KERNEL_NODE_PARAMS {
            func: self.func,
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: self.block.0,
            blockDimY: self.block.1,
            blockDimZ: self.block.2,
            sharedMemBytes: self.shared_bytes,
            kernelParams: pointers.as_mut_ptr(),
            extra: std::ptr::null_mut(),
            kern: std::ptr::null_mut(),
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: the node belongs to the graph `exec` was instantiated from (the caller's
        // promise); the parameters live until the call returns (the driver copies them).
        unsafe { sys::cuGraphExecKernelNodeSetParams_v2(exec, self.node, &node_params) }
            .result()
            .map_err(|e| gpu_error("updating a graph's attention launch", e))
    }
}

/// The graph node the last work captured on `stream` added (the one the next captured work will
/// depend on).
pub fn last_captured_node(stream: &CudaStream) -> Result<sys::CUgraphNode> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let mut id = 0u64;
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut deps: *const sys::CUgraphNode = std::ptr::null();
    let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: every out-pointer is valid; `deps` is read before any other call on the stream.
    unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream.cu_stream(),
            &mut status,
            &mut id,
            &mut graph,
            &mut deps,
            &mut edges,
            &mut count,
        )
    }
    .result()
    .map_err(|e| gpu_error("reading the capture's last node", e))?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE || count != 1 || deps.is_null() {
        return Err(WorkerError::Engine(format!(
            "cuda graph: expected one node after a captured launch, found {count} (capture {status:?})"
        )));
    }
    // SAFETY: `deps` points to `count` (1) nodes owned by the capture.
    Ok(unsafe { *deps })
}

/// The fixed device buffer a decode graph reads its token ids, positions and slots from: three
/// arrays of the graph's padded size, one after the other.
pub struct GraphInputs {
    buffer: Tensor,
    capacity: usize,
}

impl GraphInputs {
    /// Room for graphs of up to `rows` rows.
    pub fn new(device: &candle_core::Device, rows: usize) -> Result<GraphInputs> {
        let buffer = super::alloc_tensor(device, (3 * rows).into(), candle_core::DType::U32)?;
        Ok(GraphInputs { buffer, capacity: rows })
    }

    /// The addresses of the (ids, positions, slots) arrays for a graph of `rows` rows.
    pub fn arrays(&self, rows: usize) -> Result<(u64, u64, u64)> {
        if rows > self.capacity {
            return Err(WorkerError::Engine(format!("cuda graph: {rows} rows, inputs for {}", self.capacity)));
        }
        let base = super::device_ptr(&self.buffer)?;
        let bytes = 4 * rows as u64;
        Ok((base, base + bytes, base + 2 * bytes))
    }

    /// Copies `3 * rows` u32 from `src` (the step's uploaded ids, positions and slots, in that
    /// order) into the buffer, in stream order.
    pub fn fill(&self, stream: &CudaStream, src: u64, rows: usize) -> Result<()> {
        let (dst, _, _) = self.arrays(rows)?;
        stream.context().bind_to_thread().map_err(|e| gpu_error("binding the context", e))?;
        // SAFETY: both ranges are device memory of 12 * rows bytes (checked capacity; the
        // caller's pack holds the three arrays at `src`); the copy is ordered on the stream.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, 12 * rows, stream.cu_stream()) }
            .result()
            .map_err(|e| gpu_error("copying a graph's inputs", e))
    }
}

/// The captured layers of a decode step of `rows` (padded) rows.
pub struct DecodeGraph {
    graph: CudaGraph,
    /// Each layer's attention launch, in layer order.
    attention: Vec<CapturedLaunch>,
    pub rows: usize,
    /// The residual stream after the last layer but its `down` projection, and that projection
    /// (`[rows, hidden]` each): what the final norm reads after a replay.
    pub x: Tensor,
    pub pending: Tensor,
}

// SAFETY: as for `CapturedLaunch`: the graph is owned by one model and used by one thread at a
// time (CUDA asks only that calls on one graph be serialised).
unsafe impl Send for DecodeGraph {}

impl DecodeGraph {
    pub fn new(graph: CudaGraph, attention: Vec<CapturedLaunch>, rows: usize, x: Tensor, pending: Tensor) -> Self {
        DecodeGraph { graph, attention, rows, x, pending }
    }

    /// Points every layer's attention at the step's plan, then replays the graph on its stream.
    ///
    /// # Safety
    /// `grid` and `changes` must come from a plan for the attention kernel the graph captured,
    /// over sequences whose block tables and contexts lie in the cache the graph was captured
    /// with.
    pub unsafe fn replay(&self, grid: (u32, u32, u32), changes: &[(usize, u64)]) -> Result<()> {
        for launch in &self.attention {
            // SAFETY: forwarded from the caller; the nodes were captured into this graph.
            unsafe { launch.update(self.graph.cu_graph_exec(), grid, changes)? };
        }
        self.graph.launch().map_err(|e| gpu_error("replaying a decode graph", e))
    }

    /// Uploads the graph's work to the device, so its first replay costs what later ones do.
    pub fn upload(&self) -> Result<()> {
        self.graph.upload().map_err(|e| gpu_error("uploading a decode graph", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_pads_a_batch_by_at_most_seven_rows() {
        let sizes = capture_sizes(256);
        assert_eq!(&sizes[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(*sizes.last().unwrap(), 256);
        assert_eq!(sizes.len(), 3 + 32);
        for rows in 1..=256 {
            let padded = padded_rows(&sizes, rows).unwrap();
            assert!(padded >= rows && padded - rows <= 7, "{rows} -> {padded}");
        }
        assert_eq!(padded_rows(&sizes, 3), Some(4));
        assert_eq!(padded_rows(&sizes, 257), None);
        assert_eq!(padded_rows(&sizes, 0), None);
        assert_eq!(capture_sizes(12), vec![1, 2, 4, 8]);
        assert_eq!([1, 2, 3, 5, 8, 9, 250].map(ladder_top), [1, 2, 4, 8, 8, 16, 256]);
        assert_eq!(capture_sizes(ladder_top(250)).last(), Some(&256));
    }
}
