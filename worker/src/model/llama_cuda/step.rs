//! The model's step as the engine drives it: the [`Model`] trait over [`CudaLlama`] (one step
//! queued, the host's work overlapped with the device's, the reduced rows read back, timed).

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;

use super::{CudaLlama, readback};
use crate::Result;
use crate::kernels::cuda::gpu_error;
use crate::model::batch::ForwardBatch;
use crate::model::{LlamaConfig, Model};
use crate::sampling::reduce::{ReducedRows, Reduction, RowPlan};

impl Model for CudaLlama {
    fn config(&self) -> &LlamaConfig {
        self.full_config()
    }

    fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    fn block_size(&self) -> usize {
        self.cache.layout.block_size
    }

    fn describe(&self) -> String {
        let ordinal = match self.kernels.device().location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        };
        let dtype = self.kernels.dtype();
        let weights = if self.weights.has_fp8() {
            let products = if self.kernels.fp8_tensor_cores() { "FP8 tensor cores" } else { "dequantized" };
            format!("FP8 projection weights ({products} beyond the GEMV), {dtype:?} activations and KV cache")
        } else {
            format!("{dtype:?} weights and KV cache")
        };
        format!("cuda:{ordinal} ({weights}, {} SMs)", self.kernels.num_sms())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<&[f32]> {
        let mut full = std::mem::take(&mut self.full);
        let result = self.forward_reduced(batch, &[], &mut full);
        self.full = full;
        result.map(|()| self.full.logits.as_slice())
    }

    fn reduces_on_device(&self) -> bool {
        true
    }

    fn hidden_states(&self) -> &[f32] {
        &self.hidden
    }

    fn forward_reduced(&mut self, batch: &ForwardBatch, plans: &[RowPlan], out: &mut ReducedRows) -> Result<()> {
        self.forward_overlapped(batch, plans, out, &mut || {})
    }

    fn forward_overlapped(
        &mut self,
        batch: &ForwardBatch,
        plans: &[RowPlan],
        out: &mut ReducedRows,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<()> {
        let mut meanwhile = Meanwhile { work: Some(meanwhile), ms: 0.0 };
        let result = self.step(batch, plans, out, &mut meanwhile);
        meanwhile.call();
        result
    }
}

/// The engine's host work for the time the device runs a step: called once, as soon as the
/// step's layers are queued (or at the end of a step that queues none).
pub(super) struct Meanwhile<'a> {
    work: Option<&'a mut dyn FnMut()>,
    /// How long the work took, ms (0 before it ran).
    ms: f64,
}

impl Meanwhile<'_> {
    pub(super) fn call(&mut self) {
        if let Some(work) = self.work.take() {
            let started = Instant::now();
            work();
            self.ms = started.elapsed().as_secs_f64() * 1e3;
        }
    }
}

impl CudaLlama {
    /// Whether `batch` fits this model: its tokens, positions, blocks.
    pub fn validate(&self, batch: &ForwardBatch) -> Result<()> {
        let (blocks, block_size) = (self.cache.num_blocks, self.cache.layout.block_size);
        batch.validate(self.vocab_size(), self.rope.max_positions(), blocks, block_size)
    }

    /// One step: queue, wait, read back, time.
    fn step(
        &mut self,
        batch: &ForwardBatch,
        plans: &[RowPlan],
        out: &mut ReducedRows,
        meanwhile: &mut Meanwhile<'_>,
    ) -> Result<()> {
        self.validate(batch)?;
        out.clear();
        if batch.num_tokens() == 0 {
            return Ok(());
        }
        let rows = batch.logits_rows.len();
        let reduce = plans.len() == rows && plans.iter().any(|p| p.reduction != Reduction::Full);
        let plans = if reduce { plans } else { &[] };
        let decode_only = batch.seqs.iter().all(|s| s.query_len == 1);
        let started = Instant::now();
        let stream = self.kernels.stream().clone();
        let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| gpu_error("event", e));
        let gpu_start = event()?;
        let result = self.run(batch, plans, meanwhile)?;
        let gpu_end = event()?;
        let (overlap_ms, host_ms) = (meanwhile.ms, started.elapsed().as_secs_f64() * 1e3 - meanwhile.ms);
        let Some((logits, reduced)) = result else {
            // Nothing was read back, so the step may still run: not timed (no wait for it).
            self.ops.discard();
            return Ok(());
        };
        if !self.reads_outputs() {
            // A tensor-parallel rank other than the first: its part ends with the logits' gather.
            self.kernels.stream().synchronize().map_err(|e| gpu_error("synchronizing", e))?;
            self.ops.discard();
            return Ok(());
        }
        readback::read_rows(self.kernels.device(), self.vocab_size(), &logits, reduced.as_ref(), plans, out)?;
        let gpu_ms = gpu_start.elapsed_ms(&gpu_end).map_err(|e| gpu_error("event timing", e))? as f64;
        let timing = if decode_only { &mut self.timing } else { &mut self.prefill_timing };
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        timing.record(batch.num_tokens(), [wall_ms, host_ms, overlap_ms, gpu_ms], &mut self.ops)?;
        Ok(())
    }
}
