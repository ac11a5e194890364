//! Correctness against an independent implementation: greedy continuations of ten varied chat
//! prompts from llama.cpp (llama-cpp-python, same GGUF, `scripts/reference/greedy_references.py`),
//! committed in `tests/data/smollm2_greedy_reference.json`.
//!
//! Our chat template and tokenizer must give exactly llama.cpp's prompt ids. Our first 32 greedy
//! tokens must equal llama.cpp's; where the two ever part, it must be at a near-tie (both tokens
//! within a small log-probability gap in llama.cpp's own distribution), and the log-probabilities
//! of the tokens both chose must agree closely. The float path is checked much more tightly
//! against an independent float64 implementation in `engine_float_reference.rs`.

mod common;

use common::{engine, options, run};
use lumen_worker::engine::EngineRequest;
use lumen_worker::sampling::{SamplingParams, StopParams};
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    generator: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<ChatMessage>,
    prompt_token_ids: Vec<u32>,
    output_token_ids: Vec<u32>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

/// This 4-bit 135M model amplifies rounding: our own scalar and AVX2 kernels (which differ only in
/// summation order) already disagree by up to ~0.25 in log-probability on these prompts. So a
/// different greedy choice counts as a tie when llama.cpp's own margin between the two tokens is
/// below this, and shared tokens' log-probabilities must agree within the same bound.
const TIE_GAP: f32 = 0.5;
const LOGPROB_TOLERANCE: f32 = 0.5;
/// Share of all reference tokens that must be reproduced exactly before any divergence (a wrong
/// rotary layout, norm or attention diverges within a step or two on every prompt).
const MIN_IDENTICAL: f64 = 0.6;

#[test]
fn greedy_tokens_match_llama_cpp_on_the_same_gguf() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/smollm2_greedy_reference.json"))
            .unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert!(reference.cases.len() >= 8);
    let mut core = engine(&options());
    let (mut matched, mut total, mut worst_logprob_gap) = (0usize, 0usize, 0f32);
    for case in &reference.cases {
        let ours = core
            .tokenizer()
            .encode_chat(&case.messages, &ChatTemplateOptions { add_generation_prompt: true, ..Default::default() })
            .unwrap();
        assert_eq!(ours, case.prompt_token_ids, "{}: chat template + tokenizer differ from llama.cpp", case.name);
        let steps = case.output_token_ids.len();
        let sampling = SamplingParams { logprobs: Some(5), ..SamplingParams::greedy() };
        let req = EngineRequest::new(
            case.name.clone(),
            case.prompt_token_ids.clone(),
            sampling,
            StopParams { max_tokens: steps, ignore_eos: true, ..Default::default() },
        );
        let out = run(&mut core, vec![req]).remove(0);
        let (tokens, logprobs) = (&out.tokens[&0], &out.logprobs[&0]);
        assert_eq!(tokens.len(), steps);
        let agree = tokens.iter().zip(&case.output_token_ids).take_while(|(a, b)| a == b).count();
        for (i, step) in case.steps[..agree].iter().enumerate() {
            let gap = (logprobs[i].logprob - step.logprob).abs();
            worst_logprob_gap = worst_logprob_gap.max(gap);
            assert!(
                gap < LOGPROB_TOLERANCE,
                "{} step {i}: logprob {} vs llama.cpp {}",
                case.name,
                logprobs[i].logprob,
                step.logprob
            );
        }
        if agree < steps {
            let step = &case.steps[agree];
            let ours = tokens[agree];
            let theirs_of_ours = step.top.iter().find(|(t, _)| *t == ours).map(|&(_, lp)| lp);
            let gap = theirs_of_ours.map(|lp| step.logprob - lp);
            assert!(
                gap.is_some_and(|g| g < TIE_GAP),
                "{}: diverged at step {agree}: we chose {ours}, llama.cpp {} (llama.cpp's top: {:?})",
                case.name,
                step.token,
                step.top
            );
        }
        println!("{}: {agree}/{steps} tokens identical", case.name);
        matched += agree;
        total += steps;
    }
    println!("{matched}/{total} tokens identical to {}; worst logprob gap {worst_logprob_gap:.4}", reference.generator);
    assert!(matched as f64 >= total as f64 * MIN_IDENTICAL, "only {matched} of {total} tokens match llama.cpp");
}
