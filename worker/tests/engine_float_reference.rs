//! The float path against an independent float64 implementation: `scripts/reference/
//! float_reference.py` runs the dequantized SmolLM2 GGUF in numpy, in llama.cpp's own rotary
//! layout (so our un-permutation of the query/key rows is checked too). With f32 weights and
//! activations, the only rounding left is f32 arithmetic and the f16 KV cache, so greedy tokens
//! must agree exactly and log-probabilities closely.

mod common;

use common::{engine, options, run};
use lumen_worker::engine::{EngineOptions, EngineRequest};
use lumen_worker::model::cpu_weights::CpuWeightFormat;
use lumen_worker::sampling::{SamplingParams, StopParams};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt_token_ids: Vec<u32>,
    output_token_ids: Vec<u32>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    logprob: f32,
    top: Vec<(u32, f32)>,
}

#[test]
fn f32_weights_match_a_float64_reference_implementation() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/smollm2_float_reference.json"))
        .unwrap();
    let reference: Reference = serde_json::from_str(&text).unwrap();
    let mut core = engine(&EngineOptions { cpu_weight_format: CpuWeightFormat::F32, ..options() });
    let mut worst = 0f32;
    for case in &reference.cases {
        let sampling = SamplingParams { logprobs: Some(5), ..SamplingParams::greedy() };
        let stop = StopParams { max_tokens: case.output_token_ids.len(), ignore_eos: true, ..Default::default() };
        let out =
            run(&mut core, vec![EngineRequest::new(case.name.clone(), case.prompt_token_ids.clone(), sampling, stop)])
                .remove(0);
        assert_eq!(
            out.tokens[&0], case.output_token_ids,
            "{}: greedy tokens differ from the float64 reference",
            case.name
        );
        for (i, (ours, theirs)) in out.logprobs[&0].iter().zip(&case.steps).enumerate() {
            worst = worst.max((ours.logprob - theirs.logprob).abs());
            for ((t, _, lp), (rt, rlp)) in ours.top.iter().zip(&theirs.top) {
                // Top alternatives agree in value (their order may swap only within the tolerance).
                if t == rt {
                    assert!((lp - rlp).abs() < 0.02, "{} step {i}: token {t} logprob {lp} vs {rlp}", case.name);
                }
            }
        }
    }
    println!("worst chosen-token logprob difference from float64: {worst:.5}");
    assert!(worst < 0.02, "log-probabilities drift from the float64 reference by {worst}");
}
