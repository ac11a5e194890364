//! Batch invariance and block accounting of the engine on the real SmolLM2-135M-Instruct GGUF:
//! a request's greedy output is the same alone, in a batch of 16 mixed lengths, with a prefix
//! cache hit, with chunked prefill in small chunks, and after preemption and recompute.

mod common;

use common::{PROMPTS, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineRequest, FinishReason};
use lumen_worker::sampling::{SamplingParams, StopParams};

const OUTPUT_TOKENS: usize = 24;

fn greedy(id: String, prompt: Vec<TokenId>) -> EngineRequest {
    EngineRequest::new(
        id,
        prompt,
        SamplingParams::greedy(),
        StopParams { max_tokens: OUTPUT_TOKENS, ignore_eos: true, ..Default::default() },
    )
}

fn all_requests(core: &EngineCore) -> Vec<EngineRequest> {
    PROMPTS.iter().enumerate().map(|(i, p)| greedy(format!("r{i}"), chat(core, p))).collect()
}

/// Greedy output of every prompt, each run alone on a fresh engine state.
fn alone() -> Vec<Vec<TokenId>> {
    let mut core = engine(&options());
    all_requests(&core)
        .into_iter()
        .map(|req| {
            let out = run(&mut core, vec![req]).remove(0);
            assert_eq!(out.finish[&0], FinishReason::Length);
            out.tokens[&0].clone()
        })
        .collect()
}

fn batched(core: &mut EngineCore) -> Vec<Vec<TokenId>> {
    let reqs = all_requests(core);
    run(core, reqs).into_iter().map(|o| o.tokens[&0].clone()).collect()
}

#[test]
fn greedy_output_is_the_same_alone_batched_chunked_cached_and_preempted() {
    let reference = alone();
    assert!(reference.iter().all(|t| t.len() == OUTPUT_TOKENS));

    // All sixteen in one batch (prefix caching off, so every prompt is computed in full).
    let mut core = engine(&lumen_worker::engine::EngineOptions { enable_prefix_caching: false, ..options() });
    assert_eq!(batched(&mut core), reference, "batch of 16 mixed lengths");

    // With prefix caching: the second run finds every prompt's full blocks cached.
    let mut core = engine(&options());
    assert_eq!(batched(&mut core), reference, "first pass with prefix caching");
    let before = core.stats().prefix_cache_hits;
    assert_eq!(batched(&mut core), reference, "prefix cache hits");
    assert!(core.stats().prefix_cache_hits > before, "the second pass should hit the prefix cache");

    // Chunked prefill forced to 5-token chunks (decodes also share the 5-token budget).
    let mut core = engine(&lumen_worker::engine::EngineOptions { max_num_batched_tokens: 5, ..options() });
    assert_eq!(batched(&mut core), reference, "chunked prefill");

    // A cache too small for all sixteen at once: sequences are preempted and recomputed.
    let mut core = engine(&preempting_options());
    assert_eq!(batched(&mut core), reference, "after preemption");
    let stats = core.stats();
    assert!(stats.preemptions_total > 0, "the small cache should force preemption: {stats:?}");
    assert_eq!(stats.kv_blocks_used, 0, "every block is free again");
}

#[test]
fn every_block_is_free_or_cached_after_finished_aborted_and_preempted_requests() {
    let small = lumen_worker::engine::EngineOptions {
        kv_cache_memory: "12MiB".parse().unwrap(),
        max_model_len: Some(256),
        ..options()
    };
    let mut core = engine(&small);
    let mut rxs = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let max_tokens = 8 + 4 * (i % 5);
        let req = EngineRequest::new(
            format!("r{i}"),
            chat(&core, p),
            SamplingParams::greedy(),
            StopParams { max_tokens, ..Default::default() },
        );
        core.add_request(req, tx);
        rxs.push(rx);
    }
    let mut steps = 0;
    while core.has_work() {
        core.step().unwrap();
        steps += 1;
        // Abort a few requests mid-flight, and drop the receivers of two others (clients gone).
        if steps == 6 {
            core.abort("r3");
            core.abort("r9");
            rxs[5].close();
            rxs[12].close();
        }
        let s = core.stats();
        assert!(s.kv_blocks_used <= s.kv_blocks_total);
    }
    let stats = core.stats();
    assert!(stats.preemptions_total > 0, "{stats:?}");
    assert_eq!((stats.running, stats.waiting, stats.kv_blocks_used), (0, 0, 0), "{stats:?}");
    assert_eq!(stats.requests_finished_abort, 4);
    let outcomes: Vec<_> = rxs.into_iter().map(common::collect).collect();
    assert_eq!(outcomes[3].finish[&0], FinishReason::Abort);
    assert!(outcomes[0].usage.is_some());
}
