//! A Hugging Face `config.json` read into a [`LlamaConfig`], as transformers 5 writes it and as
//! older versions did, with every setting that would change the forward pass in a way Lumen's
//! Llama does not implement refused by name: never a fallback.
//!
//! Two spellings, one answer (old and new transformers read the same value, or the load fails
//! naming both keys):
//! - rotary settings: `rope_parameters` (transformers 5: `rope_theta`, `rope_type` and the type's
//!   parameters in one dict, or one such dict per layer type, `{"full_attention": {...}, ...}`,
//!   which must then all be equal: Lumen has one rotary table) or top-level `rope_theta` +
//!   `rope_scaling` (older; `type` for `rope_type`). With both present, the type, every parameter
//!   and theta must agree. `rope_theta` defaults to 10,000 only when neither spelling has it.
//! - `original_max_position_embeddings` inside the rope dict or at the top level.
//! - `dtype` (transformers 5) or `torch_dtype` (older).
//!
//! transformers 5's `LlamaConfig` key by key (and `MistralConfig`'s, the other architecture that
//! runs as Llama; `model_type` must be `llama` or `mistral`, `architectures` among
//! `LlamaForCausalLM`, `MistralForCausalLM`):
//! - read: `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
//!   `num_attention_heads` (required); `num_key_value_heads` (default: the head count; Mistral's
//!   default is 8), `head_dim` (default `hidden_size / num_attention_heads`), `rms_norm_eps`
//!   (1e-6), `max_position_embeddings` (2048; Mistral 131072), `tie_word_embeddings` (false),
//!   `bos_token_id`, `eos_token_id`, the rotary keys above (types in `rope/`).
//! - refused unless neutral: `hidden_act` other than `silu` (or its alias `swish`);
//!   `attention_bias` / `mlp_bias` true; `partial_rotary_factor` other than 1 (also inside the
//!   rope dict); `layer_types` with any entry but `full_attention`; `sliding_window` (Mistral's
//!   default 4096 when absent; off with `use_sliding_window: false`) once `max_model_len` exceeds
//!   it, checked when the engine is built ([`LlamaConfig::check_max_model_len`]).
//! - refused, from neighbouring architectures that a Llama-labelled config may carry and that
//!   change the math: `qk_norm` / `use_qk_norm` true, `attn_logit_softcapping`,
//!   `final_logit_softcapping`, `num_local_experts` / `num_experts` (mixture of experts).
//! - `quantization_config`: read by `quant` (FP8, AWQ, GPTQ), every other scheme refused there.
//! - ignored, because they do not change inference: `pretraining_tp` (transformers splits no
//!   matmul by it any more; it was the same sum in slices), `attention_dropout`,
//!   `initializer_range`, `use_cache`, `pad_token_id`, and keys transformers' Llama does not read.

use serde_json::{Map, Value};

use super::config::{IdOrIds, LlamaConfig, SlidingWindow};
use super::rope::{Rope, RopeParams};
use crate::{Result, WorkerError};

/// Architectures that run as Llama, by `model_type` and by `architectures` entry.
const MODEL_TYPES: &[&str] = &["llama", "mistral"];
const ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// When a key leaves the forward pass as Lumen computes it.
#[derive(Clone, Copy)]
enum Neutral {
    /// Absent, null or false.
    False,
    /// Absent or null.
    Null,
    /// Absent, null or 1.
    One,
}

/// Keys refused unless neutral, with what they would change.
const REFUSED: &[(&str, Neutral, &str)] = &[
    ("attention_bias", Neutral::False, "biases on the query/key/value/output projections are not implemented"),
    ("mlp_bias", Neutral::False, "biases on the gate/up/down projections are not implemented"),
    ("qk_norm", Neutral::False, "normalising queries and keys is not implemented"),
    ("use_qk_norm", Neutral::False, "normalising queries and keys is not implemented"),
    ("partial_rotary_factor", Neutral::One, "rotary embeddings on part of each head are not implemented"),
    ("attn_logit_softcapping", Neutral::Null, "capping attention scores is not implemented"),
    ("final_logit_softcapping", Neutral::Null, "capping the output logits is not implemented"),
    ("num_local_experts", Neutral::Null, "mixture-of-experts layers are not implemented"),
    ("num_experts", Neutral::Null, "mixture-of-experts layers are not implemented"),
];

