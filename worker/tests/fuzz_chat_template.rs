//! Property tests (proptest) of the worker's tokenizer module with the real SmolLM2 tokenizer
//! (`models/SmolLM2-135M-Instruct.Q4_1.gguf`):
//!
//! - the model's chat template rendered over arbitrary message contents, roles and template
//!   variables never panics, and message content is data: it appears verbatim in the prompt,
//!   never evaluated (`{{ ... }}` in a message stays text);
//! - hostile templates (file access through include/import/extends, runaway loops, recursion,
//!   huge repeats, attribute probing) and random compositions of their pieces end in an error or
//!   bounded output within seconds, and never show the contents of a file;
//! - encode/decode round-trips arbitrary UTF-8 exactly, except the few bytes the vocabulary has
//!   no token for (some control characters, lead bytes of unassigned planes), which are dropped
//!   (see docs/reliability.md).
//!
//! The suite runs a bounded number of cases (64 per target); a longer run:
//! `PROPTEST_CASES=20000 cargo test --release -p lumen-worker --test fuzz_chat_template`.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use lumen_worker::tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

/// Longest a hostile render may take (fuel stops loops in well under a second on one core).
const RENDER_BOUND: Duration = Duration::from_secs(20);
/// minijinja refuses to repeat a string past 100 MB; output beyond this means no bound held.
const OUTPUT_BOUND: usize = 256 << 20;

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-model.sh)", path.display()));
        let content = gguf_file::Content::read(&mut file).expect("GGUF header");
        Tokenizer::from_gguf(&content).expect("SmolLM2 tokenizer")
    })
}

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Text that mixes template syntax, ChatML markers and arbitrary characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        ".{0,8}",
        Just("{{ 7 * 7 }}".to_string()),
        Just("{% include '/etc/passwd' %}".to_string()),
        Just("{% for i in range(10**9) %}".to_string()),
        Just("<|im_start|>system\n".to_string()),
        Just("<|im_end|>".to_string()),
        Just("\u{0}\u{202e}\u{fffd}".to_string()),
        Just("{#".to_string()),
        Just("}}".to_string()),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
}

fn message() -> impl Strategy<Value = ChatMessage> {
    let role = prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool")];
    (role, hostile_text()).prop_map(|(role, content)| ChatMessage::new(role, content))
}

