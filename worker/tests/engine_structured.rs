//! Structured outputs in the engine on the real SmolLM2-135M-Instruct GGUF: constrained and free
//! requests share batches; a constrained choice ends with `stop` when its grammar is complete and
//! its text is valid; greedy constrained output is the same in a roomy batch, on a second pass
//! that hits the prefix cache, and with a cache so small that sequences are preempted and
//! recomputed (the matcher keeps its state); `n > 1` choices each follow their own matcher.

mod common;

use std::sync::Arc;

use common::{PROMPTS, chat, engine, options, preempting_options, run};
use lumen_worker::TokenId;
use lumen_worker::engine::{EngineCore, EngineOptions, EngineRequest, FinishReason};
use lumen_worker::grammar::{CompiledGrammar, Constraint, ConstraintKind};
use lumen_worker::sampling::{SamplingParams, StopParams};
use serde_json::Value;

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 20},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    "sources": {"type": "array", "items": {"enum": ["book", "web", "memory"]}, "maxItems": 2}},
  "required": ["answer", "confidence", "sources"], "additionalProperties": false}"#;

fn compiled(core: &EngineCore, kind: ConstraintKind) -> Arc<CompiledGrammar> {
    core.grammars().compile(&Constraint::new(kind, "test")).expect("the constraint compiles")
}

/// Even prompts under the schema (up to 160 tokens), odd ones free (24 tokens, ignoring EOS).
fn mixed(core: &EngineCore, schema: &Arc<CompiledGrammar>) -> Vec<EngineRequest> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let constrained = i % 2 == 0;
            let stop = if constrained {
                StopParams { max_tokens: 160, ..Default::default() }
            } else {
                StopParams { max_tokens: 24, ignore_eos: true, ..Default::default() }
            };
            let mut req = EngineRequest::new(format!("r{i}"), chat(core, p), SamplingParams::greedy(), stop);
            if constrained {
                req.constraint = Some(Arc::clone(schema));
            }
            req
        })
        .collect()
}

fn batch(core: &mut EngineCore) -> Vec<Vec<TokenId>> {
    let schema = compiled(core, ConstraintKind::JsonSchema(SCHEMA.into()));
    let reqs = mixed(core, &schema);
    let outcomes = run(core, reqs);
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.failed, None, "request {i}");
        if i % 2 == 0 {
            assert_eq!(o.finish[&0], FinishReason::Stop, "request {i}: {}", o.text[&0]);
            let doc: Value = serde_json::from_str(&o.text[&0]).unwrap_or_else(|e| panic!("{i}: {}: {e}", o.text[&0]));
            assert!(doc["confidence"].as_i64().is_some_and(|c| (0..=100).contains(&c)), "{doc}");
        } else {
            assert_eq!(o.tokens[&0].len(), 24, "a free request beside constrained ones runs as usual");
        }
    }
    outcomes.into_iter().map(|o| o.tokens[&0].clone()).collect()
}

#[test]
fn constrained_output_is_valid_and_the_same_batched_cached_and_preempted() {
    let mut core = engine(&EngineOptions { enable_prefix_caching: false, ..options() });
    let reference = batch(&mut core);

    let mut core = engine(&options());
    assert_eq!(batch(&mut core), reference, "first pass with prefix caching");
    let hits = core.stats().prefix_cache_hits;
    assert_eq!(batch(&mut core), reference, "prefix cache hits");
    assert!(core.stats().prefix_cache_hits > hits);

    let mut core = engine(&preempting_options());
    assert_eq!(batch(&mut core), reference, "after preemption and recompute");
    let stats = core.stats();
    assert!(stats.preemptions_total > 0, "the small cache should force preemption: {stats:?}");
    assert!(stats.histograms.structured_output_mask.count() > 100, "masks were computed and timed");
}

