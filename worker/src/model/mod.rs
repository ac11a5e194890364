//! The model: hyper-parameters, weight sources (GGUF, Hugging Face safetensors, hub, dummy) and
//! the Llama forward pass over a packed batch.

pub mod batch;
pub mod config;
pub mod cpu_weights;
pub mod dummy;
pub mod generation_config;
pub mod gguf;
mod hf_config;
pub mod hub;
pub mod llama_cpu;
#[cfg(feature = "cuda")]
pub mod llama_cuda;
pub mod location;
pub mod quant;
pub mod rope;
pub mod safetensors;
pub mod source;

pub use config::{LlamaConfig, SlidingWindow};
pub use dummy::DummySource;
pub use generation_config::GenerationConfig;
pub use hub::{HubFileSet, HubModelId, HubSettings};
pub use location::{LoadFormat, ModelLocation, resolve_model};
pub use rope::{Rope, RopeFrequencies, RopeScaling};
pub use safetensors::SafetensorsSource;
pub use source::{RawTensor, TensorBytes, TensorDType, TensorSource};

pub use batch::{BatchSeq, ForwardBatch};

/// A model that runs engine steps: a forward pass over a packed batch, on one device, with the
/// KV cache it owns.
pub trait Model: Send {
    fn config(&self) -> &LlamaConfig;
    /// Blocks in the KV cache.
    fn num_blocks(&self) -> usize;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// Device, kernels and weight formats, for logs.
    fn describe(&self) -> String;
    /// Runs the batch, writing its K/V into the cache; returns `logits_rows.len()` rows of
    /// `vocab_size` logits.
    fn forward(&mut self, batch: &ForwardBatch) -> crate::Result<&[f32]>;

    /// The final-norm hidden states of the last forward's `hidden_rows` (pooling), row after
    /// row: `hidden_rows.len() * hidden_size` values. Only those rows leave the device.
    fn hidden_states(&self) -> &[f32];

    /// True when [`Model::forward_reduced`] reduces rows where the logits are (worth planning).
    fn reduces_on_device(&self) -> bool {
        false
    }

    /// Runs the batch and returns logits row `i` reduced as `plans[i]` says (see
    /// `sampling::reduce`); rows without a plan, and every row of a model that does not reduce,
    /// come back in full.
    fn forward_reduced(
        &mut self,
        batch: &ForwardBatch,
        plans: &[crate::sampling::reduce::RowPlan],
        out: &mut crate::sampling::reduce::ReducedRows,
    ) -> crate::Result<()> {
        let _ = plans;
        let vocab = self.config().vocab_size;
        let logits = self.forward(batch)?;
        out.set_full(logits, vocab);
        Ok(())
    }

    /// [`Model::forward_reduced`], calling `meanwhile` once while the step runs: a model whose
    /// device runs apart from the host (a GPU) calls it after the step's work is queued and
    /// before waiting for it, so host work done there overlaps the device's; a model computed on
    /// the host calls it first.
    fn forward_overlapped(
        &mut self,
        batch: &ForwardBatch,
        plans: &[crate::sampling::reduce::RowPlan],
        out: &mut crate::sampling::reduce::ReducedRows,
        meanwhile: &mut dyn FnMut(),
    ) -> crate::Result<()> {
        meanwhile();
        self.forward_reduced(batch, plans, out)
    }
}
