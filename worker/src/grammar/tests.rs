//! The grammar module against the real tokenizers in `models/` (SmolLM2's GGUF vocabulary and the
//! Llama-3.1 tokenizer.json): trie bytes, compilation and its errors, masks, advancing, completion
//! and end-of-sequence, limits, the cache and the mask threads (tokens fed now and fed to them). Outputs come from random walks
//! over the allowed tokens (a model that knows nothing), so only the constraint makes them valid.

use std::sync::OnceLock;

use serde_json::Value;

use super::mask::allows;
use super::toktrie_env::token_bytes;
use super::*;
use crate::TokenId;
use crate::splitmix::SplitMix64;
use crate::tokenizer::tests::{llama3, smollm2};

/// SmolLM2's vocabulary: 49152 ids, the logits row width of the model.
const SMOL_VOCAB: usize = 49_152;

fn compiler() -> &'static GrammarCompiler {
    static C: OnceLock<GrammarCompiler> = OnceLock::new();
    C.get_or_init(|| GrammarCompiler::new(smollm2().clone(), SMOL_VOCAB, GrammarLimits::default()))
}

fn json(schema: &str) -> Constraint {
    let mut c = Constraint::new(ConstraintKind::JsonSchema(schema.into()), "response_format");
    c.disable_any_whitespace = true;
    c
}

/// Walks the grammar choosing uniformly among the allowed tokens; returns the text and whether
/// the grammar stopped (or allowed end-of-sequence, which the walk then takes with odds 1/2).
fn walk(constraint: &Constraint, seed: u64, max_tokens: usize) -> (String, bool) {
    let tok = smollm2();
    let compiled = compiler().compile(constraint).unwrap();
    let seq = SeqGrammar::new(&compiled, None);
    let mut workers = MaskWorkers::new(0);
    let mut rng = SplitMix64(seed);
    let mut ids = Vec::new();
    for _ in 0..max_tokens {
        seq.request_mask(&mut workers);
        let (allowed, _) = seq.with_mask(|m| {
            let words = m.expect("no matcher error");
            (0..SMOL_VOCAB as TokenId).filter(|&t| allows(words, t)).collect::<Vec<_>>()
        });
        assert!(!allowed.is_empty(), "a live grammar allows some token");
        let eos = tok.eos_token_ids()[0];
        let token = if allowed.contains(&eos) && rng.below(2) == 0 { eos } else { allowed[rng.below(allowed.len())] };
        match seq.feed(token, None) {
            Feed::Taken => ids.push(token),
            Feed::Complete => {
                if token != eos {
                    ids.push(token);
                }
                return (tok.decode(&ids, true).unwrap(), true);
            }
            Feed::Failed(e) => panic!("an allowed token failed: {e}"),
            Feed::AlreadyComplete => panic!("fed at once, a complete grammar ends the walk at once"),
        }
    }
    (tok.decode(&ids, true).unwrap(), false)
}

#[test]
fn trie_bytes_spell_every_token_of_both_tokenizer_kinds() {
    for (tok, vocab) in [(smollm2(), SMOL_VOCAB), (llama3(), 128_256)] {
        let words = token_bytes(tok, vocab).unwrap();
        assert_eq!(words.len(), vocab);
        let text = "Hello, wörld!\n\t{\"a\": [1, 2.5e3]} 你好 🙂";
        let ids = tok.encode(text, false).unwrap();
        let spelled: Vec<u8> = ids.iter().flat_map(|&t| words[t as usize].clone()).collect();
        assert_eq!(String::from_utf8(spelled).unwrap(), text);
        for &eos in tok.eos_token_ids() {
            assert_eq!(words[eos as usize][0], 0xFF, "EOS {eos} is a special token");
        }
    }
}

