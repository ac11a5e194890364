//! Property tests (proptest) of the structured-output compiler on the real SmolLM2 tokenizer:
//! whatever JSON schema, regex, choice list or Lark grammar a client sends, compiling answers
//! (a grammar or a reason, never a panic or a hang past llguidance's limits and the compiler's
//! deadlines), and a grammar that
//! compiles yields masks that can be followed: a walk of up to 24 tokens, each one the mask
//! allows, is accepted by the matcher.
//!
//! The suite runs 64 cases per target; a longer run (`FUZZ_PRINT=1` prints each constraint
//! before it is compiled, to find one that does not return):
//! `PROPTEST_CASES=5000 cargo test --release -p lumen-worker --test fuzz_grammar -- --nocapture`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{engine, options};
use lumen_worker::grammar::{
    Constraint, ConstraintKind, Feed, GrammarCompiler, GrammarLimits, MaskWorkers, SeqGrammar,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Far above what llguidance's fuel lets one compilation take; only a hang would pass it.
const HANG: Duration = Duration::from_secs(60);

const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "additionalProperties",
    "prefixItems",
    "not",
    "if",
    "then",
];
const TYPES: &[&str] = &["object", "string", "integer", "number", "boolean", "array", "null"];

/// JSON-schema-shaped values: objects of schema keywords holding types, numbers, strings,
/// nested schemas and lists of them, a few levels deep.
fn schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        prop::sample::select(TYPES).prop_map(|t| json!(t)),
        any::<i32>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|x| json!(x)),
        "[a-z0-9#/$.^*+?()|\\[\\]{}-]{0,12}".prop_map(Value::String),
        any::<bool>().prop_map(Value::Bool),
        Just(json!("#/$defs/a")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((prop::sample::select(KEYWORDS), inner.clone()), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-c]{1,2}", inner), 0..4).prop_map(|kv| {
                json!({"type": "object", "properties": Value::Object(kv.into_iter().collect::<Map<_, _>>())})
            }),
        ]
    })
}