/// The top-level object of a config.json, with typed getters whose errors name the key.
struct Keys<'a>(&'a Map<String, Value>);

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bad(key: &str, value: &Value, reason: &str) -> WorkerError {
        WorkerError::UnsupportedConfig { key: key.into(), value: value.to_string(), reason: reason.into() }
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| Self::bad(key, v, "must be an integer")),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| WorkerError::ModelConfig(format!("`{key}` is missing")))
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| Self::bad(key, v, "must be a number")),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| Self::bad(key, v, "must be a string")),
        }
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_object().map(Some).ok_or_else(|| Self::bad(key, v, "must be an object")),
        }
    }

    fn is_neutral(&self, key: &str, neutral: Neutral) -> bool {
        match (self.get(key), neutral) {
            (None, _) => true,
            (Some(v), Neutral::False) => v.as_bool() == Some(false),
            (Some(v), Neutral::One) => v.as_f64() == Some(1.0),
            (Some(_), Neutral::Null) => false,
        }
    }
}

/// Parses the text of a config.json.
pub(crate) fn parse(text: &str) -> Result<LlamaConfig> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| WorkerError::ModelConfig(format!("not valid JSON: {e}")))?;
    let map = root.as_object().ok_or_else(|| WorkerError::ModelConfig("config.json is not a JSON object".into()))?;
    let keys = Keys(map);
    let mistral = check_architecture(&keys)?;
    refuse_unimplemented(&keys)?;

    let heads = keys.required("num_attention_heads")?;
    let hidden_size = keys.required("hidden_size")?;
    let head_dim = keys.usize("head_dim")?.unwrap_or(hidden_size.checked_div(heads).unwrap_or(0));
    let max_position_embeddings =
        keys.usize("max_position_embeddings")?.unwrap_or(if mistral { 131_072 } else { 2048 });
    let ids = |key: &str| -> Result<Option<IdOrIds>> {
        keys.get(key)
            .map(|v| serde_json::from_value(v.clone()).map_err(|_| Keys::bad(key, v, "must be a token id or a list")))
            .transpose()
    };
    let bos_token_id = match ids("bos_token_id")? {
        Some(IdOrIds::One(id)) => Some(id),
        Some(IdOrIds::Many(ids)) => ids.first().copied(),
        None => None,
    };
    let tie_word_embeddings = match keys.get("tie_word_embeddings") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| Keys::bad("tie_word_embeddings", v, "must be true or false"))?,
    };
    Ok(LlamaConfig {
        vocab_size: keys.required("vocab_size")?,
        hidden_size,
        intermediate_size: keys.required("intermediate_size")?,
        num_hidden_layers: keys.required("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: keys.usize("num_key_value_heads")?.unwrap_or(if mistral { 8 } else { heads }),
        head_dim,
        rms_norm_eps: keys.number("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope: rope(&keys, head_dim, max_position_embeddings)?,
        max_position_embeddings,
        tie_word_embeddings,
        bos_token_id,
        eos_token_ids: ids("eos_token_id")?.map(IdOrIds::into_vec).unwrap_or_default(),
        dtype: one_spelling(&keys, "torch_dtype", "dtype")?,
        sliding_window: sliding_window(&keys, mistral)?,
        quantization: super::quant::from_hf_config(keys.get("quantization_config"))?,
    })
}

/// Refuses configs of other architectures; true for Mistral (whose defaults differ).
fn check_architecture(keys: &Keys<'_>) -> Result<bool> {
    let model_type = keys.string("model_type")?;
    let architectures: Vec<&str> = match keys.get("architectures") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Keys::bad("architectures", v, "must be a list of names"))?,
    };
    let refuse = |key: &str, value: String| WorkerError::UnsupportedConfig {
        key: key.into(),
        value,
        reason: format!(
            "Lumen serves Llama-architecture models (model_type {}; architectures {})",
            MODEL_TYPES.join(", "),
            ARCHITECTURES.join(", ")
        ),
    };
    if let Some(t) = model_type.filter(|t| !MODEL_TYPES.contains(t)) {
        return Err(refuse("model_type", format!("{t:?}")));
    }
    if let Some(a) = architectures.iter().find(|a| !ARCHITECTURES.contains(a)) {
        return Err(refuse("architectures", format!("{a:?}")));
    }
    if model_type.is_none() && architectures.is_empty() {
        return Err(refuse("model_type", "(missing, and no architectures)".into()));
    }
    Ok(model_type == Some("mistral") || (model_type.is_none() && architectures.contains(&"MistralForCausalLM")))
}