#[test]
fn json_schema_walks_give_valid_documents() {
    let schema = r#"{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"enum": ["x", "y"]}, "c": {"type": "boolean"}}, "required": ["a", "b", "c"], "additionalProperties": false}"#;
    for seed in 0..6 {
        let (text, stopped) = walk(&json(schema), seed, 200);
        assert!(stopped, "seed {seed}: {text}");
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {text}: {e}"));
        assert!(doc["a"].as_i64().is_some_and(|a| (0..=9).contains(&a)), "{text}");
        assert!(doc["b"] == "x" || doc["b"] == "y", "{text}");
        assert!(doc["c"].is_boolean(), "{text}");
    }
}

#[test]
fn regex_choice_and_lark_walks_match_their_constraint() {
    let regex = Constraint::new(ConstraintKind::Regex("[0-9]{3}-[a-z]{2}".into()), "structured_outputs.regex");
    let choice = Constraint::new(ConstraintKind::Choice(vec!["yes".into(), "no way".into()]), "guided_choice");
    let lark = Constraint::new(ConstraintKind::Lark("start: \"(\" item (\",\" item)* \")\"\nitem: /[ab]/".into()), "g");
    for seed in 0..5 {
        let (text, stopped) = walk(&regex, seed, 50);
        assert!(stopped && text.len() == 6 && text.as_bytes()[3] == b'-', "{text}");
        let (text, stopped) = walk(&choice, seed, 50);
        assert!(stopped && (text == "yes" || text == "no way"), "{text}");
        let (text, _) = walk(&lark, seed, 40);
        assert!(text.starts_with('(') && text[1..].chars().all(|c| "ab,)".contains(c)), "{text}");
    }
}

#[test]
fn end_of_sequence_is_allowed_exactly_when_the_grammar_accepts() {
    let c = Constraint::new(ConstraintKind::Regex("a+b?".into()), "guided_regex");
    let compiled = compiler().compile(&c).unwrap();
    let eos = smollm2().eos_token_ids()[0];
    let seq = SeqGrammar::new(&compiled, None);
    let mut workers = MaskWorkers::new(1);
    seq.request_mask(&mut workers);
    assert!(!seq.with_mask(|m| allows(m.unwrap(), eos)).0, "nothing generated yet");
    let a = smollm2().encode("a", false).unwrap()[0];
    assert_eq!(seq.feed(a, None), Feed::Taken);
    seq.request_mask(&mut workers);
    let (allowed, time) = seq.with_mask(|m| allows(m.unwrap(), eos));
    assert!(allowed && time.is_some(), "`a` is a whole match");
    assert_eq!(seq.with_mask(|_| ()).1, None, "a compute time is reported once");
    let fork = seq.fork();
    assert_eq!(seq.feed(eos, None), Feed::Complete);
    let b = smollm2().encode("b", false).unwrap()[0];
    assert_eq!(fork.feed(b, None), Feed::Complete, "after `ab` nothing can follow: complete");
    let x = smollm2().encode("x", false).unwrap()[0];
    let other = SeqGrammar::new(&compiled, None);
    assert!(matches!(other.feed(x, None), Feed::Failed(_)), "a disallowed token is an error");
}

