//! `load_format: dummy` with the real Llama-3.1 tokenizer: a Llama-3.1-shaped config (scaled
//! down in width and depth, full 128,256-token vocabulary, `llama3` rope scaling, GQA) serves chat
//! requests end to end without any weights, deterministically for a given seed.

mod common;

use std::path::{Path, PathBuf};

use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest, FinishReason};
use lumen_worker::model::location::LoadFormat;
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use serde_json::json;

fn llama31_tokenizer() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/llama3.1-tokenizer");
    assert!(dir.join("tokenizer.json").is_file(), "{} is missing: run scripts/fetch-model.sh", dir.display());
    dir
}

fn write_config(dir: &Path) {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(llama31_tokenizer().join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn dummy_weights_serve_a_llama31_shaped_model_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let opts = EngineOptions {
        model: dir.path().display().to_string(),
        load_format: LoadFormat::Dummy,
        max_model_len: Some(512),
        dummy_seed: 42,
        ..options()
    };
    let mut a = engine(&opts);
    let mut eos = a.tokenizer().eos_token_ids().to_vec();
    eos.sort();
    assert_eq!(eos, vec![128001, 128008, 128009], "config.json's eos ids join the tokenizer's");
    let messages = vec![ChatMessage::new("system", "You are terse."), ChatMessage::new("user", "Hello!")];
    let prompt = a
        .tokenizer()
        .encode_chat(&messages, &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() })
        .unwrap();
    assert_eq!(prompt.iter().filter(|&&t| t == 128000).count(), 1, "exactly one BOS");
    assert_eq!(prompt[0], 128000);
    let req = |id: &str| {
        EngineRequest::new(
            id,
            prompt.clone(),
            SamplingParams::greedy(),
            StopParams { max_tokens: 8, ignore_eos: true, ..Default::default() },
        )
    };
    let first = run(&mut a, vec![req("a")]).remove(0);
    assert_eq!(first.tokens[&0].len(), 8);
    assert_eq!(first.finish[&0], FinishReason::Length);
    assert_eq!(first.usage.unwrap().prompt_tokens, prompt.len());
    // Another engine with the same seed produces the same weights, hence the same tokens.
    let mut b = engine(&opts);
    assert_eq!(run(&mut b, vec![req("b")]).remove(0).tokens[&0], first.tokens[&0]);
}

#[test]
fn a_cache_too_small_for_max_model_len_fails_at_start_naming_the_knob() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let opts = EngineOptions {
        model: dir.path().display().to_string(),
        load_format: LoadFormat::Dummy,
        max_model_len: Some(100_000),
        kv_cache_memory: "1MiB".parse().unwrap(),
        ..options()
    };
    let err = lumen_worker::engine::build_engine(&opts).unwrap_err().to_string();
    assert!(err.contains("kv-cache-memory") && err.contains("max-model-len"), "{err}");
}

#[test]
fn missing_or_wrong_model_files_give_errors_naming_them() {
    let err = |model: &str| {
        lumen_worker::engine::build_engine(&EngineOptions { model: model.into(), ..options() }).unwrap_err().to_string()
    };
    let missing = err("/nonexistent/model.gguf");
    assert!(missing.contains("/nonexistent/model.gguf"), "{missing}");
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"this is not a gguf file").unwrap();
    let wrong = err(bogus.to_str().unwrap());
    assert!(wrong.contains("bogus.gguf") && wrong.contains("GGUF"), "{wrong}");
    // A truncated copy of the real model: the header parses, the tensor data does not fit.
    let bytes = std::fs::read(common::model_path()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let cut = err(truncated.to_str().unwrap());
    assert!(cut.contains("truncated.gguf") && cut.contains("truncated"), "{cut}");
    // A directory without config.json.
    let empty = err(dir.path().to_str().unwrap());
    assert!(empty.contains("config.json"), "{empty}");
}
