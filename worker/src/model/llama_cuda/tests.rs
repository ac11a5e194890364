//! The whole model on the GPU against the CPU path on SmolLM2-135M (the GGUF, dequantized to
//! the same f32 weights on both sides): greedy tokens of eight chat prompts, decoded together
//! through the engine (scheduler, paged cache, batching), must agree; so must their pooled
//! embeddings (last-token and mean pooling, chunked prefill included). Needs a GPU and
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` (or `LUMEN_GPU_TEST_MODEL`).

use std::collections::HashMap;

use tokio::sync::mpsc::unbounded_channel;

use crate::TokenId;
use crate::engine::options::GpuDType;
use crate::engine::pooling::{PoolerConfig, Runner};
use crate::engine::{EngineCore, EngineEvent, EngineOptions, EngineRequest, PoolingType, build_engine};
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
/// A first token whose two most likely candidates are this many nats apart is a clear choice
/// that bf16 rounding must not flip ("What is the capital of France?" starts at a 0.08 gap).
const CLEAR_MARGIN: f32 = 0.5;

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
    decode(opts, false).into_iter().map(|(tokens, _)| tokens).collect()
}

/// Greedy continuations with, per prompt, the log-probability gap between the first token's
/// two most likely candidates (how clear the first choice is).
fn greedy_with_margins(opts: &EngineOptions) -> Vec<(Vec<TokenId>, f32)> {
    decode(opts, true).into_iter().map(|(tokens, gap)| (tokens, gap.expect("the first token's top-2"))).collect()
}

/// Builds an engine from `opts`, submits `request(core, i, prompt)` for every prompt at once,
/// runs it to the end, and returns each request's events.
fn run_prompts(
    opts: &EngineOptions,
    request: impl Fn(&EngineCore, usize, &str) -> EngineRequest,
) -> Vec<Vec<EngineEvent>> {
    let mut core = build_engine(opts).expect("building the engine");
    let receivers: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let (tx, rx) = unbounded_channel();
            let req = request(&core, i, text);
            core.add_request(req, tx);
            rx
        })
        .collect();
    while core.has_work() {
        core.step().expect("engine step");
    }
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut events = Vec::new();
            while let Ok(event) = rx.try_recv() {
                events.push(event);
            }
            events
        })
        .collect()
}

/// Greedy continuations, with the first token's top-2 gap when `logprobs` (which takes another
/// path on the GPU: rows with log-probabilities are copied whole).
fn decode(opts: &EngineOptions, logprobs: bool) -> Vec<(Vec<TokenId>, Option<f32>)> {
    let template = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let outputs = run_prompts(opts, |core, i, text| {
        let ids = core.tokenizer().encode_chat(&[ChatMessage::new("user", text)], &template).unwrap();
        let stop = StopParams { max_tokens: NEW_TOKENS, ignore_eos: true, ..Default::default() };
        let params = SamplingParams { logprobs: logprobs.then_some(2), ..SamplingParams::greedy() };
        EngineRequest::new(format!("p{i}"), ids, params, stop)
    });
    outputs
        .into_iter()
        .map(|events| {
            let mut tokens: HashMap<usize, Vec<TokenId>> = HashMap::new();
            let mut margin = None;
            for event in events {
                match event {
                    EngineEvent::Delta(d) => {
                        if margin.is_none()
                            && let Some(first) = d.logprobs.first()
                            && let [(_, _, a), (_, _, b), ..] = first.top[..]
                        {
                            margin = Some(a - b);
                        }
                        tokens.entry(d.index).or_default().extend(&d.token_ids)
                    }
                    EngineEvent::Failed(e) => panic!("request failed: {e}"),
                    EngineEvent::Finished { .. } | EngineEvent::PromptLogprobs(_) | EngineEvent::Embedding(_) => {}
                }
            }
            (tokens.remove(&0).unwrap_or_default(), margin)
        })
        .collect()
}

/// Tokens each prompt's output shares with the reference before the first difference.
fn agreement(got: &[Vec<TokenId>], want: &[Vec<TokenId>]) -> Vec<usize> {
    got.iter().zip(want).map(|(g, w)| g.iter().zip(w).take_while(|(a, b)| a == b).count()).collect()
}

#[test]
fn the_gpu_path_decodes_the_cpu_paths_greedy_tokens() {
    let (cpu, margins): (Vec<_>, Vec<_>) = greedy_with_margins(&options()).into_iter().unzip();
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
    println!("  first-token top-2 log-probability gap on the CPU: {margins:.3?}");
    assert_eq!(gpu_f32, cpu, "f32 on the GPU must decode the CPU path's greedy tokens");
    assert_eq!(chunked, cpu, "chunked prefill on the GPU must decode the same tokens");
    // bf16 rounds weights and activations (logits move by ~0.1): it must follow the f32 path's
    // first token wherever that choice is clear, and most prompts all the way.
    for (i, (&agree, &margin)) in bf16_agree.iter().zip(&margins).enumerate() {
        assert!(agree >= 1 || margin < CLEAR_MARGIN, "bf16 diverges at prompt {i}'s first token (gap {margin:.3})");
    }
    let whole = bf16_agree.iter().filter(|&&n| n == NEW_TOKENS).count();
    assert!(whole * 2 >= PROMPTS.len(), "bf16 follows only {whole} of {} prompts for all tokens", PROMPTS.len());
}

/// Pooled vectors of the prompts, all submitted at once to an engine served for pooling.
fn embed(opts: &EngineOptions) -> Vec<Vec<f32>> {
    let pooling = opts.pooling().unwrap().expect("a pooling runner");
    let outputs = run_prompts(opts, |core, i, text| {
        EngineRequest::pooling(format!("e{i}"), core.tokenizer().encode(text, true).unwrap(), pooling)
    });
    outputs
        .into_iter()
        .map(|events| {
            let mut vector = None;
            for event in events {
                match event {
                    EngineEvent::Embedding(v) => vector = Some(v),
                    EngineEvent::Failed(e) => panic!("request failed: {e}"),
                    _ => {}
                }
            }
            vector.expect("one embedding per request")
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn the_gpu_path_pools_the_cpu_paths_embeddings() {
    for pooling_type in [PoolingType::Last, PoolingType::Mean] {
        let pooled = EngineOptions {
            runner: Runner::Pooling,
            pooler_config: Some(PoolerConfig { pooling_type: Some(pooling_type), normalize: Some(true) }),
            ..options()
        };
        let cpu = embed(&pooled);
        let gpu_f32 = embed(&EngineOptions { device: "cuda".into(), dtype: GpuDType::Float32, ..pooled.clone() });
        let chunked = embed(&EngineOptions {
            device: "cuda".into(),
            dtype: GpuDType::Float32,
            max_num_batched_tokens: 24,
            ..pooled.clone()
        });
        let gpu_bf16 = embed(&EngineOptions { device: "cuda".into(), ..pooled.clone() });
        for (i, want) in cpu.iter().enumerate() {
            let (f32_cos, chunked_cos, bf16_cos) =
                (cosine(&gpu_f32[i], want), cosine(&chunked[i], want), cosine(&gpu_bf16[i], want));
            println!(
                "{pooling_type:?} prompt {i}: cosine to the CPU f32 {f32_cos:.6}, chunked {chunked_cos:.6}, bf16 {bf16_cos:.4}"
            );
            assert_eq!(gpu_f32[i].len(), want.len());
            assert!(f32_cos > 0.9999, "{pooling_type:?} prompt {i}: f32 GPU vector off the CPU one ({f32_cos})");
            assert!(chunked_cos > 0.9999, "{pooling_type:?} prompt {i}: chunked GPU vector off ({chunked_cos})");
            assert!(bf16_cos > 0.99, "{pooling_type:?} prompt {i}: bf16 GPU vector off ({bf16_cos})");
        }
    }
}