#[test]
fn each_of_n_choices_follows_its_own_matcher_at_temperature_one() {
    let mut core = engine(&options());
    let choices = vec!["red".to_string(), "green".to_string(), "blue".to_string(), "a shade of grey".to_string()];
    let choice = compiled(&core, ConstraintKind::Choice(choices.clone()));
    let regex = compiled(&core, ConstraintKind::Regex("[0-9]{2}:[0-5][0-9]".into()));
    let sampling = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    let mut reqs = Vec::new();
    for (i, c) in [choice, regex].into_iter().enumerate() {
        let prompt = chat(&core, "Pick a colour, or tell the time.");
        let mut req = EngineRequest::new(format!("n{i}"), prompt, sampling.clone(), StopParams::default());
        req.stop.max_tokens = 40;
        req.n = 4;
        req.constraint = Some(c);
        reqs.push(req);
    }
    let outcomes = run(&mut core, reqs);
    for index in 0..4 {
        let text = &outcomes[0].text[&index];
        assert!(choices.contains(text), "choice {index}: {text:?}");
        let time = &outcomes[1].text[&index];
        let b = time.as_bytes();
        assert!(b.len() == 5 && b[2] == b':' && time.chars().filter(char::is_ascii_digit).count() == 4, "{time:?}");
        assert_eq!(outcomes[1].finish[&index], FinishReason::Stop);
    }
}

#[test]
fn a_constraint_cut_by_max_tokens_finishes_with_length() {
    let mut core = engine(&options());
    let schema = compiled(&core, ConstraintKind::JsonSchema(SCHEMA.into()));
    let mut req =
        EngineRequest::new("cut", chat(&core, "Answer in JSON."), SamplingParams::greedy(), StopParams::default());
    req.stop.max_tokens = 3;
    req.constraint = Some(schema);
    let out = run(&mut core, vec![req]).remove(0);
    assert_eq!(out.finish[&0], FinishReason::Length);
    assert_eq!(out.tokens[&0].len(), 3);
    assert!(out.text[&0].starts_with('{'), "{:?}", out.text[&0]);
}

#[test]
fn a_gated_constraint_starts_after_the_reasoning_marker() {
    let mut core = engine(&options());
    let prompt = chat(&core, "What is the capital of France?");
    let free_stop = StopParams { max_tokens: 12, ignore_eos: true, ..Default::default() };
    let free = run(&mut core, vec![EngineRequest::new("free", prompt.clone(), SamplingParams::greedy(), free_stop)]);
    let free_tokens = free[0].tokens[&0].clone();
    // The "reasoning": the free answer's first three tokens, their text the end marker.
    let marker = core.tokenizer().decode(&free_tokens[..3], false).unwrap();
    assert!(!marker.trim().is_empty(), "{marker:?}");
    let regex = compiled(&core, ConstraintKind::Regex("[0-9]{3}".into()));
    let gated = |id: &str, prompt: Vec<TokenId>, after: Option<&str>| {
        let mut req = EngineRequest::new(id, prompt, SamplingParams::greedy(), StopParams::default());
        req.stop.max_tokens = 20;
        req.constraint = Some(Arc::clone(&regex));
        req.constraint_after = after.map(str::to_string);
        req
    };
    let outs = run(
        &mut core,
        vec![gated("gated", prompt.clone(), Some(&marker)), gated("never", prompt.clone(), Some("\u{1}never written"))],
    );
    // Free up to the marker (greedy, the same tokens), then three digits and the end.
    let tokens = &outs[0].tokens[&0];
    assert_eq!(tokens[..3], free_tokens[..3], "the reasoning is sampled freely");
    let answer = core.tokenizer().decode(&tokens[3..], false).unwrap();
    assert!(answer.len() == 3 && answer.chars().all(|c| c.is_ascii_digit()), "{answer:?} after {marker:?}");
    assert_eq!(outs[0].finish[&0], FinishReason::Stop);
    // A marker never written: the whole output is free (as vLLM leaves it), cut by max_tokens.
    assert_eq!(outs[1].failed, None);
    assert_eq!(outs[1].tokens[&0].len(), 20);
    assert!(!outs[1].text[&0].chars().all(|c| c.is_ascii_digit()), "{:?}", outs[1].text[&0]);
}
