//! GGUF files (llama.cpp's format): metadata, the Llama hyper-parameters it implies, and tensors
//! served under Hugging Face names through [`TensorSource`].
//!
//! llama.cpp's converter permutes the rows of the query and key projections so that rotary
//! embeddings pair adjacent elements; this source undoes that permutation so the model always sees
//! Hugging Face's layout (pairs half a head apart).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use memmap2::Mmap;

use super::config::{LlamaConfig, RopeScaling};
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
        let rope_scaling = self.rope_scaling()?;
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.meta_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.meta_usize("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self.meta_usize("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.meta_f32("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: self.meta_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.meta_usize("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self.meta("tokenizer.ggml.bos_token_id").and_then(value_as_u64).map(|x| x as u32),
            eos_token_ids: self
                .meta("tokenizer.ggml.eos_token_id")
                .and_then(value_as_u64)
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
            torch_dtype: None,
        };
        config.check().map_err(|e| WorkerError::model_file(&self.path, e.to_string()))?;
        Ok(config)
    }

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let t = self.raw("rope_freqs.weight", "rope_freqs.weight")?;
            return Ok(Some(RopeScaling::Factors(t.to_f32()?)));
        }
        match self.meta("llama.rope.scaling.type") {
            Some(Value::String(kind)) if kind == "linear" => {
                Ok(self.meta_f32("llama.rope.scaling.factor").map(|factor| RopeScaling::Linear { factor }))
            }
            Some(Value::String(kind)) if kind != "none" => {
                Err(WorkerError::model_file(&self.path, format!("rope scaling type `{kind}` is not supported")))
            }
            _ => Ok(None),
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

/// Maps a Hugging Face tensor name to llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed: HashMap<&str, &str> = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    .into_iter()
    .collect();
    if let Some(n) = fixed.get(hf) {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let part = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
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
}
