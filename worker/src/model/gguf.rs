//! GGUF files (llama.cpp's format): metadata, the Llama hyper-parameters it implies, and tensors
//! served under Hugging Face names through [`TensorSource`].
//!
//! llama.cpp's converter permutes the rows of the query and key projections so that rotary
//! embeddings pair adjacent elements; this source undoes that permutation so the model always sees
//! Hugging Face's layout (pairs half a head apart).
//!
//! Nothing that changes the forward pass is ignored: `general.architecture` must be `llama`;
//! every `llama.*` metadata key must be one Lumen reads ([`KNOWN_LLAMA_KEYS`]), with
//! `llama.rope.scaling.type` `none` or `linear` (with its `llama.rope.scaling.factor`),
//! `llama.rope.dimension_count` and `llama.attention.value_length` equal to the head size,
//! `llama.expert_count` 0, and `llama.attention.sliding_window` checked against `max_model_len`;
//! any other key (yarn's `llama.rope.scaling.attn_factor`, ...) is refused by name. Every tensor
//! must be one the Llama forward pass uses (so `blk.N.attn_q.bias` or `attn_q_norm` are refused),
//! or `rope_freqs.weight` (Llama-3.1's per-frequency rope divisors).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use memmap2::Mmap;

use serde_json::{Map, Value as Json};

use super::config::{LlamaConfig, SlidingWindow};
use super::rope::{FreqFactors, Rope, RopeParams};
use super::source::{RawTensor, TensorBytes, TensorDType, TensorSource};
use crate::{Result, WorkerError};

/// An open GGUF file: parsed header plus the memory-mapped data.
pub struct GgufFile {
    path: PathBuf,
    pub content: Content,
    map: Arc<Mmap>,
}

impl GgufFile {
    /// Opens and validates `path`: the header must parse and every tensor must lie inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let mut file = File::open(path).map_err(|e| WorkerError::model_file(path, format!("cannot open: {e}")))?;
        let content = Content::read(&mut file)
            .map_err(|e| WorkerError::model_file(path, format!("not a readable GGUF file: {e}")))?;
        // SAFETY: the file is opened read-only; a model file changing under a running server is
        // outside what we can guard against (as for every mmap-based loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WorkerError::model_file(path, format!("cannot map: {e}")))?;
        let gguf = GgufFile { path: path.to_path_buf(), content, map: Arc::new(map) };
        for (name, info) in &gguf.content.tensor_infos {
            gguf.byte_range(name, info)?;
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn byte_range(&self, name: &str, info: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let dims = info.shape.dims();
        let last = dims.last().copied().unwrap_or(1);
        let block = info.ggml_dtype.block_size();
        if last % block != 0 {
            return Err(WorkerError::model_file(
                &self.path,
                format!(
                    "tensor {name}: row length {last} is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                ),
            ));
        }
        let elems: usize = dims.iter().product();
        let size = elems / block * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let end = start.saturating_add(size);
        if end > self.map.len() {
            return Err(WorkerError::model_file(
                &self.path,
                format!(
                    "truncated: tensor {name} needs bytes {start}..{end} but the file has {} bytes",
                    self.map.len()
                ),
            ));
        }
        Ok(start..end)
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| WorkerError::model_file(&self.path, format!("metadata `{key}` is missing")))?;
        value_as_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| WorkerError::model_file(&self.path, format!("metadata `{key}` is not an integer")))
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        match self.meta(key)? {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            other => value_as_u64(other).map(|x| x as f32),
        }
    }

