//! Hugging Face model directories end to end: SmolLM2's weights are written out as a Hugging Face
//! checkpoint (config.json, f32 safetensors in two shards with an index, an untied lm_head,
//! tokenizer.json + tokenizer_config.json, generation_config.json) and served through the
//! safetensors path; its greedy tokens must equal the GGUF path's with the same f32 weights.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest};
use lumen_worker::model::TensorSource;
use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::model::dummy::llama_tensor_shapes;
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// Writes `tensors` (name -> f32 values, shape) as one safetensors file.
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView<'_>> = tensors
        .iter()
        .map(|(n, shape, bytes)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

/// Converts the GGUF into a Hugging Face directory.
fn write_hf_checkpoint(gguf: &GgufFile, dir: &Path) {
    let cfg = gguf.llama_config().unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [2], "bos_token_id": 1}).to_string())
        .unwrap();
    // Untie: the output projection becomes its own tensor (a copy of the embeddings).
    let mut shapes = llama_tensor_shapes(&cfg);
    shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, cfg.hidden_size]));
    let tensor = |name: &str, shape: &Vec<usize>| {
        let source = if name == "lm_head.weight" { "model.embed_tokens.weight" } else { name };
        let values = gguf.tensor(source).unwrap().to_f32().unwrap();
        (name.to_string(), shape.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
    };
    let (first, second) = shapes.split_at(shapes.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: Vec<_> = part.iter().map(|(n, s)| tensor(n, s)).collect();
        write_shard(&dir.join(file), &tensors);
        for (n, _) in part {
            weight_map.insert(n.clone(), json!(file));
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

#[test]
fn a_hugging_face_checkpoint_serves_the_same_tokens_as_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(&common::model_path()).unwrap();
    write_hf_checkpoint(&gguf, dir.path());
    drop(gguf);

    let mut from_gguf = engine(&EngineOptions { cpu_weight_format: CpuWeightFormat::F32, ..options() });
    let mut from_hf = engine(&EngineOptions { model: dir.path().display().to_string(), ..options() });
    assert_eq!(from_hf.tokenizer().eos_token_ids(), &[2]);
    let opts = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    for (i, text) in ["What is 12 times 12?", "Write a haiku about the sea.", "Hello, who are you?"].iter().enumerate()
    {
        let messages = vec![ChatMessage::new("user", *text)];
        let prompt = from_gguf.tokenizer().encode_chat(&messages, &opts).unwrap();
        assert_eq!(from_hf.tokenizer().encode_chat(&messages, &opts).unwrap(), prompt, "tokenizer.json + template");
        let req = || {
            let stop = StopParams { max_tokens: 16, ignore_eos: true, ..Default::default() };
            EngineRequest::new(format!("r{i}"), prompt.clone(), SamplingParams::greedy(), stop)
        };
        let a = run(&mut from_gguf, vec![req()]).remove(0);
        let b = run(&mut from_hf, vec![req()]).remove(0);
        assert_eq!(a.tokens[&0], b.tokens[&0], "{text}");
        assert_eq!(a.text[&0], b.text[&0]);
    }
}
