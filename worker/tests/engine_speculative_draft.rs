//! Speculative decoding with a draft model (`draft_model`) on the real SmolLM2 GGUF: SmolLM2
//! drafting for itself (every draft accepted), and a smaller draft cut from its first layers
//! (drafts partly accepted), both giving exactly the output of decoding without a draft, greedy
//! and seeded sampling, with stop strings, `n > 1`, penalties and preemption, and leaving no
//! block behind in either cache; a draft that cannot serve the target is refused by name.

mod common;

use std::path::Path;

use common::hf::{f32_tensor, write_checkpoint_layers};
use common::{Outcome, PROMPTS, chat, engine, model_path, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest, FinishReason, build_engine};
use lumen_worker::model::gguf::GgufFile;
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::spec::SpeculativeConfig;

fn drafted(opts: EngineOptions, draft: &Path, k: usize) -> EngineOptions {
    let json = serde_json::json!({"model": draft.display().to_string(), "num_speculative_tokens": k});
    EngineOptions { speculative_config: Some(SpeculativeConfig::parse_json(&json.to_string()).unwrap()), ..opts }
}

/// SmolLM2 with only its first `layers` of 30 layers, as a Hugging Face checkpoint in f32.
fn cut_draft(dir: &Path, layers: usize) {
    let gguf = GgufFile::open(&model_path()).unwrap();
    write_checkpoint_layers(&gguf, dir, Some(layers), serde_json::Value::Null, |name, shape, values| {
        vec![f32_tensor(name, shape, &values)]
    });
}

/// Greedy requests over [`PROMPTS`], and seeded sampled ones, some with two choices.
fn requests(core: &EngineCore, max_tokens: usize) -> Vec<EngineRequest> {
    let mut out = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let prompt: Vec<TokenId> = chat(core, p);
        // Every third request ends at a stop string (a draft token may carry it, or straddle it).
        let stop = match i % 3 {
            2 => StopParams {
                max_tokens,
                stop: vec![". ".into(), "\n\n".into()],
                include_stop_str_in_output: true,
                ..Default::default()
            },
            _ => StopParams { max_tokens, ..Default::default() },
        };
        let sampling = match i % 4 {
            0 | 1 => SamplingParams::greedy(),
            2 => SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Default::default() },
            _ => SamplingParams { repetition_penalty: 1.2, ..SamplingParams::greedy() },
        };
        let mut r = EngineRequest::new(format!("r{i}"), prompt, sampling, stop);
        r.n = if i % 5 == 4 { 2 } else { 1 };
        out.push(r);
    }
    out
}

fn same(what: &str, plain: &[Outcome], spec: &[Outcome]) {
    assert_eq!(plain.len(), spec.len());
    for (i, (a, b)) in plain.iter().zip(spec).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}: request {i}'s tokens");
        assert_eq!(a.text, b.text, "{what}: request {i}'s text");
        assert_eq!(a.finish, b.finish, "{what}: request {i}'s finish reasons");
        assert_eq!(a.usage, b.usage, "{what}: request {i}'s usage");
    }
}

/// Runs `requests` and checks the draft's cache is given back once nothing runs.
fn run_drafted(core: &mut EngineCore, requests: Vec<EngineRequest>) -> Vec<Outcome> {
    let out = run(core, requests);
    assert!(!core.step().unwrap(), "nothing left to run");
    let draft = core.draft_model().expect("a draft model proposes");
    assert_eq!((draft.num_seqs(), draft.blocks_used()), (0, 0), "the draft's cache is free again");
    assert_eq!(core.stats().kv_blocks_used, 0, "the target's cache is free again");
    out
}

#[test]
fn smollm2_drafting_for_itself_changes_no_output_and_is_accepted() {
    let mut plain = engine(&options());
    let reqs = requests(&plain, 48);
    let expected = run(&mut plain, reqs.clone());
    let mut core = engine(&drafted(options(), &model_path(), 4));
    let got = run_drafted(&mut core, reqs);
    same("self-draft", &expected, &got);
    let stats = core.stats();
    let spec = &stats.spec_decode;
    // The draft computes what the target does: greedy drafts hold unless sampling or a penalty
    // picks another token.
    assert!(spec.drafts > 0 && spec.accepted_tokens * 10 >= spec.draft_tokens * 6, "{spec:?}");
    assert!(
        stats.steps_total < plain.stats().steps_total,
        "{} vs {} steps",
        stats.steps_total,
        plain.stats().steps_total
    );
    // Greedy alone: the draft's rows are the target's own (the CPU's kernels give a row the
    // same values whatever else is in the batch), so every draft token holds, but for those
    // after a choice's end (a choice ends once at most).
    let mut core = engine(&drafted(options(), &model_path(), 4));
    let greedy: Vec<EngineRequest> =
        requests(&core, 32).into_iter().map(|r| EngineRequest { sampling: SamplingParams::greedy(), ..r }).collect();
    let choices = greedy.iter().map(|r| r.n as u64).sum::<u64>();
    run_drafted(&mut core, greedy);
    let spec = core.stats().spec_decode;
    assert!(spec.drafts > 0 && spec.draft_tokens - spec.accepted_tokens <= choices, "{spec:?}");
}