static COMPILED: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// Compiles `kind`, then, if it compiled, walks it; errors only for a broken contract.
fn check(compiler: &GrammarCompiler, kind: ConstraintKind, seed: u64) -> Result<(), TestCaseError> {
    let constraint = Constraint::new(kind, "fuzz");
    let started = Instant::now();
    if std::env::var_os("FUZZ_PRINT").is_some() {
        eprintln!("compiling {constraint:?}");
    }
    let compiled = compiler.compile(&constraint);
    prop_assert!(started.elapsed() < HANG, "compiling {constraint:?} took {:?}", started.elapsed());
    if let Err(e) = &compiled
        && std::env::var_os("FUZZ_PRINT_REFUSALS").is_some()
    {
        eprintln!("refused: {e}");
    }
    let Ok(compiled) = compiled else {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    COMPILED.fetch_add(1, Ordering::Relaxed);
    let mut workers = MaskWorkers::new(0);
    let seq = SeqGrammar::new(&compiled, None);
    let mut state = seed | 1;
    seq.request_mask(&mut workers);
    for _ in 0..24 {
        if std::env::var_os("FUZZ_PRINT").is_some() {
            eprintln!("mask");
        }
        let (allowed, _) = seq.with_mask(|mask| {
            mask.map_err(str::to_string).map(|words| {
                let bits = |(w, &bits): (usize, &u32)| {
                    (0..32).filter(move |b| bits & (1 << b) != 0).map(move |b| (w * 32 + b) as u32)
                };
                words.iter().enumerate().flat_map(bits).collect::<Vec<_>>()
            })
        });
        let Ok(allowed) = allowed else { return Ok(()) };
        if allowed.is_empty() {
            return Ok(());
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let token = allowed[(state % allowed.len() as u64) as usize];
        // Handed to the mask threads, as the engine does: what the token led to shows at the
        // next feed (a complete grammar's next mask allows only end-of-sequence).
        match seq.feed(token, Some(&mut workers)) {
            Feed::Taken => {}
            Feed::Complete | Feed::AlreadyComplete => return Ok(()),
            Feed::Failed(e) => {
                // A per-step limit may end a walk; a token the mask allowed must never be refused.
                prop_assert!(!e.contains("not allowed") && !e.contains("invalid token"), "{constraint:?}: {e}");
                return Ok(());
            }
        }
    }
    Ok(())
}

fn fuzz<S: Strategy>(strategy: S, kind: impl Fn(&S::Value) -> ConstraintKind) {
    let core = engine(&options());
    let compiler = core.grammars().clone();
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(&(strategy, any::<u64>()), |(value, seed)| check(&compiler, kind(&value), seed))
        .expect("every constraint compiles or is refused, and compiled ones can be followed");
    // Both outcomes should be common, or the strategy tests one path only (--nocapture shows it).
    eprintln!("compiled so far: {}, refused: {}", COMPILED.load(Ordering::Relaxed), REFUSED.load(Ordering::Relaxed));
}

#[test]
fn arbitrary_json_schemas_compile_or_are_refused() {
    fuzz(schema(), |s| ConstraintKind::JsonSchema(s.to_string()));
}

#[test]
fn arbitrary_regexes_compile_or_are_refused() {
    fuzz("[a-c0-9.*+?()|\\[\\]{}^$\\\\,dws-]{0,24}", |r: &String| ConstraintKind::Regex(r.clone()));
}

#[test]
fn arbitrary_choice_lists_compile_or_are_refused() {
    fuzz(prop::collection::vec(".{0,6}", 1..5), |c: &Vec<String>| ConstraintKind::Choice(c.clone()));
}

/// Small Lark grammars over the rules `start`, `a`, `b` and `c`: alternatives of sequences of
/// rule references, literals and regexes, with `?`, `*` and `+`. Rules that never finish
/// (`a: a`), unused and undefined rules and empty languages all come up.
fn lark() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        prop::sample::select(vec!["start", "a", "b", "c"]).prop_map(str::to_string),
        prop::sample::select(vec!["\"x\"", "\"(\"", "\"\"", "/b*/", "/[ab]+/", "/[0-9]{1,3}/", "%json{}"])
            .prop_map(str::to_string),
    ];
    let item = (atom, prop::sample::select(vec!["", "", "?", "*", "+"])).prop_map(|(a, m)| format!("{a}{m}"));
    let sequence = prop::collection::vec(item, 1..4).prop_map(|items| items.join(" "));
    let rule = prop::collection::vec(sequence, 1..3).prop_map(|alts| alts.join(" | "));
    (rule.clone(), prop::collection::vec(rule, 2..4)).prop_map(|(start, others)| {
        let mut text = format!("start: {start}\n");
        for (name, body) in ["a", "b", "c"].iter().zip(others) {
            text.push_str(&format!("{name}: {body}\n"));
        }
        text
    })
}

#[test]
fn arbitrary_lark_grammars_compile_or_are_refused() {
    // Short deadlines, so grammars that never finish (cancelled at their deadline) keep the
    // target quick; the defaults are 5 s and 2 s.
    let core = engine(&options());
    let limits = GrammarLimits {
        compile_timeout: Duration::from_millis(500),
        step_timeout: Duration::from_millis(250),
        ..GrammarLimits::default()
    };
    let compiler = GrammarCompiler::new(core.tokenizer().clone(), core.limits().vocab_size, limits);
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(&(lark(), any::<u64>()), |(text, seed)| check(&compiler, ConstraintKind::Lark(text), seed))
        .expect("every grammar compiles or is refused in time, and compiled ones can be followed");
    eprintln!("compiled so far: {}, refused: {}", COMPILED.load(Ordering::Relaxed), REFUSED.load(Ordering::Relaxed));
}
