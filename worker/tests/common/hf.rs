//! SmolLM2's GGUF written out as a Hugging Face checkpoint (config.json, safetensors shards with
//! an index, an untied lm_head, tokenizer.json + tokenizer_config.json, generation_config.json),
//! each tensor stored as the test asks (f32, or a quantized layout with its scales).

use std::collections::HashMap;
use std::path::Path;

use lumen_worker::model::TensorSource;
use lumen_worker::model::dummy::llama_tensor_shapes;
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::tokenizer::Tokenizer;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// One tensor as written: name, dtype, shape, bytes.
pub struct Stored {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// `values` as an f32 tensor.
pub fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> Stored {
    Stored {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `tensors` as one safetensors file.
pub fn write_tensors(path: &Path, tensors: &[Stored]) {
    let views: HashMap<String, TensorView<'_>> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

/// Writes the GGUF's model into `dir` in two shards; `store` turns each tensor (name, shape,
/// f32 values) into what is written; `quantization_config` goes into config.json when not null.
pub fn write_checkpoint(
    gguf: &GgufFile,
    dir: &Path,
    quantization_config: serde_json::Value,
    store: impl Fn(&str, &[usize], Vec<f32>) -> Vec<Stored>,
) {
    write_checkpoint_layers(gguf, dir, None, quantization_config, store)
}

/// [`write_checkpoint`] keeping only the first `layers` layers when given (a smaller model with
/// the same embeddings, head and tokenizer: a draft for speculative decoding).
pub fn write_checkpoint_layers(
    gguf: &GgufFile,
    dir: &Path,
    layers: Option<usize>,
    quantization_config: serde_json::Value,
    store: impl Fn(&str, &[usize], Vec<f32>) -> Vec<Stored>,
) {
    let mut cfg = gguf.llama_config().unwrap();
    cfg.num_hidden_layers = layers.unwrap_or(cfg.num_hidden_layers).min(cfg.num_hidden_layers);
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    if !quantization_config.is_null() {
        config["quantization_config"] = quantization_config;
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [2], "bos_token_id": 1}).to_string())
        .unwrap();
    // Untie: the output projection becomes its own tensor (a copy of the embeddings).
    let mut shapes = llama_tensor_shapes(&cfg);
    shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, cfg.hidden_size]));
    let tensors = |name: &str, shape: &Vec<usize>| {
        let source = if name == "lm_head.weight" { "model.embed_tokens.weight" } else { name };
        store(name, shape, gguf.tensor(source).unwrap().to_f32().unwrap())
    };
    let (first, second) = shapes.split_at(shapes.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let stored: Vec<Stored> = part.iter().flat_map(|(n, s)| tensors(n, s)).collect();
        write_tensors(&dir.join(file), &stored);
        for t in &stored {
            weight_map.insert(t.name.clone(), json!(file));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    // Tokenizer: the GGUF's, saved as tokenizer.json, and its chat template in tokenizer_config.json.
    let tokenizer = Tokenizer::from_gguf(&gguf.content).unwrap();
    tokenizer.save_json(&dir.join("tokenizer.json")).unwrap();
    let template = match gguf.meta("tokenizer.chat_template") {
        Some(candle_core::quantized::gguf_file::Value::String(t)) => t.clone(),
        _ => panic!("SmolLM2's GGUF carries a chat template"),
    };
    let tok_config = json!({"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}
