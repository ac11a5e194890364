//! The model's decode graphs: which steps replay one, capturing the ladder at start-up, and the
//! replay (the mechanism and its invariants are in `kernels::cuda::graph`).
//!
//! A step replays a graph when every sequence decodes one token, the rows fit the largest
//! captured size, and graphs are on (not `--enforce-eager`, not timing each operation with
//! `LUMEN_CUDA_OP_TIMING`, splits merged in the attention launch). Everything after the layers
//! (the final norm of the rows read, the logits, the device's row reduction) runs eagerly, as in
//! vLLM, because it depends on which rows are read and how they are sampled.

use std::time::Instant;

use candle_core::Tensor;

use super::CudaLlama;
use super::memory::device_memory;
use crate::kernels::cuda::attention::AttentionPlan;
use crate::kernels::cuda::graph::{DecodeGraph, GraphInputs, capture_sizes, padded_rows};
use crate::kernels::cuda::pack::DevicePack;
use crate::kernels::cuda::{alloc_tensor, gpu_error};
use crate::model::batch::ForwardBatch;
use crate::{Result, WorkerError};

/// Device memory set aside for the graphs in the memory plan (the KV cache is sized before they
/// are captured); start-up logs what they took.
pub const GRAPH_MEMORY: usize = 256 << 20;

/// The graphs of one model and the fixed buffers they read.
pub struct DecodeGraphs {
    sizes: Vec<usize>,
    /// `graphs[i]` has `sizes[i]` rows.
    graphs: Vec<DecodeGraph>,
    inputs: GraphInputs,
}

impl DecodeGraphs {
    /// The ladder size a step of `batch` replays, if it can replay one.
    fn rows_for(&self, batch: &ForwardBatch) -> Option<usize> {
        let decode_only = !batch.seqs.is_empty() && batch.seqs.iter().all(|s| s.query_len == 1);
        if !decode_only || !batch.hidden_rows.is_empty() {
            return None;
        }
        padded_rows(&self.sizes, batch.num_tokens())
    }

    fn graph(&self, rows: usize) -> Result<&DecodeGraph> {
        let i = self.sizes.iter().position(|&n| n == rows);
        i.map(|i| &self.graphs[i]).ok_or_else(|| WorkerError::Engine(format!("cuda graph: none for {rows} rows")))
    }
}

impl CudaLlama {
    /// Captures a graph for every ladder size up to `max_rows` (the scheduler's most sequences,
    /// within the layer scratch's rows), after the KV cache is in place. Returns the sizes.
    pub(super) fn capture_graphs(&mut self, max_rows: usize) -> Result<Vec<usize>> {
        let started = Instant::now();
        let (free_before, _) = device_memory(self.kernels.stream())?;
        let sizes = capture_sizes(max_rows);
        let Some(&largest) = sizes.last() else { return Ok(sizes) };
        // The residual stream of a replayed step (every graph's `x` is a view of it).
        let device = self.kernels.device().clone();
        let hidden = self.config.hidden_size;
        let residual = alloc_tensor(&device, (largest, hidden).into(), self.kernels.dtype())?;
        let inputs = GraphInputs::new(&device, largest)?;
        let mut graphs = Vec::with_capacity(sizes.len());
        for &rows in &sizes {
            graphs.push(self.capture(rows, &inputs, &residual)?);
        }
        self.graphs = Some(DecodeGraphs { sizes: sizes.clone(), graphs, inputs });
        let (free_after, _) = device_memory(self.kernels.stream())?;
        tracing::info!(
            sizes = sizes.len(),
            largest,
            memory_mib = free_before.saturating_sub(free_after) >> 20,
            reserved_mib = GRAPH_MEMORY >> 20,
            capture_s = started.elapsed().as_secs_f32(),
            "captured the decode graphs"
        );
        Ok(sizes)
    }