#[test]
fn the_draft_prefills_in_step_with_the_target_and_needs_no_second_prefill() {
    // A draft cheap enough to pay on this CPU (two of SmolLM2's layers), 64-token prompt chunks.
    let dir = tempfile::tempdir().unwrap();
    cut_draft(dir.path(), 2);
    let q8 = EngineOptions { max_num_batched_tokens: 64, cpu_weight_format: "q8_0".parse().unwrap(), ..options() };
    let opts = drafted(q8, dir.path(), 3);
    let mut core = engine(&opts);
    // The controller first learns what steps and drafts cost (it prefills no draft before).
    let warm_up = chat(&core, PROMPTS[0]);
    let stop = |n| StopParams { max_tokens: n, ignore_eos: true, ..Default::default() };
    run_drafted(&mut core, vec![EngineRequest::new("warm-up", warm_up, SamplingParams::greedy(), stop(48))]);
    // Then each chunk of a long prompt goes through the draft in the step the target computes
    // it, so the first decode step's draft catches up on one token, not the prompt.
    let text = PROMPTS.join(" ");
    let prompt = chat(&core, &format!("Summarise: {text}"));
    assert!(prompt.len() > 200, "a prompt of several chunks: {}", prompt.len());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(EngineRequest::new("long", prompt.clone(), SamplingParams::greedy(), stop(8)), tx);
    let mut steps = 0;
    while rx.try_recv().is_err() {
        core.step().unwrap();
        steps += 1;
        let held = core.draft_model().unwrap().blocks_used() * 16;
        assert!(held >= (64 * steps).min(prompt.len()), "step {steps}: the draft holds {held} positions");
    }
    assert!(steps >= prompt.len().div_ceil(64), "{steps} steps for {} tokens", prompt.len());
}

#[test]
fn a_smaller_draft_changes_no_output_with_or_without_preemption() {
    let dir = tempfile::tempdir().unwrap();
    cut_draft(dir.path(), 10);
    for (what, opts) in [("roomy", options()), ("preempting", preempting_options())] {
        let mut plain = engine(&opts);
        let reqs = requests(&plain, 40);
        let expected = run(&mut plain, reqs.clone());
        let mut core = engine(&drafted(opts, dir.path(), 3));
        let got = run_drafted(&mut core, reqs);
        same(what, &expected, &got);
        let by_string = (2..got.len()).step_by(3).filter(|&i| {
            let text = &got[i].text[&0];
            got[i].finish[&0] == FinishReason::Stop && (text.ends_with(". ") || text.ends_with("\n\n"))
        });
        assert!(by_string.count() > 0, "{what}: a stop string ended some choice");
        let stats = core.stats();
        let spec = &stats.spec_decode;
        assert!(
            spec.accepted_tokens > 0 && spec.accepted_tokens < spec.draft_tokens,
            "{what}: partly accepted: {spec:?}"
        );
        if what == "preempting" {
            assert!(stats.preemptions_total > 0, "the small cache should preempt: {stats:?}");
        }
    }
}

#[test]
fn a_draft_that_cannot_serve_the_target_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    cut_draft(dir.path(), 2);
    let config_path = dir.path().join("config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let rewrite = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(&config_path, c.to_string()).unwrap();
    };
    let refused = |opts: &EngineOptions, says: &str| {
        let Err(err) = build_engine(opts) else { panic!("{says}: the engine must not start") };
        let err = err.to_string();
        assert!(err.contains("speculative_config") && err.contains(says), "{says}: {err}");
    };
    rewrite(&|c| c["vocab_size"] = 50_000.into());
    refused(&drafted(options(), dir.path(), 3), "vocabulary of 50000 tokens");
    rewrite(&|c| c["max_position_embeddings"] = 512.into());
    refused(&drafted(options(), dir.path(), 3), "fewer than max_model_len 1024");
    refused(&drafted(options(), &dir.path().join("missing.gguf"), 3), "cannot be found");
    // The same draft serves a target of 512 positions.
    let core = engine(&drafted(EngineOptions { max_model_len: Some(512), ..options() }, dir.path(), 3));
    assert_eq!(core.draft_model().unwrap().model().config().num_hidden_layers, 2);
}