/// Refuses keys whose value changes the math in a way Lumen does not implement.
fn refuse_unimplemented(keys: &Keys<'_>) -> Result<()> {
    for &(key, neutral, reason) in REFUSED {
        if !keys.is_neutral(key, neutral) {
            let value = keys.get(key).map(|v| v.to_string()).unwrap_or_default();
            return Err(WorkerError::UnsupportedConfig { key: key.into(), value, reason: reason.into() });
        }
    }
    if let Some(act) = keys.string("hidden_act")?.filter(|a| !matches!(*a, "silu" | "swish")) {
        return Err(WorkerError::UnsupportedConfig {
            key: "hidden_act".into(),
            value: format!("{act:?}"),
            reason: "Lumen's MLP is SwiGLU: the activation must be silu".into(),
        });
    }
    if let Some(v) = keys.get("layer_types") {
        let all_full = v.as_array().is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")));
        if !all_full {
            return Err(Keys::bad(
                "layer_types",
                v,
                "every layer must be full_attention: Lumen runs full causal attention in all layers",
            ));
        }
    }
    Ok(())
}

/// `old` and `new` spell one string setting; both present must agree.
fn one_spelling(keys: &Keys<'_>, old: &str, new: &str) -> Result<Option<String>> {
    match (keys.string(old)?, keys.string(new)?) {
        (Some(a), Some(b)) if a != b => Err(WorkerError::ConflictingConfig {
            first: old.into(),
            first_value: format!("{a:?}"),
            second: new.into(),
            second_value: format!("{b:?}"),
        }),
        (a, b) => Ok(b.or(a).map(str::to_string)),
    }
}

fn sliding_window(keys: &Keys<'_>, mistral: bool) -> Result<Option<SlidingWindow>> {
    if keys.get("use_sliding_window").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    let size = match keys.0.get("sliding_window") {
        None if mistral => Some(4096),
        _ => keys.usize("sliding_window")?,
    };
    Ok(size.map(|size| SlidingWindow { size, key: "sliding_window" }))
}