#[test]
fn bad_constraints_are_refused_with_a_reason() {
    let cases = [
        (ConstraintKind::JsonSchema("{\"type\": ".into()), "not valid JSON"),
        (ConstraintKind::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#.into()), ""),
        (ConstraintKind::JsonSchema(r#"{"type": "strange"}"#.into()), ""),
        (ConstraintKind::Regex("(unclosed".into()), ""),
        (ConstraintKind::Choice(vec![]), "empty"),
        (ConstraintKind::Lark("start: undefined_rule".into()), ""),
        (ConstraintKind::Lark("root ::= \"a\"".into()), "GBNF"),
    ];
    for (kind, says) in cases {
        let c = Constraint::new(kind.clone(), "p");
        match compiler().compile(&c) {
            Err(GrammarError::Invalid(message)) => assert!(message.contains(says), "{kind:?}: {message}"),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

#[test]
fn limits_bound_compilation() {
    let mut limits = GrammarLimits::default();
    limits.parser.max_grammar_size = 50;
    let small = GrammarCompiler::new(smollm2().clone(), SMOL_VOCAB, limits);
    let props: Vec<String> = (0..40).map(|i| format!("\"p{i}\": {{\"type\": \"string\"}}")).collect();
    let schema = format!("{{\"type\": \"object\", \"properties\": {{{}}}}}", props.join(", "));
    let started = std::time::Instant::now();
    assert!(matches!(small.compile(&json(&schema)), Err(GrammarError::Invalid(_))));
    assert!(started.elapsed().as_secs() < 5);
}

#[test]
fn endless_forced_bytes_are_cancelled_at_compile_time_and_mid_generation() {
    let limits = GrammarLimits {
        compile_timeout: std::time::Duration::from_millis(300),
        step_timeout: std::time::Duration::from_millis(300),
        ..GrammarLimits::default()
    };
    let c = GrammarCompiler::new(smollm2().clone(), SMOL_VOCAB, limits);
    // `x` never finishes, so after the start only `b` bytes may follow, forever: llguidance's
    // forced-byte search loops (and its memory grows) until it is cancelled.
    let at_start = Constraint::new(ConstraintKind::Lark("start: /b*/ x\nx: x".into()), "g");
    match c.compile(&at_start) {
        Err(GrammarError::Invalid(message)) => assert!(message.contains("took longer than 300 ms"), "{message}"),
        other => panic!("an endless start state compiled: {other:?}"),
    }
    // The same trap behind a choice compiles (its start state is fine) and is cut off at the
    // token that walks into it, failing that sequence only.
    let later = Constraint::new(ConstraintKind::Lark("start: \"a\" | \"(\" /b*/ x\nx: x".into()), "g");
    let compiled = c.compile(&later).expect("the start state is finite");
    let mut workers = MaskWorkers::new(0);
    let open = smollm2().encode("(", false).unwrap()[0];
    let seq = SeqGrammar::new(&compiled, None);
    seq.request_mask(&mut workers);
    assert!(seq.with_mask(|m| allows(m.unwrap(), open)).0, "`(` is allowed at the start");
    let started = std::time::Instant::now();
    let failed = match seq.feed(open, None) {
        Feed::Failed(e) => e,
        Feed::Taken => {
            seq.request_mask(&mut workers);
            seq.with_mask(|m| m.err().map(str::to_owned)).0.expect("the mask after `(` is cut off")
        }
        Feed::Complete | Feed::AlreadyComplete => panic!("the grammar cannot be complete after `(`"),
    };
    assert!(failed.contains("took longer than 300 ms"), "{failed}");
    assert!(started.elapsed().as_secs() < 5, "cancelled near its deadline: {:?}", started.elapsed());
    // A sequence that takes the other branch is untouched by the cancelled one.
    let other = SeqGrammar::new(&compiled, None);
    let a = smollm2().encode("a", false).unwrap()[0];
    assert!(!matches!(other.feed(a, None), Feed::Failed(_)), "the finite branch still works");
}

#[test]
fn compiled_grammars_and_errors_are_cached_by_text() {
    let c = GrammarCompiler::new(smollm2().clone(), SMOL_VOCAB, GrammarLimits::default());
    let schema = json(r#"{"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}}"#);
    let first = c.compile(&schema).unwrap();
    let second = c.compile(&Constraint { param: "elsewhere".into(), ..schema.clone() }).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &second), "the same text is compiled once");
    let bad = Constraint::new(ConstraintKind::Regex("(".into()), "guided_regex");
    assert!(c.compile(&bad).is_err() && c.compile(&bad).is_err());
    assert_eq!(c.compilations(), 2);
    let loose = Constraint { disable_any_whitespace: false, ..schema };
    c.compile(&loose).unwrap();
    assert_eq!(c.compilations(), 3, "options are part of the key");
}

#[test]
fn json_options_close_objects_and_fix_whitespace() {
    // Without disable_additional_properties the open object admits other keys; with it, `}`
    // must follow the only property.
    let schema = r#"{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}"#;
    let mut closed = json(schema);
    closed.disable_additional_properties = true;
    for seed in 0..4 {
        let (text, stopped) = walk(&closed, seed, 60);
        assert!(stopped && text == r#"{"a":1}"#, "{text}");
    }
    let masks_for = |c: &Constraint, prefix: &str| {
        let seq = SeqGrammar::new(&compiler().compile(c).unwrap(), None);
        for t in smollm2().encode(prefix, false).unwrap() {
            assert_eq!(seq.feed(t, None), Feed::Taken);
        }
        seq.request_mask(&mut MaskWorkers::new(0));
        seq.with_mask(|m| m.unwrap().to_vec()).0
    };
    let space = smollm2().encode(" ", false).unwrap()[0];
    let tight = masks_for(&closed, "{");
    let loose = masks_for(&Constraint::new(ConstraintKind::JsonSchema(schema.into()), "p"), "{");
    assert!(!allows(&tight, space) && allows(&loose, space), "whitespace is flexible by default");
}

#[test]
fn apply_mask_and_first_allowed_follow_the_bits() {
    let mut row = vec![1.0f32; 70];
    let mut words = vec![0u32; 3];
    words[0] = 0b1010;
    words[2] = 1 << 3; // id 67
    apply_mask(&mut row, &words);
    let kept: Vec<usize> = row.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, _)| i).collect();
    assert_eq!(kept, vec![1, 3, 67]);
    assert_eq!(first_allowed(&words, 70, &[1]), Some(3));
    assert_eq!(first_allowed(&words, 70, &[1, 3, 67]), Some(1), "suppression yields to the grammar");
    assert_eq!(first_allowed(&[0; 3], 70, &[]), None);
    assert_eq!(mask_words(49_152), 1536);
    assert_eq!(mask_words(33), 2);
}

#[test]
fn tokens_fed_to_the_workers_are_taken_there_and_what_they_led_to_is_learnt_at_the_next_feed() {
    let c = Constraint::new(ConstraintKind::Regex("ab".into()), "guided_regex");
    let compiled = compiler().compile(&c).unwrap();
    let tok = smollm2();
    let [a, b, x] = ["a", "b", "x"].map(|t| tok.encode(t, false).unwrap()[0]);
    let eos = tok.eos_token_ids()[0];
    let mut workers = MaskWorkers::new(2);
    let seq = SeqGrammar::new(&compiled, None);
    seq.request_mask(&mut workers);
    assert_eq!(seq.feed(a, Some(&mut workers)), Feed::Taken);
    let (after_a, _) = seq.with_mask(|m| {
        let m = m.unwrap();
        (allows(m, b), allows(m, a), allows(m, eos))
    });
    assert_eq!(after_a, (true, false, false), "the worker took `a` before computing the mask");
    assert_eq!(seq.feed(b, Some(&mut workers)), Feed::Taken, "whether `b` completed it is not known yet");
    let (only_eos, _) = seq.with_mask(|m| {
        let m = m.unwrap();
        (0..SMOL_VOCAB as TokenId).filter(|&t| allows(m, t)).collect::<Vec<_>>()
    });
    assert_eq!(only_eos, vec![eos], "a stopped matcher's mask allows only end-of-sequence");
    assert_eq!(seq.feed(eos, Some(&mut workers)), Feed::AlreadyComplete);
    assert_eq!(seq.feed(eos, None), Feed::AlreadyComplete, "also when fed at once");

    let bad = SeqGrammar::new(&compiled, None);
    assert_eq!(bad.feed(x, Some(&mut workers)), Feed::Taken);
    assert!(matches!(bad.feed(a, Some(&mut workers)), Feed::Failed(_)), "the disallowed `x` fails the next feed");

    let now = SeqGrammar::new(&compiled, None);
    assert_eq!(now.feed(a, Some(&mut workers)), Feed::Taken);
    assert_eq!(now.feed(b, None), Feed::Complete, "fed at once after a queued token: both taken, in order");
}