    /// The Llama hyper-parameters from `general.architecture` = `llama` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        self.read_llama_config().map_err(|e| match e {
            WorkerError::UnsupportedConfig { .. } | WorkerError::ConflictingConfig { .. } => {
                WorkerError::model_file(&self.path, e.to_string())
            }
            other => other,
        })
    }

    fn read_llama_config(&self) -> Result<LlamaConfig> {
        let arch = match self.meta("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(WorkerError::model_file(&self.path, "metadata `general.architecture` is missing"));
            }
        };
        if arch != "llama" {
            return Err(WorkerError::model_file(
                &self.path,
                format!("architecture `{arch}` is not supported (Lumen serves `llama`-architecture models)"),
            ));
        }
        let heads = self.meta_usize("llama.attention.head_count")?;
        let hidden = self.meta_usize("llama.embedding_length")?;
        let vocab = match self.meta_usize("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(WorkerError::model_file(
                        &self.path,
                        "neither `llama.vocab_size` nor a token list is present",
                    ));
                }
            },
        };
        let head_dim = match self.meta_usize("llama.attention.key_length") {
            Ok(d) => d,
            Err(_) if heads > 0 => hidden / heads,
            Err(e) => return Err(e),
        };
        self.refuse_unimplemented(head_dim)?;
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.meta_usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self.meta_usize("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.meta_f32("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope: self.rope(head_dim)?,
            max_position_embeddings: self.meta_usize("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self.meta("tokenizer.ggml.bos_token_id").and_then(value_as_u64).map(|x| x as u32),
            eos_token_ids: self
                .meta("tokenizer.ggml.eos_token_id")
                .and_then(value_as_u64)
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
            dtype: None,
            sliding_window: self
                .meta("llama.attention.sliding_window")
                .and_then(value_as_u64)
                .map(|size| SlidingWindow { size: size as usize, key: "llama.attention.sliding_window" }),
            quantization: None,
        };
        config.check().map_err(|e| WorkerError::model_file(&self.path, e.to_string()))?;
        Ok(config)
    }

    /// Base and scaling: `rope_freqs.weight` divisors, else `llama.rope.scaling.type` `none` or
    /// `linear` (read through the same parser as config.json's rope dicts, so a linear type
    /// without its factor is refused the same way).
    fn rope(&self, head_dim: usize) -> Result<Rope> {
        let theta = self.meta_f32("llama.rope.freq_base").unwrap_or(10_000.0) as f64;
        let kind = match self.meta("llama.rope.scaling.type") {
            // llama.cpp's default type is linear: a factor alone scales.
            None if self.meta("llama.rope.scaling.factor").is_some() => "linear".to_string(),
            None => "none".to_string(),
            Some(Value::String(kind)) => kind.clone(),
            Some(other) => {
                return Err(unsupported("llama.rope.scaling.type", format!("{other:?}"), "must be a string"));
            }
        };
        let rope_freqs = self.content.tensor_infos.contains_key("rope_freqs.weight");
        match kind.as_str() {
            "none" if rope_freqs => {
                let t = self.raw("rope_freqs.weight", "rope_freqs.weight")?;
                Ok(Rope { theta, scaling: Some(std::sync::Arc::new(FreqFactors(t.to_f32()?))) })
            }
            "none" => Ok(Rope::plain(theta)),
            "linear" if !rope_freqs => {
                let mut dict = Map::new();
                dict.insert("rope_type".into(), Json::String(kind));
                if let Some(factor) = self.meta_f32("llama.rope.scaling.factor") {
                    dict.insert("factor".into(), Json::from(factor as f64));
                }
                let max_pos = self.meta_usize("llama.context_length").unwrap_or(2048);
                Rope::parse(theta, &RopeParams::new("llama.rope.scaling", &dict, head_dim, max_pos))
            }
            _ => Err(unsupported(
                "llama.rope.scaling.type",
                format!("{kind:?}"),
                if rope_freqs {
                    "cannot be combined with a rope_freqs.weight tensor"
                } else {
                    "supported: none, linear"
                },
            )),
        }
    }

    /// Refuses metadata and tensors that would change the forward pass (see the module doc).
    fn refuse_unimplemented(&self, head_dim: usize) -> Result<()> {
        for (key, value) in &self.content.metadata {
            if key.starts_with("llama.") && !KNOWN_LLAMA_KEYS.contains(&key.as_str()) {
                return Err(unsupported(
                    key,
                    format!("{value:?}"),
                    "Lumen does not know how it changes the forward pass",
                ));
            }
        }
        for (key, want, reason) in [
            ("llama.rope.dimension_count", head_dim, "rotary embeddings on part of each head are not implemented"),
            ("llama.attention.value_length", head_dim, "values of another size than keys are not implemented"),
            ("llama.expert_count", 0, "mixture-of-experts layers are not implemented"),
        ] {
            if let Some(v) = self.meta(key).and_then(value_as_u64).filter(|&v| v as usize != want) {
                return Err(unsupported(key, v.to_string(), reason));
            }
        }
        match self.content.tensor_infos.keys().find(|n| !is_llama_tensor(n)) {
            Some(name) => Err(WorkerError::tensor(
                name,
                format!(
                    "in {}: not a tensor of Lumen's Llama (biases, q/k norms, experts are not implemented)",
                    self.path.display()
                ),
            )),
            None => Ok(()),
        }
    }

    fn raw(&self, gguf_name: &str, hf_name: &str) -> Result<RawTensor> {
        let info =
            self.content.tensor_infos.get(gguf_name).ok_or_else(|| {
                WorkerError::tensor(hf_name, format!("`{gguf_name}` is not in {}", self.path.display()))
            })?;
        let range = self.byte_range(gguf_name, info)?;
        let dtype = match info.ggml_dtype {
            GgmlDType::F32 => TensorDType::F32,
            GgmlDType::F16 => TensorDType::F16,
            GgmlDType::BF16 => TensorDType::BF16,
            other => TensorDType::Ggml(other),
        };
        Ok(RawTensor {
            name: hf_name.to_string(),
            dtype,
            shape: info.shape.dims().to_vec(),
            bytes: TensorBytes::Mapped { map: Arc::clone(&self.map), range },
        })
    }

    fn head_count_for(&self, hf_name: &str) -> Option<usize> {
        let key = if hf_name.ends_with("q_proj.weight") {
            "llama.attention.head_count"
        } else if hf_name.ends_with("k_proj.weight") {
            "llama.attention.head_count_kv"
        } else {
            return None;
        };
        self.meta(key).and_then(value_as_u64).map(|x| x as usize)
    }
}

