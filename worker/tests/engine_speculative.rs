//! Speculative decoding with the prompt-lookup (`ngram`) proposer on the real SmolLM2 GGUF:
//! greedy output identical to decoding without it (mixed with `n > 1`, stop strings, logprobs,
//! `min_tokens`, short `max_tokens` and preemption), sampled tokens following the same
//! distribution (a two-sample chi-square test on many seeded draws), drafts accepted at all, and
//! no KV block left behind by rejected drafts.

mod common;

use std::collections::HashMap;

use common::{Outcome, PROMPTS, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest};
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::spec::SpeculativeConfig;

fn speculative(opts: EngineOptions, k: usize) -> EngineOptions {
    let json = format!(
        r#"{{"method": "ngram", "num_speculative_tokens": {k}, "prompt_lookup_min": 1, "prompt_lookup_max": 4}}"#
    );
    EngineOptions { speculative_config: Some(SpeculativeConfig::parse_json(&json).unwrap()), ..opts }
}

/// Prompts whose answers repeat what they read (where prompt lookup proposes well) and ordinary
/// ones.
fn prompts(core: &EngineCore) -> Vec<Vec<TokenId>> {
    let repetitive = [
        "Repeat this list exactly, three times: apple, banana, cherry, date, elderberry, fig, grape.",
        "Copy this sentence word for word: The quick brown fox jumps over the lazy dog near the river bank.",
        "Write the numbers from 1 to 30, separated by commas.",
    ];
    repetitive.iter().chain(&PROMPTS[..5]).map(|p| chat(core, p)).collect()
}

fn greedy_requests(prompts: &[Vec<TokenId>], stop: &StopParams) -> Vec<EngineRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| EngineRequest::new(format!("r{i}"), p.clone(), SamplingParams::greedy(), stop.clone()))
        .collect()
}

fn same(what: &str, plain: &[Outcome], spec: &[Outcome]) {
    for (i, (a, b)) in plain.iter().zip(spec).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}: request {i}'s tokens");
        assert_eq!(a.text, b.text, "{what}: request {i}'s text");
        assert_eq!(a.finish, b.finish, "{what}: request {i}'s finish reasons");
        assert_eq!(a.usage, b.usage, "{what}: request {i}'s usage");
        assert_eq!(a.failed, b.failed, "{what}: request {i}");
    }
}

#[test]
fn greedy_output_is_identical_with_and_without_speculation_and_drafts_leave_no_blocks() {
    let mut plain = engine(&options());
    let prompts = prompts(&plain);
    let stop = StopParams { max_tokens: 64, ..Default::default() };
    let expected = run(&mut plain, greedy_requests(&prompts, &stop));
    for k in [1, 4, 8] {
        let mut core = engine(&speculative(options(), k));
        let got = run(&mut core, greedy_requests(&prompts, &stop));
        same(&format!("k={k}"), &expected, &got);
        let stats = core.stats();
        let spec = &stats.spec_decode;
        assert!(spec.drafts > 0 && spec.accepted_tokens > 0, "k={k}: drafts were proposed and accepted: {spec:?}");
        assert!(spec.accepted_tokens <= spec.draft_tokens && spec.accepted_per_position.len() <= k);
        assert_eq!(spec.accepted_per_position.iter().sum::<u64>(), spec.accepted_tokens);
        // Every accepted token saved a step: the speculative run took fewer.
        assert!(stats.steps_total < plain.stats().steps_total, "k={k}: {} steps", stats.steps_total);
        assert_eq!(stats.kv_blocks_used, 0, "k={k}: blocks left behind");
        assert_eq!(stats.generation_tokens_total, plain.stats().generation_tokens_total);
    }
}

#[test]
fn stop_strings_logprobs_n_min_tokens_and_short_limits_mix_with_speculation() {
    let mut plain = engine(&options());
    let mut core = engine(&speculative(options(), 5));
    let count = chat(&plain, "Write the numbers from 1 to 30, separated by commas.");
    let copy = chat(&plain, "Repeat this list exactly, three times: apple, banana, cherry, date, elderberry.");
    let eos = plain.tokenizer().eos_token_ids().to_vec();
    let make = |id: &str, prompt: &Vec<TokenId>, sampling: SamplingParams, stop: StopParams, n: usize| {
        let mut r = EngineRequest::new(id, prompt.clone(), sampling, stop);
        r.n = n;
        r
    };
    let logprobs = SamplingParams { logprobs: Some(3), ..SamplingParams::greedy() };
    let requests = vec![
        make(
            "stop",
            &count,
            SamplingParams::greedy(),
            StopParams { max_tokens: 80, stop: vec!["17".into()], ..Default::default() },
            1,
        ),
        make(
            "stop-in",
            &copy,
            SamplingParams::greedy(),
            StopParams {
                max_tokens: 80,
                stop: vec!["Cherry, Date".into()],
                include_stop_str_in_output: true,
                ..Default::default()
            },
            1,
        ),
        make("logprobs", &copy, logprobs, StopParams { max_tokens: 40, ..Default::default() }, 1),
        make("n2", &count, SamplingParams::greedy(), StopParams { max_tokens: 30, ..Default::default() }, 2),
        make("short", &copy, SamplingParams::greedy(), StopParams { max_tokens: 2, ..Default::default() }, 1),
        make(
            "min",
            &copy,
            SamplingParams::greedy(),
            StopParams { max_tokens: 60, min_tokens: 50, stop_token_ids: eos.clone(), ..Default::default() },
            1,
        ),
        make(
            "penalty",
            &copy,
            SamplingParams { repetition_penalty: 1.3, frequency_penalty: 0.4, ..SamplingParams::greedy() },
            StopParams { max_tokens: 40, ..Default::default() },
            1,
        ),
    ];
    let expected = run(&mut plain, requests.clone());
    let got = run(&mut core, requests);
    same("mixed", &expected, &got);
    for (a, b) in expected.iter().zip(&got) {
        // Log-probabilities come from the same rows: equal to float precision.
        for (i, lps) in &a.logprobs {
            for (x, y) in lps.iter().zip(&b.logprobs[i]) {
                assert_eq!(
                    (x.token, &x.top.iter().map(|t| t.0).collect::<Vec<_>>()),
                    (y.token, &y.top.iter().map(|t| t.0).collect::<Vec<_>>())
                );
                assert!((x.logprob - y.logprob).abs() < 1e-3, "{} vs {}", x.logprob, y.logprob);
            }
        }
    }
    assert!(got[1].text[&0].ends_with("Cherry, Date"), "the stop string ended it: {:?}", got[1].text);
    assert!(got[0].text[&0].ends_with("16, ") && !got[0].text[&0].contains("17"), "{:?}", got[0].text);
    assert_eq!(got[4].tokens[&0].len(), 2);
    assert!(core.stats().spec_decode.accepted_tokens > 0);
    assert_eq!(core.stats().kv_blocks_used, 0);
}