/// The rotary settings from either spelling (see the module doc).
fn rope(keys: &Keys<'_>, head_dim: usize, max_position_embeddings: usize) -> Result<Rope> {
    let old = keys.object("rope_scaling")?;
    let (new_section, new) = match keys.object("rope_parameters")? {
        Some(p) => {
            let (section, dict) = one_rope_dict(p)?;
            (section, Some(dict))
        }
        None => (String::new(), None),
    };
    let top_theta = keys.number("rope_theta")?;
    if let (Some(new), Some(old)) = (new, old) {
        agree("rope_scaling", old, &new_section, new)?;
    }
    let (section, dict) = match (new, old) {
        (Some(new), _) => (new_section.as_str(), new.clone()),
        (None, Some(old)) => ("rope_scaling", old.clone()),
        (None, None) => ("rope_parameters", Map::new()),
    };
    let theta_key = format!("{section}.rope_theta");
    let dict_theta = match dict.get("rope_theta").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(v.as_f64().ok_or_else(|| Keys::bad(&theta_key, v, "must be a number"))?),
    };
    let theta = match (top_theta, dict_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(WorkerError::ConflictingConfig {
                first: "rope_theta".into(),
                first_value: a.to_string(),
                second: theta_key,
                second_value: b.to_string(),
            });
        }
        (a, b) => b.or(a).unwrap_or(10_000.0),
    };
    let partial = dict.get("partial_rotary_factor").filter(|v| !v.is_null());
    if let Some(v) = partial.filter(|v| v.as_f64() != Some(1.0)) {
        return Err(Keys::bad(
            &format!("{section}.partial_rotary_factor"),
            v,
            "rotary embeddings on part of each head are not implemented",
        ));
    }
    let mut params = RopeParams::new(section, &dict, head_dim, max_position_embeddings);
    params.top_level_original_max = keys.number("original_max_position_embeddings")?;
    Rope::parse(theta, &params)
}

/// A `rope_parameters` dict, or the one that every layer type's entry equals (transformers 5
/// writes `{"full_attention": {...}, "sliding_attention": {...}}` when a model has layer types).
fn one_rope_dict(p: &Map<String, Value>) -> Result<(String, &Map<String, Value>)> {
    let per_layer = !p.is_empty() && p.values().all(Value::is_object);
    if !per_layer {
        return Ok(("rope_parameters".into(), p));
    }
    let mut entries = p.iter().filter_map(|(k, v)| v.as_object().map(|o| (k, o)));
    let Some((first_type, first)) = entries.next() else {
        return Ok(("rope_parameters".into(), p));
    };
    let first_section = format!("rope_parameters.{first_type}");
    for (layer_type, dict) in entries {
        let section = format!("rope_parameters.{layer_type}");
        agree(&first_section, first, &section, dict).map_err(|_| WorkerError::UnsupportedConfig {
            key: section,
            value: Value::Object(dict.clone()).to_string(),
            reason: format!(
                "layer types with different rotary settings ({first_section} is {}) are not implemented: \
                 Lumen applies one rotary table to every layer",
                Value::Object(first.clone())
            ),
        })?;
    }
    Ok((first_section, first))
}

/// Fails naming both keys unless two rope dicts give the same type, parameters and theta (an
/// absent theta on either side is not a disagreement: it falls back to top-level `rope_theta`).
fn agree(a_key: &str, a: &Map<String, Value>, b_key: &str, b: &Map<String, Value>) -> Result<()> {
    let normal = |m: &Map<String, Value>| -> Map<String, Value> {
        let mut out: Map<String, Value> =
            m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(t) = out.remove("type") {
            out.entry("rope_type").or_insert(t);
        }
        out.entry("rope_type").or_insert(Value::String("default".into()));
        out
    };
    let (mut na, mut nb) = (normal(a), normal(b));
    if !(na.contains_key("rope_theta") && nb.contains_key("rope_theta")) {
        na.remove("rope_theta");
        nb.remove("rope_theta");
    }
    let same_keys = na.len() == nb.len() && na.keys().all(|k| nb.contains_key(k));
    if same_keys && na.iter().all(|(k, v)| same_value(v, &nb[k])) {
        return Ok(());
    }
    Err(WorkerError::ConflictingConfig {
        first: a_key.into(),
        first_value: Value::Object(a.clone()).to_string(),
        second: b_key.into(),
        second_value: Value::Object(b.clone()).to_string(),
    })
}

/// JSON equality with numbers compared by value (`8` equals `8.0`).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q)),
        _ => a == b,
    }
}

#[cfg(test)]
#[path = "hf_config_tests.rs"]
mod tests;
