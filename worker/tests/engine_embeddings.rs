//! Pooling (embedding requests) on the real SmolLM2-135M-Instruct GGUF: a prompt's vector is the
//! same alone and inside a batch with other pooling and generating requests, with prefill split
//! into small chunks, on a second run whose blocks are in the prefix cache, and after preemption
//! and recompute; mean pooling over chunks equals mean pooling in one step; normalization gives
//! a unit vector along the raw one; nothing is sampled and every block is free afterwards.

mod common;

use common::{Outcome, PROMPTS, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest, PoolingParams, PoolingType};
use lumen_worker::sampling::{SamplingParams, StopParams};

const SAME: f64 = 0.9999;
/// Tokens each generating request in a batch produces.
const GENERATED: usize = 24;

fn params(pooling_type: PoolingType, normalize: bool) -> PoolingParams {
    PoolingParams { pooling_type, normalize }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn vector(out: &Outcome) -> &[f32] {
    assert_eq!(out.failed, None);
    assert_eq!(out.embeddings.len(), 1, "exactly one embedding per request");
    assert!(out.tokens.is_empty(), "nothing is sampled for a pooling request");
    assert_eq!(out.usage.expect("finished").completion_tokens, 0);
    &out.embeddings[0]
}

fn prompts(core: &EngineCore) -> Vec<Vec<TokenId>> {
    PROMPTS.iter().map(|p| chat(core, p)).collect()
}

/// Each prompt's vector, one request at a time.
fn alone(core: &mut EngineCore, prompts: &[Vec<TokenId>], p: PoolingParams) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| vector(&run(core, vec![EngineRequest::pooling(format!("a{i}"), ids.clone(), p)])[0]).to_vec())
        .collect()
}

/// Every prompt's vector, all submitted at once with a generating request between each two.
fn batched(core: &mut EngineCore, prompts: &[Vec<TokenId>], p: PoolingParams) -> Vec<Vec<f32>> {
    let mut requests = Vec::new();
    for (i, ids) in prompts.iter().enumerate() {
        requests.push(EngineRequest::pooling(format!("e{i}"), ids.clone(), p));
        let stop = StopParams { max_tokens: GENERATED, ignore_eos: true, ..Default::default() };
        requests.push(EngineRequest::new(format!("g{i}"), ids.clone(), SamplingParams::greedy(), stop));
    }
    let outs = run(core, requests);
    for generated in outs.iter().skip(1).step_by(2) {
        assert_eq!(generated.tokens[&0].len(), GENERATED, "the generating requests beside them run as usual");
    }
    outs.iter().step_by(2).map(|o| vector(o).to_vec()).collect()
}

fn assert_same(label: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let c = cosine(g, w);
        assert!(c > SAME, "{label}: prompt {i}: cosine {c}");
    }
}

#[test]
fn a_vector_is_the_same_alone_batched_chunked_cached_and_preempted() {
    for pooling_type in [PoolingType::Last, PoolingType::Mean] {
        let p = params(pooling_type, true);
        let mut core = engine(&EngineOptions { enable_prefix_caching: false, ..options() });
        let prompts = prompts(&core);
        let reference = alone(&mut core, &prompts, p);
        for v in &reference {
            let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{pooling_type:?}: normalized, got norm {norm}");
        }
        assert!(cosine(&reference[0], &reference[1]) < SAME, "different prompts give different vectors");
        let label = |what: &str| format!("{pooling_type:?}, {what}");
        assert_same(&label("batched"), &batched(&mut core, &prompts, p), &reference);

        let mut core = engine(&EngineOptions { max_num_batched_tokens: 5, ..options() });
        assert_same(&label("5-token chunks"), &batched(&mut core, &prompts, p), &reference);

        let mut core = engine(&options());
        assert_same(&label("prefix caching, cold"), &batched(&mut core, &prompts, p), &reference);
        assert_same(&label("prefix caching, warm"), &batched(&mut core, &prompts, p), &reference);

        // Small chunks in a small cache: prompts grow block by block and sequences are preempted.
        let mut core = engine(&EngineOptions { max_num_batched_tokens: 64, ..preempting_options() });
        assert_same(&label("preempted"), &batched(&mut core, &prompts, p), &reference);
        let stats = core.stats();
        assert!(stats.preemptions_total > 0, "the small cache should force preemption: {stats:?}");
        assert_eq!(stats.kv_blocks_used, 0, "every block is free again");
    }
}

#[test]
fn mean_pooling_reads_no_cached_block_and_last_token_pooling_may() {
    let mut core = engine(&options());
    let ids = chat(&core, PROMPTS[14]);
    assert!(ids.len() > 40, "spans several 16-token blocks");
    let mean = params(PoolingType::Mean, false);
    let first = run(&mut core, vec![EngineRequest::pooling("m1", ids.clone(), mean)]).remove(0);
    let second = run(&mut core, vec![EngineRequest::pooling("m2", ids.clone(), mean)]).remove(0);
    assert_eq!(second.usage.unwrap().cached_tokens, 0, "mean pooling needs every row: no cache read");
    assert!(cosine(vector(&first), vector(&second)) > SAME);
    let last = params(PoolingType::Last, false);
    let third = run(&mut core, vec![EngineRequest::pooling("l1", ids.clone(), last)]).remove(0);
    let cached = third.usage.unwrap().cached_tokens;
    assert!(cached >= 32, "last-token pooling reuses the cached prompt blocks: {cached}");
    assert_eq!(third.usage.unwrap().prompt_tokens, ids.len());
}

#[test]
fn normalization_scales_the_raw_vector_to_unit_length() {
    let mut core = engine(&options());
    let ids = chat(&core, PROMPTS[1]);
    for pooling_type in [PoolingType::Last, PoolingType::Mean, PoolingType::Cls] {
        let raw = run(&mut core, vec![EngineRequest::pooling("r", ids.clone(), params(pooling_type, false))]).remove(0);
        let unit = run(&mut core, vec![EngineRequest::pooling("u", ids.clone(), params(pooling_type, true))]).remove(0);
        let (raw, unit) = (vector(&raw), vector(&unit));
        assert_eq!(raw.len(), core.model().config().hidden_size);
        let norm = raw.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 1.0, "{pooling_type:?}: raw hidden states are not unit vectors ({norm})");
        for (r, u) in raw.iter().zip(unit) {
            assert!((f64::from(*r) / norm - f64::from(*u)).abs() < 1e-5, "{pooling_type:?}");
        }
    }
}

#[test]
fn an_input_longer_than_max_model_len_is_refused_with_vllms_message() {
    let mut core = engine(&EngineOptions { max_model_len: Some(32), ..options() });
    let p = params(PoolingType::Last, true);
    let fits = run(&mut core, vec![EngineRequest::pooling("ok", vec![1; 32], p)]).remove(0);
    assert_eq!(vector(&fits).len(), core.model().config().hidden_size, "exactly max_model_len tokens fit");
    let refused = run(&mut core, vec![EngineRequest::pooling("long", vec![1; 33], p)]).remove(0);
    let message = refused.failed.expect("refused");
    assert!(message.contains("maximum context length is 32 tokens") && message.contains("33 tokens"), "{message}");
}