    /// Captures the layers of a decode step of `rows` rows reading `inputs`, with `residual` as
    /// the residual stream. The attention launches are captured with a placeholder plan (one
    /// token of context per row); every replay sets the step's own.
    fn capture(&mut self, rows: usize, inputs: &GraphInputs, residual: &Tensor) -> Result<DecodeGraph> {
        let block_size = self.cache.layout.block_size;
        let mut batch = ForwardBatch::default();
        for _ in 0..rows {
            batch.push_seq(&[0], 0, &[0], block_size, true);
        }
        let (heads, kv_heads) = (self.config.num_attention_heads, self.config.num_key_value_heads);
        self.pack.clear();
        let setup = self.kernels.attention_setup();
        let attention = AttentionPlan::new(&mut self.pack, &batch.seqs, heads, kv_heads, setup)?;
        let meta = self.pack.upload(self.kernels.device())?;
        let (ids, positions, slots) = inputs.arrays(rows)?;
        let x = residual.narrow(0, 0, rows).map_err(|e| gpu_error("a residual view", e))?;
        if self.kernels.tunes_gemm() {
            // Once eagerly, so the linear layers tune every shape the graph will hold (timing
            // cannot run inside a capture); it writes only slot 0's K/V, which no request holds.
            self.kernels.begin_step(rows);
            self.embed_into(ids, &x).and_then(|()| self.layers(&x, positions, slots, &attention, &meta))?;
        }
        self.kernels.begin_step(rows);
        self.kernels.begin_capture()?;
        let layers = self.embed_into(ids, &x).and_then(|()| self.layers(&x, positions, slots, &attention, &meta));
        let captured = self.kernels.end_capture();
        let pending = layers?.ok_or_else(|| WorkerError::Engine("cuda graph: a model without layers".into()))?;
        let (graph, launches) = captured?;
        if launches.len() != self.config.num_hidden_layers {
            return Err(WorkerError::Engine(format!(
                "cuda graph: {} attention launches captured for {} layers",
                launches.len(),
                self.config.num_hidden_layers
            )));
        }
        let graph = DecodeGraph::new(graph, launches, rows, x, pending);
        graph.upload()?;
        Ok(graph)
    }

    /// The padded size a step of `batch` replays, or `None` to run it eagerly.
    pub(super) fn graph_rows(&self, batch: &ForwardBatch) -> Option<usize> {
        self.graphs.as_ref().filter(|_| !self.eager).and_then(|g| g.rows_for(batch))
    }

    /// Replays the graph of `rows` rows for a step planned as `attention`, its ids, positions and
    /// slots (padded to `rows`) uploaded at `inputs` one array after the other: returns the
    /// residual stream and the last `down` projection, as the eager layers do.
    pub(super) fn replay(
        &mut self,
        rows: usize,
        attention: &AttentionPlan,
        meta: &DevicePack,
        inputs: u64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let graphs = self.graphs.as_ref().ok_or_else(|| WorkerError::Engine("cuda graph: none captured".into()))?;
        let graph = graphs.graph(rows)?;
        let update = attention
            .decode_update(meta)
            .ok_or_else(|| WorkerError::Engine("cuda graph: a replay needs a decode-only plan".into()))?;
        graphs.inputs.fill(self.kernels.stream(), inputs, rows)?;
        // SAFETY: the plan was made for this model's kernels over the step's sequences, whose
        // block tables and contexts the step validated against this cache.
        unsafe { graph.replay(update.grid, &update.changes)? };
        Ok((graph.x.clone(), Some(graph.pending.clone())))
    }

    /// Runs every step eagerly from now on (`true`) or replays graphs where they apply again.
    #[cfg(test)]
    pub(super) fn set_eager(&mut self, eager: bool) {
        self.eager = eager;
    }

    /// The captured sizes (empty when graphs are off).
    pub fn graph_sizes(&self) -> &[usize] {
        self.graphs.as_ref().map_or(&[], |g| &g.sizes)
    }
}

/// Whether graphs may be captured at all: not while each operation is timed
/// (`LUMEN_CUDA_OP_TIMING`: events between kernels) nor when splits merge in a second launch
/// (`LUMEN_CUDA_SPLIT_MERGE=launch`, which a captured launch cannot switch to).
pub(super) fn graphs_allowed(merge_splits: bool, op_timing: bool) -> bool {
    merge_splits && !op_timing
}
