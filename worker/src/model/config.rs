//! Llama hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata, and the
//! rotary-embedding frequencies they imply (including Llama-3.1's `llama3` rope scaling).

use std::path::Path;

use serde::Deserialize;

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
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// The context length the model was trained for (the default `max_model_len`).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenId>,
    /// End-of-sequence ids from the config (generation_config.json adds to these).
    pub eos_token_ids: Vec<TokenId>,
    /// The dtype the weights were saved in (`bfloat16`, `float16`, `float32`), when known.
    pub torch_dtype: Option<String>,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama-3.1's scheme: low frequencies divided by `factor`, a smooth ramp in between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f32 },
    /// Per-frequency divisors, as GGUF files store them in the `rope_freqs.weight` tensor.
    Factors(Vec<f32>),
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<TokenId>,
    eos_token_id: Option<IdOrIds>,
    torch_dtype: Option<String>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
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
    /// Reads a Hugging Face `config.json`; rejects architectures other than Llama's.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| WorkerError::model_file(path, format!("cannot read: {e}")))?;
        Self::from_hf_json(&text).map_err(|e| match e {
            WorkerError::ModelConfig(reason) => WorkerError::model_file(path, reason),
            other => other,
        })
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| WorkerError::ModelConfig(format!("not a valid Llama config.json: {e}")))?;
        let is_llama = raw.model_type.as_deref() == Some("llama")
            || raw.architectures.iter().any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !is_llama {
            return Err(WorkerError::ModelConfig(format!(
                "unsupported architecture {:?} (model_type {:?}); Lumen serves Llama-architecture models",
                raw.architectures, raw.model_type
            )));
        }
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_hf_rope_scaling(&v)?),
        };
        let heads = raw.num_attention_heads;
        let config = LlamaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size.checked_div(heads).unwrap_or(0)),
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta: raw.rope_theta as f32,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(IdOrIds::into_vec).unwrap_or_default(),
            torch_dtype: raw.torch_dtype,
        };
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

    /// Width of the query projection output (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs (`kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Rotary inverse frequencies, `head_dim / 2` of them, with rope scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f64> =
            (0..half).map(|i| 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / self.head_dim as f64)).collect();
        match &self.rope_scaling {
            None => base.iter().map(|&f| f as f32).collect(),
            Some(RopeScaling::Linear { factor }) => base.iter().map(|&f| (f / *factor as f64) as f32).collect(),
            Some(RopeScaling::Factors(factors)) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(&f, &d)| (f / d as f64) as f32)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64);
                let old_len = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
        }
    }
}

fn parse_hf_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
    let num = |key: &str| v.get(key).and_then(|x| x.as_f64());
    let need = |key: &str| {
        num(key).ok_or_else(|| WorkerError::ModelConfig(format!("rope_scaling of type {kind} needs `{key}`")))
    };
    match kind {
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")? as f32,
            low_freq_factor: need("low_freq_factor")? as f32,
            high_freq_factor: need("high_freq_factor")? as f32,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        }),
        "linear" => Ok(RopeScaling::Linear { factor: need("factor")? as f32 }),
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        other => Err(WorkerError::ModelConfig(format!(
            "unsupported rope_scaling type `{other}` (supported: llama3, linear)"
        ))),
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
        let inv = c.rope_inv_freq();
        assert_eq!(inv.len(), 64);
        // The highest frequencies (short wavelengths) are untouched...
        assert!((inv[0] - 1.0).abs() < 1e-6);
        // ...the lowest are divided by the factor 8.
        let unscaled_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!(((inv[63] as f64) - unscaled_last / 8.0).abs() / (unscaled_last / 8.0) < 1e-5);
        // and the ramp in between is monotonic.
        assert!(inv.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn rejects_other_architectures_and_bad_head_counts() {
        let gpt2 = r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":8,
                       "num_hidden_layers":1,"num_attention_heads":2}"#;
        assert!(
            matches!(LlamaConfig::from_hf_json(gpt2), Err(WorkerError::ModelConfig(m)) if m.contains("unsupported architecture"))
        );
        let bad_gqa = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,
                       "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#;
        assert!(
            matches!(LlamaConfig::from_hf_json(bad_gqa), Err(WorkerError::ModelConfig(m)) if m.contains("multiple"))
        );
    }
}
