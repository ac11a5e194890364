//! The whole model on the GPU against the CPU path on SmolLM2-135M (the GGUF, dequantized to
//! the same f32 weights on both sides): greedy tokens of eight chat prompts, decoded together
//! through the engine (scheduler, paged cache, batching), must agree. Needs a GPU and
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` (or `LUMEN_GPU_TEST_MODEL`).

use std::collections::HashMap;

use tokio::sync::mpsc::unbounded_channel;

use crate::TokenId;
use crate::engine::options::GpuDType;
use crate::engine::{EngineEvent, EngineOptions, EngineRequest, build_engine};
use crate::model::cpu_weights::CpuWeightFormat;
use crate::sampling::{SamplingParams, StopParams};
use crate::tokenizer::{ChatMessage, ChatTemplateOptions};

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence why the sky is blue.",
    "Give me a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet in two sentences, including how the story ends for both of them.",
    "Tell me a joke about computers.",
    "Hi!",
];
const NEW_TOKENS: usize = 16;

fn model_path() -> String {
    let path = std::env::var("LUMEN_GPU_TEST_MODEL")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf").into());
    assert!(std::path::Path::new(&path).is_file(), "{path} is missing: run scripts/fetch-model.sh first");
    path
}

fn options() -> EngineOptions {
    EngineOptions {
        model: model_path(),
        max_model_len: Some(1024),
        cpu_weight_format: CpuWeightFormat::F32,
        gpu_memory_utilization: 0.3,
        ..EngineOptions::default()
    }
}

/// Greedy continuations of the prompts, all submitted at once.
fn greedy(opts: &EngineOptions) -> Vec<Vec<TokenId>> {
    let mut core = build_engine(opts).expect("building the engine");
    let template = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let mut receivers = Vec::new();
    for (i, text) in PROMPTS.iter().enumerate() {
        let ids = core.tokenizer().encode_chat(&[ChatMessage::new("user", *text)], &template).unwrap();
        let stop = StopParams { max_tokens: NEW_TOKENS, ignore_eos: true, ..Default::default() };
        let (tx, rx) = unbounded_channel();
        core.add_request(EngineRequest::new(format!("p{i}"), ids, SamplingParams::greedy(), stop), tx);
        receivers.push(rx);
    }
    while core.has_work() {
        core.step().expect("engine step");
    }
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut tokens: HashMap<usize, Vec<TokenId>> = HashMap::new();
            while let Ok(event) = rx.try_recv() {
                match event {
                    EngineEvent::Delta(d) => tokens.entry(d.index).or_default().extend(&d.token_ids),
                    EngineEvent::Failed(e) => panic!("request failed: {e}"),
                    EngineEvent::Finished { .. } => {}
                }
            }
            tokens.remove(&0).unwrap_or_default()
        })
        .collect()
}

/// Tokens each prompt's output shares with the reference before the first difference.
fn agreement(got: &[Vec<TokenId>], want: &[Vec<TokenId>]) -> Vec<usize> {
    got.iter().zip(want).map(|(g, w)| g.iter().zip(w).take_while(|(a, b)| a == b).count()).collect()
}

#[test]
fn the_gpu_path_decodes_the_cpu_paths_greedy_tokens() {
    let cpu = greedy(&options());
    assert!(cpu.iter().all(|t| t.len() == NEW_TOKENS));
    let gpu_f32 = greedy(&EngineOptions { device: "cuda".into(), dtype: GpuDType::Float32, ..options() });
    // Chunked prefill: prompts split over several steps, mixed with decodes.
    let chunked = greedy(&EngineOptions {
        device: "cuda".into(),
        dtype: GpuDType::Float32,
        max_num_batched_tokens: 24,
        ..options()
    });
    let gpu_bf16 = greedy(&EngineOptions { device: "cuda".into(), ..options() });
    let (f32_agree, chunked_agree, bf16_agree) =
        (agreement(&gpu_f32, &cpu), agreement(&chunked, &cpu), agreement(&gpu_bf16, &cpu));
    println!("tokens agreeing with the CPU path (of {NEW_TOKENS}) per prompt:");
    println!("  f32 GPU:           {f32_agree:?}");
    println!("  f32 GPU, chunked:  {chunked_agree:?}");
    println!("  bf16 GPU:          {bf16_agree:?}");
    assert_eq!(gpu_f32, cpu, "f32 on the GPU must decode the CPU path's greedy tokens");
    assert_eq!(chunked, cpu, "chunked prefill on the GPU must decode the same tokens");
    // bf16 rounds weights and activations: it must still follow the f32 path's first tokens.
    assert!(bf16_agree.iter().all(|&n| n >= 1), "bf16 diverges at the first token: {bf16_agree:?}");
}