#[test]
fn preempted_speculating_sequences_recompute_to_the_same_output() {
    let mut plain = engine(&preempting_options());
    let prompts: Vec<_> = PROMPTS.iter().map(|p| chat(&plain, p)).collect();
    let stop = StopParams { max_tokens: 40, ignore_eos: true, ..Default::default() };
    let expected = run(&mut plain, greedy_requests(&prompts, &stop));
    let mut core = engine(&speculative(preempting_options(), 4));
    let got = run(&mut core, greedy_requests(&prompts, &stop));
    same("preempting", &expected, &got);
    let stats = core.stats();
    assert!(stats.preemptions_total > 0, "the cache was small enough to preempt");
    assert!(stats.spec_decode.accepted_tokens > 0);
    assert_eq!(stats.kv_blocks_used, 0);
}

/// The chi-square statistic of two samples' counts over the same categories (those seen fewer
/// than 10 times in both together merged into one), and its degrees of freedom.
fn chi_square(a: &HashMap<TokenId, u32>, b: &HashMap<TokenId, u32>) -> (f64, usize) {
    let mut keys: Vec<_> = a.keys().chain(b.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let (mut cells, mut rest) = (Vec::new(), (0.0, 0.0));
    for k in keys {
        let (x, y) = (*a.get(&k).unwrap_or(&0) as f64, *b.get(&k).unwrap_or(&0) as f64);
        if x + y < 10.0 {
            rest = (rest.0 + x, rest.1 + y);
        } else {
            cells.push((x, y));
        }
    }
    if rest.0 + rest.1 > 0.0 {
        cells.push(rest);
    }
    let stat = cells.iter().map(|(x, y)| (x - y) * (x - y) / (x + y)).sum();
    (stat, cells.len().saturating_sub(1))
}

/// The chi-square quantile at 1 - 0.001 for `df` degrees of freedom (Wilson-Hilferty).
fn critical(df: usize) -> f64 {
    let d = df as f64;
    let z = 3.09;
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

#[test]
fn sampled_tokens_follow_the_same_distribution_with_speculation() {
    const DRAWS: u64 = 1200;
    const LEN: usize = 8;
    let draw = |opts: &EngineOptions| {
        let mut core = engine(opts);
        let prompt = chat(&core, "Repeat this list exactly, three times: red, green, blue, red, green, blue.");
        let sampling =
            |seed| SamplingParams { temperature: 1.0, top_k: Some(3), seed: Some(seed), ..Default::default() };
        let stop = StopParams { max_tokens: LEN, ignore_eos: true, ..Default::default() };
        let requests: Vec<_> = (0..DRAWS)
            .map(|s| EngineRequest::new(format!("d{s}"), prompt.clone(), sampling(s), stop.clone()))
            .collect();
        let outcomes = run(&mut core, requests);
        let mut per_position = vec![HashMap::<TokenId, u32>::new(); LEN];
        for o in &outcomes {
            for (i, t) in o.tokens[&0].iter().enumerate() {
                *per_position[i].entry(*t).or_default() += 1;
            }
        }
        (per_position, core.stats())
    };
    let (plain, _) = draw(&options());
    let (spec, stats) = draw(&speculative(options(), 4));
    let accepted = stats.spec_decode.accepted_tokens;
    assert!(
        accepted > DRAWS / 4,
        "drafts must be accepted often for the test to mean something: {:?}",
        stats.spec_decode
    );
    let mut varied = 0;
    for (i, (a, b)) in plain.iter().zip(&spec).enumerate() {
        let (stat, df) = chi_square(a, b);
        varied += usize::from(df >= 1);
        if df >= 1 {
            assert!(stat < critical(df), "position {i}: chi-square {stat:.1} over {df} df (p < 0.001): {a:?} vs {b:?}");
        }
    }
    assert!(varied >= LEN / 2, "most positions must have more than one likely token");
}
