//! Llama hyper-parameters, read from a Hugging Face `config.json` (`hf_config.rs`) or from GGUF
//! metadata (`gguf.rs`), and what the forward pass derives from them: the rotary table (`rope/`)
//! and the longest sequence the model can run exactly.

use std::path::Path;

use serde::Deserialize;

use super::rope::{Rope, RopeFrequencies};
use crate::kernels::cpu::ops::RopeTable;
use crate::{Result, TokenId, WorkerError};

/// The shape and constants of a Llama-architecture model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// `rope_theta` and its scaling (`rope_type`).
    pub rope: Rope,
    /// The context length the model was trained for (the default `max_model_len`).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenId>,
    /// End-of-sequence ids from the config (generation_config.json adds to these).
    pub eos_token_ids: Vec<TokenId>,
    /// The dtype the weights were saved in (`bfloat16`, `float16`, `float32`), when known.
    pub dtype: Option<String>,
    /// Attention over only the last tokens, which Lumen does not implement (see
    /// [`LlamaConfig::check_max_model_len`]).
    pub sliding_window: Option<SlidingWindow>,
    /// The checkpoint's weight quantization (`quantization_config`), if any (see `quant`).
    pub quantization: Option<super::quant::Quantization>,
}

/// A window of `size` tokens each position attends to (Mistral's `sliding_window`). Lumen attends
/// to the whole sequence, which is the same computation only while no sequence is longer.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// The key that set it, for messages.
    pub key: &'static str,
}

/// `eos_token_id` is a number in some configs and a list in others.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum IdOrIds {
    One(TokenId),
    Many(Vec<TokenId>),
}

impl IdOrIds {
    pub(crate) fn into_vec(self) -> Vec<TokenId> {
        match self {
            IdOrIds::One(id) => vec![id],
            IdOrIds::Many(ids) => ids,
        }
    }
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` (see `hf_config.rs` for what is read and refused).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| WorkerError::model_file(path, format!("cannot read: {e}")))?;
        Self::from_hf_json(&text).map_err(|e| match e {
            WorkerError::ModelConfig(_)
            | WorkerError::UnsupportedConfig { .. }
            | WorkerError::ConflictingConfig { .. } => WorkerError::model_file(path, e.to_string()),
            other => other,
        })
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let config = super::hf_config::parse(text)?;
        config.check()?;
        Ok(config)
    }

    /// Rejects shapes the model cannot run with (zero sizes, heads that do not divide evenly).
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(WorkerError::ModelConfig(reason));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.head_dim == 0 {
            return bad("attention heads and head_dim must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        Ok(())
    }

    /// Refuses a `max_model_len` at which this model's math would differ from Lumen's: beyond a
    /// sliding window, positions would stop seeing the oldest tokens.
    pub fn check_max_model_len(&self, max_model_len: usize) -> Result<()> {
        match &self.sliding_window {
            Some(w) if max_model_len > w.size => Err(WorkerError::UnsupportedConfig {
                key: w.key.to_string(),
                value: w.size.to_string(),
                reason: format!(
                    "sliding-window attention (each token sees only the last {} tokens) is not implemented, and \
                     max_model_len {max_model_len} would let sequences outgrow the window: serve with \
                     --max-model-len {} or less",
                    w.size, w.size
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Width of the query projection output (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs (`kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Rotary inverse frequencies (`head_dim / 2`) and attention factor for a server whose longest
    /// sequence is `max_model_len` (see `rope/mod.rs`).
    pub fn rope_frequencies(&self, max_model_len: usize) -> RopeFrequencies {
        self.rope.frequencies(self.head_dim, self.max_position_embeddings, max_model_len)
    }

    /// The rotary table for positions `0..max_model_len`: the CPU path reads it, the CUDA path
    /// uploads it.
    pub fn rope_table(&self, max_model_len: usize) -> RopeTable {
        let f = self.rope_frequencies(max_model_len);
        RopeTable::scaled(&f.inv_freq, f.attention_factor, max_model_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn parses_llama31_config_with_llama3_rope_scaling() {
        let c = LlamaConfig::from_hf_json(LLAMA31_8B).unwrap();
        assert_eq!((c.num_hidden_layers, c.num_key_value_heads, c.head_dim), (32, 8, 128));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.kv_dim(), 1024);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        let f = c.rope_frequencies(4096);
        let inv = f.inv_freq;
        assert_eq!((inv.len(), f.attention_factor), (64, 1.0));
        // The highest frequencies (short wavelengths) are untouched...
        assert!((inv[0] - 1.0).abs() < 1e-6);
        // ...the lowest are divided by the factor 8.
        let unscaled_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!(((inv[63] as f64) - unscaled_last / 8.0).abs() / (unscaled_last / 8.0) < 1e-5);
        // and the ramp in between is monotonic.
        assert!(inv.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn a_sliding_window_limits_max_model_len() {
        let mut c = LlamaConfig::from_hf_json(LLAMA31_8B).unwrap();
        assert!(c.check_max_model_len(131072).is_ok());
        c.sliding_window = Some(SlidingWindow { size: 4096, key: "sliding_window" });
        assert!(c.check_max_model_len(4096).is_ok());
        let err = c.check_max_model_len(4097).unwrap_err().to_string();
        assert!(err.contains("`sliding_window` = 4096") && err.contains("--max-model-len 4096"), "{err}");
    }
}
