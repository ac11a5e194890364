//! Prompt log-probabilities on the real SmolLM2-135M-Instruct GGUF: what one prefill reports for
//! every prompt token equals what teacher forcing through the engine gives, one prefix at a time
//! (the prefix as the prompt, the next prompt token forced by `logit_bias`, its log-probability
//! read from the sampling row's raw logits, which the bias does not touch). The same holds with
//! chunked prefill in small chunks, on a second run whose prompt blocks are in the prefix cache
//! (which a request for prompt log-probabilities must not read), after preemption and recompute,
//! and with `n > 1`. Entries come in one event, before the first delta.

mod common;

use common::{Outcome, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest, TokenLogprob};
use lumen_worker::sampling::{SamplingParams, StopParams};

const TOLERANCE: f32 = 1e-4;

fn scoring(id: &str, prompt: Vec<TokenId>, k: usize) -> EngineRequest {
    let mut req = EngineRequest::new(
        id,
        prompt,
        SamplingParams::greedy(),
        StopParams { max_tokens: 2, ignore_eos: true, ..Default::default() },
    );
    req.prompt_logprobs = Some(k);
    req
}

/// `prompt[i]`'s log-probability after `prompt[..i]`, for `i` in `1..len`, one request each.
fn teacher_forced(core: &mut EngineCore, prompt: &[TokenId]) -> Vec<f32> {
    (1..prompt.len())
        .map(|i| {
            let sampling =
                SamplingParams { logit_bias: vec![(prompt[i], 100.0)], logprobs: Some(0), ..SamplingParams::greedy() };
            let stop = StopParams { max_tokens: 1, ignore_eos: true, ..Default::default() };
            let out = run(core, vec![EngineRequest::new(format!("tf{i}"), prompt[..i].to_vec(), sampling, stop)]);
            let lp = &out[0].logprobs[&0][0];
            assert_eq!(lp.token, prompt[i], "the bias forces the prompt's next token");
            lp.logprob
        })
        .collect()
}

fn entries(out: &Outcome) -> &[TokenLogprob] {
    assert_eq!(out.failed, None);
    assert_eq!(out.prompt_logprob_events, 1, "prompt logprobs are sent exactly once");
    out.prompt_logprobs.as_deref().expect("prompt logprobs")
}

/// Checks one run's entries against the reference, token by token and in sum.
fn check(label: &str, got: &[TokenLogprob], prompt: &[TokenId], reference: &[f32], k: usize) {
    assert_eq!(got.len(), prompt.len() - 1, "{label}: one entry per prompt token after the first");
    for (i, (e, &want)) in got.iter().zip(reference).enumerate() {
        assert_eq!(e.token, prompt[i + 1], "{label}: entry {i} is the next prompt token");
        assert!((e.logprob - want).abs() < TOLERANCE, "{label}: token {i}: {} vs {want}", e.logprob);
        assert_eq!(e.top.len(), k, "{label}: k alternatives");
        assert!(e.rank >= 1);
        let better = e.top.iter().filter(|t| t.2 > e.logprob).count();
        if e.rank as usize <= k {
            assert_eq!(e.top[e.rank as usize - 1].0, e.token, "{label}: token {i}'s rank matches its place");
        } else {
            assert_eq!(better, k, "{label}: a token ranked past k is below every alternative");
        }
    }
    let (sum, want): (f32, f32) = (got.iter().map(|e| e.logprob).sum(), reference.iter().sum());
    assert!((sum - want).abs() < TOLERANCE * reference.len() as f32, "{label}: sum {sum} vs {want}");
}

fn prompt(core: &EngineCore) -> Vec<TokenId> {
    chat(core, "Explain in two sentences why the sky is blue, and what happens to its colour at sunset.")
}

#[test]
fn prompt_logprobs_match_teacher_forcing_whole_chunked_and_cache_warm() {
    let mut core = engine(&options());
    let prompt = prompt(&core);
    assert!(prompt.len() > 40, "spans several 16-token blocks: {}", prompt.len());
    let reference = teacher_forced(&mut core, &prompt);

    // One prefill on a fresh engine.
    let mut fresh = engine(&options());
    let out = run(&mut fresh, vec![scoring("whole", prompt.clone(), 3)]).remove(0);
    check("one prefill", entries(&out), &prompt, &reference, 3);
    assert_eq!(out.tokens[&0].len(), 2, "generation goes on after the prompt");

    // Warm cache: the teacher-forced runs left the prompt's blocks cached; this request must
    // compute them anyway and report no cached tokens.
    let hits = core.stats().prefix_cache_hits;
    let out = run(&mut core, vec![scoring("warm", prompt.clone(), 3)]).remove(0);
    check("prefix cache warm", entries(&out), &prompt, &reference, 3);
    assert_eq!(out.usage.unwrap().cached_tokens, 0, "no prompt block read from the cache");
    assert_eq!(core.stats().prefix_cache_hits, hits);
    // A plain request afterwards still hits the cache.
    let stop = StopParams { max_tokens: 1, ..Default::default() };
    let plain = EngineRequest::new("plain", prompt.clone(), SamplingParams::greedy(), stop);
    let out = run(&mut core, vec![plain]).remove(0);
    assert!(out.usage.unwrap().cached_tokens > 0);

    // Chunked prefill: 7 tokens a step, beside another request.
    let mut chunked = engine(&EngineOptions { max_num_batched_tokens: 7, ..options() });
    let other = scoring("other", chat(&chunked, "Hi!"), 0);
    let outs = run(&mut chunked, vec![scoring("chunked", prompt.clone(), 5), other]);
    check("chunked prefill", entries(&outs[0]), &prompt, &reference, 5);
    assert_eq!(entries(&outs[1]).len(), chat(&chunked, "Hi!").len() - 1);

    // n > 1: the prompt is scored once, before the choices fork.
    let mut req = scoring("forks", prompt.clone(), 1);
    req.n = 3;
    req.sampling = SamplingParams { temperature: 1.0, seed: Some(7), ..SamplingParams::greedy() };
    let out = run(&mut fresh, vec![req]).remove(0);
    check("n = 3", entries(&out), &prompt, &reference, 1);
    assert_eq!(out.tokens.len(), 3);
}

#[test]
fn prompt_logprobs_survive_preemption_without_duplicates() {
    let mut core = engine(&preempting_options());
    let prompt = prompt(&core);
    let reference = teacher_forced(&mut core, &prompt);
    // Sixteen long requests in a cache too small for them: some are preempted and recomputed.
    let reqs: Vec<EngineRequest> = (0..16)
        .map(|i| {
            let mut r = scoring(&format!("p{i}"), prompt.clone(), 2);
            r.stop.max_tokens = 100;
            r
        })
        .collect();
    let before = core.stats().preemptions_total;
    let outs = run(&mut core, reqs);
    assert!(core.stats().preemptions_total > before, "the test needs preemption");
    for (i, out) in outs.iter().enumerate() {
        check(&format!("request {i}"), entries(out), &prompt, &reference, 2);
    }
}

#[test]
fn a_one_token_prompt_has_no_prompt_logprobs_and_k_is_bounded() {
    let mut core = engine(&options());
    let out = run(&mut core, vec![scoring("one", vec![1], 2)]).remove(0);
    assert_eq!(entries(&out), &[] as &[TokenLogprob]);
    let out = run(&mut core, vec![scoring("big", vec![1, 2, 3], 21)]).remove(0);
    assert!(out.failed.as_deref().is_some_and(|e| e.contains("prompt_logprobs")), "{:?}", out.failed);
}
