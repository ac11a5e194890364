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
    run_some_prompts(opts, &PROMPTS, request)
}

/// [`run_prompts`] for `prompts`.
fn run_some_prompts(
    opts: &EngineOptions,
    prompts: &[&str],
    request: impl Fn(&EngineCore, usize, &str) -> EngineRequest,
) -> Vec<Vec<EngineEvent>> {
    let mut core = build_engine(opts).expect("building the engine");
    let receivers: Vec<_> = prompts
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

/// `--quantization fp8` (the linear layers quantized per channel as they load): the GPU holds
/// the CPU's FP8 weights bit for bit (both quantize the same f32 values), but computes in bf16
/// and, in products of more than the GEMV's rows, with activations quantized per token (~2.5%
/// each, which the CPU does not do): it must follow the CPU's first token wherever that choice is
/// clear, and a quarter of the prompts all the way; its decode graphs replay the eager steps'
/// tokens.
#[test]
fn fp8_weights_on_the_gpu_decode_the_cpus_fp8_tokens_with_and_without_graphs() {
    let fp8 = |o: EngineOptions| EngineOptions { quantization: Some("fp8".into()), ..o };
    let (cpu, margins): (Vec<_>, Vec<_>) = greedy_with_margins(&fp8(options())).into_iter().unzip();
    let gpu = greedy(&fp8(EngineOptions { device: "cuda".into(), ..options() }));
    let eager = greedy(&fp8(EngineOptions { device: "cuda".into(), enforce_eager: true, ..options() }));
    assert_eq!(gpu, eager, "fp8: graph replay against eager launches");
    let agree = agreement(&gpu, &cpu);
    println!("fp8 GPU tokens agreeing with the CPU's fp8 model (of {NEW_TOKENS}): {agree:?}; gaps {margins:.3?}");
    for (i, (&n, &margin)) in agree.iter().zip(&margins).enumerate() {
        assert!(n >= 1 || margin < CLEAR_MARGIN, "fp8 diverges at prompt {i}'s first token (gap {margin:.3})");
    }
    let whole = agree.iter().filter(|&&n| n == NEW_TOKENS).count();
    assert!(whole * 4 >= PROMPTS.len(), "fp8 follows only {whole} of {} prompts for all tokens", PROMPTS.len());
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

/// Greedy SmolLM2 decodes the same tokens whether its decode steps replay CUDA graphs (the
/// default) or launch every kernel (`enforce_eager`): eight prompts (a ladder size) and five
/// (padded to eight), in f32 and bf16.
#[test]
fn graph_replay_decodes_the_eager_steps_greedy_tokens() {
    for dtype in [GpuDType::Float32, GpuDType::Bfloat16] {
        let gpu = EngineOptions { device: "cuda".into(), dtype, enforce_eager: false, ..options() };
        let graphs = greedy(&gpu);
        let eager = greedy(&EngineOptions { enforce_eager: true, ..gpu.clone() });
        assert_eq!(graphs, eager, "{dtype:?}: graph replay against eager launches");
        let five = |opts: &EngineOptions| decode_first(opts, 5);
        assert_eq!(five(&gpu), five(&EngineOptions { enforce_eager: true, ..gpu.clone() }), "{dtype:?}, 5 streams");
    }
}

/// Speculative decoding on the GPU (the ngram proposer; drafts verified in multi-row steps,
/// which run eagerly, their rows reduced on the device where the plan allows) gives the greedy
/// tokens of plain decoding, in f32. In bf16 the product of one row (our GEMV) and of several
/// (cuBLAS) round differently, so near-ties may break differently, as in vLLM.
#[test]
fn speculative_decoding_on_the_gpu_keeps_the_greedy_tokens() {
    let gpu = EngineOptions { device: "cuda".into(), dtype: GpuDType::Float32, ..options() };
    let json = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;
    let config = crate::spec::SpeculativeConfig::parse_json(json).unwrap();
    let spec = EngineOptions { speculative_config: Some(config), ..gpu.clone() };
    assert_eq!(decode_first(&spec, 5), decode_first(&gpu, 5), "5 streams, with and without drafts");
    assert_eq!(decode_first(&spec, 1), decode_first(&gpu, 1), "one stream");
}

/// A draft model on the GPU (SmolLM2 drafting for itself, `draft_model`): its own KV cache of as
/// many blocks as the target's, both out of one `gpu_memory_utilization` budget, the target's
/// greedy tokens unchanged (f32), and the draft's proposals accepted (it computes what the
/// target computes).
#[test]
fn a_draft_model_on_the_gpu_keeps_the_greedy_tokens_and_shares_the_memory_budget() {
    let gpu = EngineOptions { device: "cuda".into(), dtype: GpuDType::Float32, ..options() };
    let json = serde_json::json!({"model": model_path(), "num_speculative_tokens": 4}).to_string();
    let config = crate::spec::SpeculativeConfig::parse_json(&json).unwrap();
    let spec = EngineOptions { speculative_config: Some(config), ..gpu.clone() };
    assert_eq!(decode_first(&spec, 5), decode_first(&gpu, 5), "5 streams, with and without a draft model");
    assert_eq!(decode_first(&spec, 1), decode_first(&gpu, 1), "one stream");
    let plain_blocks = build_engine(&gpu).unwrap().model().num_blocks();
    let mut core = build_engine(&spec).unwrap();
    let (target, draft) = (core.model().num_blocks(), core.draft_model().unwrap().model().num_blocks());
    assert_eq!(target, draft, "the caches hold as many blocks");
    assert!(target <= plain_blocks / 2, "two caches of the same model share one budget: {target} of {plain_blocks}");
    let ids = core.tokenizer().encode("Count from one to twenty: one, two, three,", true).unwrap();
    let stop = StopParams { max_tokens: 48, ignore_eos: true, ..Default::default() };
    let (tx, _rx) = unbounded_channel();
    core.add_request(EngineRequest::new("d", ids, SamplingParams::greedy(), stop), tx);
    while core.has_work() {
        core.step().expect("engine step");
    }
    let spec = core.stats().spec_decode;
    assert!(spec.draft_tokens > 0 && spec.accepted_tokens * 10 >= spec.draft_tokens * 9, "{spec:?}");
}

/// Greedy continuations of the first `n` prompts, submitted at once.
fn decode_first(opts: &EngineOptions, n: usize) -> Vec<Vec<TokenId>> {
    let template = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let outputs = run_some_prompts(opts, &PROMPTS[..n], |core, i, text| {
        let ids = core.tokenizer().encode_chat(&[ChatMessage::new("user", text)], &template).unwrap();
        let stop = StopParams { max_tokens: NEW_TOKENS, ignore_eos: true, ..Default::default() };
        EngineRequest::new(format!("p{i}"), ids, SamplingParams::greedy(), stop)
    });
    let tokens = |events: Vec<EngineEvent>| -> Vec<TokenId> {
        let mut tokens = Vec::new();
        for event in events {
            match event {
                EngineEvent::Delta(d) => tokens.extend(&d.token_ids),
                EngineEvent::Failed(e) => panic!("request failed: {e}"),
                _ => {}
            }
        }
        tokens
    };
    outputs.into_iter().map(tokens).collect()
}

/// One decode step replayed from a graph against the same step launched eagerly, on a model
/// with random weights: bit for bit where the batch is a size of the ladder (the same kernels
/// with the same arguments), within rounding where it is padded (cuBLAS may pick other kernels
/// for more rows); short contexts (no split) and long ones (attention split over the context,
/// merged in the launch).
#[test]
fn a_replayed_decode_step_computes_the_eager_steps_logits() {
    use super::weights::WeightOrigin;
    use super::{CudaLlama, CudaModelOptions};
    use crate::model::Model;
    use crate::model::batch::ForwardBatch;
    use crate::model::config::LlamaConfig;

    let config = LlamaConfig::from_hf_json(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
            "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let block_size = 16;
    for dtype in [candle_core::DType::BF16, candle_core::DType::F32] {
        let opts = CudaModelOptions {
            ordinal: 0,
            dtype,
            block_size,
            max_model_len: 2048,
            max_num_seqs: 13,
            max_num_batched_tokens: 4096,
            gpu_memory_utilization: 0.2,
            gpu_memory_limit: None,
            pooling: false,
            enforce_eager: false,
            quantization: crate::model::quant::Quantization::None,
            draft_tokens: 0,
            kv: Default::default(),
        };
        let mut model = CudaLlama::load(config.clone(), &WeightOrigin::Random { seed: 7 }, &opts).unwrap();
        if model.graph_sizes().is_empty() {
            // Loading logs a failed capture and serves eagerly; capture again to see why.
            let error = model.capture_graphs(13).err();
            panic!("{dtype:?}: no graphs captured at load; capturing again: {error:?}");
        }
        assert_eq!(model.graph_sizes(), &[1, 2, 4, 8, 16], "the ladder up to 13 sequences, padded");
        for (count, len) in [(8, 40), (13, 40), (3, 900), (1, 1500), (2, 700)] {
            let (mut prefill, mut decode) = (ForwardBatch::default(), ForwardBatch::default());
            let mut next_block = 0u32;
            for i in 0..count {
                let blocks = (len + 1usize).div_ceil(block_size) as u32;
                let table: Vec<u32> = (next_block..next_block + blocks).collect();
                next_block += blocks;
                let tokens: Vec<TokenId> = (0..len).map(|t| ((t * 7 + i * 13) % 1000) as TokenId).collect();
                prefill.push_seq(&tokens, 0, &table, block_size, true);
                decode.push_seq(&[(i * 31 % 1000) as TokenId], len, &table, block_size, true);
            }
            model.forward(&prefill).unwrap();
            let padded = model.graph_rows(&decode).expect("a decode step replays a graph");
            let replayed = model.forward(&decode).unwrap().to_vec();
            model.set_eager(true);
            assert_eq!(model.graph_rows(&decode), None);
            let eager = model.forward(&decode).unwrap().to_vec();
            model.set_eager(false);
            assert_eq!(replayed.len(), count * 1000);
            let scale = eager.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = replayed.iter().zip(&eager).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("{dtype:?}, {count} sequences of {len} (graph of {padded}): worst difference {worst} of {scale}");
            assert!(replayed.iter().all(|v| v.is_finite()));
            if padded == count {
                assert!(replayed == eager, "{dtype:?}, {count} x {len}: the replay must equal the eager step");
            } else {
                assert!(worst <= 0.02 * scale, "{dtype:?}, {count} x {len}: {worst} of {scale}");
            }
        }
    }
}
