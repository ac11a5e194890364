//! The draft model of a `speculative_config` with `draft_model`: found and opened like the
//! target (a GGUF file, a Hugging Face directory, a hub id), checked against it, and loaded on
//! the target's device with a KV cache of as many blocks as the target's (`spec::draft_model`).
//!
//! Invariants: a draft is loaded only when it can propose for the target: the same vocabulary
//! (size and tokens), positions up to the target's `max_model_len`, and no tensor parallelism of
//! its own. Its cache memory comes out of the target's budget (`--kv-cache-memory` on the CPU,
//! `--gpu-memory-utilization` on a GPU), split so both caches hold the same number of tokens.

use super::options::EngineOptions;
use crate::model::location::resolve_model;
use crate::model::quant::Quantization;
use crate::model::{LlamaConfig, TensorSource};
use crate::tokenizer::Tokenizer;
use crate::{Result, WorkerError};

/// An opened draft model, checked against its target, not yet loaded.
pub struct DraftParts {
    pub name: String,
    pub config: LlamaConfig,
    pub source: Box<dyn TensorSource>,
    pub quantization: Quantization,
}

fn invalid(message: String) -> WorkerError {
    WorkerError::invalid("speculative_config", message)
}

/// Opens the draft model `opts` names, if any, and checks that it fits the target (`config`,
/// `tokenizer`, serving `max_model_len` tokens).
pub fn open_draft(
    opts: &EngineOptions,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    max_model_len: usize,
) -> Result<Option<DraftParts>> {
    let Some(spec) = &opts.speculative_config else { return Ok(None) };
    let Some(name) = spec.draft_model() else { return Ok(None) };
    let location = resolve_model(name, opts.load_format)
        .map_err(|e| invalid(format!("the draft model {name:?} cannot be found: {e}")))?;
    let (draft_config, draft_tokenizer, source) = super::load::open_model(&location, opts)
        .map_err(|e| invalid(format!("the draft model {name:?} cannot be opened: {e}")))?;
    if draft_config.vocab_size != config.vocab_size {
        return Err(invalid(format!(
            "the draft model {name:?} has a vocabulary of {} tokens and the target {}: a draft must share the target's tokenizer",
            draft_config.vocab_size, config.vocab_size
        )));
    }
    if let Some(id) = first_differing_token(tokenizer, &draft_tokenizer) {
        return Err(invalid(format!(
            "the draft model {name:?}'s tokenizer differs from the target's (token id {id} is {:?} there and {:?} here): a draft must share the target's tokenizer",
            draft_tokenizer.id_to_token(id),
            tokenizer.id_to_token(id)
        )));
    }
    if draft_config.max_position_embeddings < max_model_len {
        return Err(invalid(format!(
            "the draft model {name:?} handles {} positions, fewer than max_model_len {max_model_len}: lower --max-model-len",
            draft_config.max_position_embeddings
        )));
    }
    let quantization = Quantization::resolve(draft_config.quantization.as_ref(), spec.quantization.as_deref())
        .map_err(|e| invalid(format!("the draft model {name:?}: {e}")))?;
    Ok(Some(DraftParts { name: name.to_string(), config: draft_config, source, quantization }))
}

/// The first token id (of a spread of ids over the whole vocabulary, and the special tokens)
/// that the two tokenizers spell differently.
fn first_differing_token(a: &Tokenizer, b: &Tokenizer) -> Option<u32> {
    let vocab = a.vocab_size().max(b.vocab_size()) as u32;
    let step = (vocab / 4096).max(1);
    let specials = a.eos_token_ids().iter().chain(b.eos_token_ids()).copied().chain(a.bos_token_id());
    (0..vocab).step_by(step as usize).chain(specials).find(|&id| a.id_to_token(id) != b.id_to_token(id))
}
