//! Hugging Face model directories end to end: SmolLM2's weights are written out as a Hugging Face
//! checkpoint (config.json, f32 safetensors in two shards with an index, an untied lm_head,
//! tokenizer.json + tokenizer_config.json, generation_config.json) and served through the
//! safetensors path; its greedy tokens must equal the GGUF path's with the same f32 weights.

mod common;

use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest};
use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};

#[test]
fn a_hugging_face_checkpoint_serves_the_same_tokens_as_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(&common::model_path()).unwrap();
    common::hf::write_checkpoint(&gguf, dir.path(), serde_json::Value::Null, |name, shape, values| {
        vec![common::hf::f32_tensor(name, shape, &values)]
    });
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