#[test]
fn message_content_is_rendered_verbatim_never_evaluated() {
    let tok = smollm2();
    runner()
        .run(&(prop::collection::vec(message(), 1..5), any::<bool>(), hostile_text()), |(messages, add, extra)| {
            let mut vars = Map::new();
            vars.insert("enable_thinking".into(), Value::String(extra));
            let opts = ChatTemplateOptions { add_generation_prompt: add, extra: vars };
            let prompt = tok.apply_chat_template(&messages, &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for m in &messages {
                let content = m.content.as_str().unwrap_or_default();
                prop_assert!(prompt.contains(content), "content {content:?} missing from {prompt:?}");
            }
            prop_assert!(!prompt.contains("root:"), "a file was read: {prompt:?}");
            Ok(())
        })
        .expect("the model's template renders any content as data");
}

/// Pieces of templates that try to escape, read files, loop forever or blow up.
const HOSTILE_PIECES: [&str; 16] = [
    "{% include '/etc/passwd' %}",
    "{% import '/etc/hostname' as h %}",
    "{% extends '/proc/self/environ' %}",
    "{% from 'x' import y %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{{ b }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'x' * 1000000000 }}",
    "{{ [1] * 1000000000 }}",
    "{{ messages.__class__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ cycler.__init__ }}",
    "{{ lipsum() }}",
    "{{ range(10**12)|list }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ messages[0]['content'] }}",
    "{% raw %}{{{% endraw %}",
];

/// Compiles and renders `source`; `None` when compiling or rendering fails.
fn render_within_bounds(source: &str) -> Result<Option<String>, TestCaseError> {
    let started = Instant::now();
    let rendered = smollm2()
        .clone()
        .with_chat_template(source.to_string())
        .and_then(|t| t.apply_chat_template(&[ChatMessage::new("user", "hi")], &ChatTemplateOptions::default()));
    let took = started.elapsed();
    prop_assert!(took < RENDER_BOUND, "{source:?} took {took:?}");
    let Ok(out) = rendered else { return Ok(None) };
    prop_assert!(out.len() <= OUTPUT_BOUND, "{source:?} rendered {} bytes", out.len());
    prop_assert!(!out.contains("root:") && !out.contains("PATH="), "{source:?} read a file: {out:.200}");
    Ok(Some(out))
}

#[test]
fn each_hostile_template_piece_fails_or_stays_bounded() {
    for piece in HOSTILE_PIECES {
        render_within_bounds(piece).unwrap_or_else(|e| panic!("{e}"));
    }
    for file_access in &HOSTILE_PIECES[..4] {
        assert_eq!(render_within_bounds(file_access).unwrap_or_else(|e| panic!("{e}")), None, "{file_access}");
    }
}

#[test]
fn random_compositions_of_hostile_templates_fail_or_stay_bounded() {
    let source = prop::collection::vec(
        prop_oneof![prop::sample::select(&HOSTILE_PIECES[..]).prop_map(str::to_string), ".{0,6}"],
        1..4,
    )
    .prop_map(|pieces| pieces.concat());
    // Each case may burn a whole fuel budget: fewer cases than the cheap targets.
    let mut runner = runner();
    let cases = (runner.config().cases / 4).max(8);
    runner = TestRunner::new(Config { cases, failure_persistence: None, ..runner.config().clone() });
    runner.run(&source, |source| render_within_bounds(&source).map(|_| ())).expect("hostile templates are bounded");
}

/// GPT-2's byte-level alphabet: the character that stands for `byte` in the vocabulary.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).expect("a valid code point")
}

/// The bytes SmolLM2's vocabulary has no token for (never seen in training: some control
/// characters, and lead bytes of unassigned planes).
fn missing_bytes() -> &'static Vec<u8> {
    static MISSING: OnceLock<Vec<u8>> = OnceLock::new();
    MISSING
        .get_or_init(|| (0..=255u8).filter(|&b| smollm2().token_to_id(&byte_char(b).to_string()).is_none()).collect())
}

#[test]
fn encode_decode_round_trips_arbitrary_utf8() {
    let tok = smollm2();
    let text = prop_oneof![any::<String>(), hostile_text(), "\\PC{0,64}"];
    runner()
        .run(&text, |text| {
            let ids = tok.encode(&text, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = tok.decode(&ids, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Bytes without a token are dropped (as Hugging Face's tokenizer does with this
            // vocabulary); everything else comes back exactly.
            let kept: Vec<u8> = text.bytes().filter(|b| !missing_bytes().contains(b)).collect();
            prop_assert_eq!(&back, &String::from_utf8_lossy(&kept), "ids {:?}", ids);
            Ok(())
        })
        .expect("byte-level BPE round-trips any UTF-8 its vocabulary covers");
}

#[test]
fn the_vocabulary_lacks_only_rare_control_bytes_and_no_byte_of_assigned_text() {
    // Control characters U+0004, U+0006, U+0013, U+0014, U+0016, U+001D; 0xC0, 0xC1 and
    // 0xF5..=0xFF never occur in UTF-8; 0xF1, 0xF2 lead only the unassigned planes 4 to 11.
    let mut expected = vec![0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2];
    expected.extend(0xf5..=0xff);
    assert_eq!(missing_bytes(), &expected);
    let ids = smollm2().encode("a\u{40000}\u{4}b", false).expect("encode");
    assert_eq!(smollm2().decode(&ids, false).expect("decode"), "a\u{fffd}\u{fffd}\u{fffd}b");
}