/// `llama.*` metadata Lumen reads (the others are refused, see the module doc).
pub const KNOWN_LLAMA_KEYS: &[&str] = &[
    "llama.vocab_size",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.attention.sliding_window",
    "llama.rope.freq_base",
    "llama.rope.dimension_count",
    "llama.rope.scaling.type",
    "llama.rope.scaling.factor",
    // Informational for `linear` (llama.cpp reads them for yarn only, which is refused).
    "llama.rope.scaling.original_context_length",
    "llama.rope.scaling.finetuned",
    "llama.expert_count",
    "llama.expert_used_count",
];

fn unsupported(key: &str, value: String, reason: &str) -> WorkerError {
    WorkerError::UnsupportedConfig { key: key.into(), value, reason: reason.into() }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::U64(x) => Some(*x),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// Whole-model tensors: Hugging Face name, llama.cpp name.
const MODEL_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors: Hugging Face suffix after `model.layers.N.`, llama.cpp's after `blk.N.`.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Maps a Hugging Face tensor name to llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let (_, part) = LAYER_TENSORS.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{part}"))
}

/// Whether a GGUF tensor is one the Llama forward pass reads (or `rope_freqs.weight`).
fn is_llama_tensor(gguf: &str) -> bool {
    if gguf == "rope_freqs.weight" || MODEL_TENSORS.iter().any(|(_, g)| *g == gguf) {
        return true;
    }
    let Some((layer, part)) = gguf.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) else {
        return false;
    };
    layer.parse::<usize>().is_ok() && LAYER_TENSORS.iter().any(|(_, g)| *g == part)
}

