//! What the property tests (proptest) share: the case count (64 unless `PROPTEST_CASES` says
//! otherwise), a runner that persists no failures, and arbitrary JSON values.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

pub fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// Arbitrary JSON, nested a few levels, whose strings and object keys are often one of `words`
/// (names the parser under test looks for), else anything.
pub fn json_value(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let word = move || prop::sample::select(words).prop_map(str::to_string);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(prop_oneof![word(), ".{0,6}"], inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