/// Undoes llama.cpp's rotary permutation of a `[heads * head_dim, cols]` projection: GGUF row
/// `h * hd + 2 * i + j` holds Hugging Face row `h * hd + j * hd / 2 + i`.
fn unpermute_rows(t: &RawTensor, heads: usize) -> Result<RawTensor> {
    let (rows, cols) = match t.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(WorkerError::tensor(&t.name, format!("expected a matrix, found shape {:?}", t.shape)));
        }
    };
    if heads == 0 || rows % heads != 0 || !(rows / heads).is_multiple_of(2) {
        return Err(WorkerError::tensor(&t.name, format!("{rows} rows do not split into {heads} heads of even size")));
    }
    t.check_len()?;
    let hd = rows / heads;
    let row_bytes = t.dtype.row_bytes(cols);
    let src = t.bytes.as_slice();
    let mut out = vec![0u8; src.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * hd / 2 + i;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    Ok(RawTensor { bytes: TensorBytes::Owned(out), ..t.clone() })
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let gguf = gguf_name(name).ok_or_else(|| WorkerError::tensor(name, "has no GGUF equivalent"))?;
        let raw = self.raw(&gguf, name)?;
        match self.head_count_for(name) {
            Some(heads) => unpermute_rows(&raw, heads),
            None => Ok(raw),
        }
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hugging_face_names_to_gguf_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(), Some("blk.12.attn_k.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.0.bogus"), None);
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_rotary_permutation() {
        // Two heads of head_dim 4, one f32 column holding the Hugging Face row index.
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        // llama.cpp: reshape(heads, 2, hd/2) then swap the last two axes.
        let mut gguf = [0f32; 8];
        for h in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    gguf[h * 4 + 2 * i + j] = hf[h * 4 + j * 2 + i];
                }
            }
        }
        let t = RawTensor {
            name: "q".into(),
            dtype: TensorDType::F32,
            shape: vec![8, 1],
            bytes: TensorBytes::Owned(gguf.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        assert_eq!(unpermute_rows(&t, 2).unwrap().to_f32().unwrap(), hf);
    }

    /// A GGUF file with a small Llama's metadata, `extra` keys on top (a `None` removes the key),
    /// and one tiny f32 tensor per name in `tensors`.
    fn gguf_with(extra: &[(&str, Option<Value>)], tensors: &[&str]) -> (tempfile::NamedTempFile, Result<LlamaConfig>) {
        use candle_core::quantized::QTensor;
        let mut meta: Vec<(String, Value)> = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(256)),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(96)),
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.attention.head_count_kv", Value::U32(2)),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
            ("llama.rope.dimension_count", Value::U32(16)),
            ("llama.vocab_size", Value::U32(32)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (key, value) in extra {
            meta.retain(|(k, _)| k != key);
            if let Some(v) = value {
                meta.push((key.to_string(), v.clone()));
            }
        }
        let zeros = candle_core::Tensor::zeros((2, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&zeros, GgmlDType::F32).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|n| (*n, &q)).collect();
        candle_core::quantized::gguf_file::write(&mut file.reopen().unwrap(), &meta_refs, &tensor_refs).unwrap();
        let config = GgufFile::open(file.path()).and_then(|g| g.llama_config());
        (file, config)
    }

    #[test]
    fn metadata_and_tensors_that_change_the_math_are_refused_by_name() {
        let (_f, plain) = gguf_with(&[], &["token_embd.weight", "blk.0.attn_q.weight"]);
        let plain = plain.unwrap();
        assert_eq!((plain.head_dim, plain.rope.type_name(), plain.rope.theta), (16, "default", 10_000.0));
        let s = |x: &str| Some(Value::String(x.into()));
        type Extra<'a> = Vec<(&'a str, Option<Value>)>;
        let cases: Vec<(Extra, Vec<&str>, &str)> = vec![
            (vec![("general.architecture", s("qwen2"))], vec![], "qwen2"),
            (vec![("llama.rope.scaling.type", s("yarn"))], vec![], "`llama.rope.scaling.type` = \"yarn\""),
            (vec![("llama.rope.scaling.type", s("linear"))], vec![], "`llama.rope.scaling.factor` = missing"),
            (
                vec![("llama.rope.scaling.attn_factor", Some(Value::F32(1.2)))],
                vec![],
                "`llama.rope.scaling.attn_factor`",
            ),
            (vec![("llama.rope.scaling.yarn_log_multiplier", Some(Value::F32(0.1)))], vec![], "yarn_log_multiplier"),
            (vec![("llama.rope.dimension_count", Some(Value::U32(8)))], vec![], "`llama.rope.dimension_count` = 8"),
            (vec![("llama.attention.value_length", Some(Value::U32(32)))], vec![], "`llama.attention.value_length`"),
            (vec![("llama.expert_count", Some(Value::U32(8)))], vec![], "`llama.expert_count` = 8"),
            (vec![], vec!["blk.0.attn_q.bias"], "`blk.0.attn_q.bias`"),
            (vec![], vec!["blk.0.attn_q_norm.weight"], "`blk.0.attn_q_norm.weight`"),
        ];
        for (extra, tensors, want) in cases {
            let (_f, config) = gguf_with(&extra, &tensors);
            let err = config.expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Linear scaling with its factor, and llama.cpp's default type (linear) for a bare factor.
        for extra in [
            vec![("llama.rope.scaling.type", s("linear")), ("llama.rope.scaling.factor", Some(Value::F32(4.0)))],
            vec![("llama.rope.scaling.factor", Some(Value::F32(4.0)))],
        ] {
            let (_f, c) = gguf_with(&extra, &[]);
            let c = c.unwrap();
            assert_eq!(c.rope.type_name(), "linear");
            assert_eq!(c.rope_frequencies(16).inv_freq[0], 0.25);
        }
        // A sliding window is kept and bounds max_model_len.
        let (_f, c) = gguf_with(&[("llama.attention.sliding_window", Some(Value::U32(64)))], &[]);
        let err = c.unwrap().check_max_model_len(65).unwrap_err().to_string();
        assert!(err.contains("`llama.attention.sliding_window` = 64"), "{err}");
    }
}
