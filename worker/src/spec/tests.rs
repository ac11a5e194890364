use crate::TokenId;

use super::ngram::propose;
use super::*;

fn settings(json: &str) -> Result<SpecSettings, String> {
    SpeculativeConfig::parse_json(json)?.settings().map_err(|e| e.to_string())
}

fn ngram(min: usize, max: usize) -> SpecSettings {
    SpecSettings { num_tokens: 4, lookup_min: min, lookup_max: max, disable_by_batch_size: None }
}

#[test]
fn configs_take_vllms_spellings_and_defaults() {
    let s = settings(r#"{"method": "ngram", "num_speculative_tokens": 4}"#).unwrap();
    assert_eq!(s, SpecSettings { num_tokens: 4, lookup_min: 5, lookup_max: 5, disable_by_batch_size: None });
    let s = settings(r#"{"model": "[ngram]", "num_speculative_tokens": 3, "prompt_lookup_max": 4}"#).unwrap();
    assert_eq!((s.num_tokens, s.lookup_min, s.lookup_max), (3, 4, 4));
    let s = settings(r#"{"method": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 6, "disable_by_batch_size": 8}"#)
        .unwrap();
    assert_eq!(s, SpecSettings { num_tokens: 2, lookup_min: 2, lookup_max: 6, disable_by_batch_size: Some(8) });
}

#[test]
fn bad_configs_are_refused_naming_what_is_wrong() {
    for (json, says) in [
        (r#"{"num_speculative_tokens": 4}"#, "`method` is required"),
        (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
        (r#"{"method": "ngram", "num_speculative_tokens": 0}"#, "1 to 16"),
        (r#"{"method": "ngram", "num_speculative_tokens": 1000000}"#, "1 to 16"),
        (r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0}"#, "1 <= min"),
        (
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 2}"#,
            "min <= max",
        ),
        (r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 100000}"#, "<= 32"),
        (r#"{"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 0}"#, "at least 1"),
        (r#"{"method": "eagle", "num_speculative_tokens": 4}"#, "not built yet"),
        (r#"{"model": "meta-llama/Llama-3.2-1B", "num_speculative_tokens": 4}"#, "draft model"),
        (r#"{"method": "magic", "num_speculative_tokens": 4}"#, "unknown method"),
        (r#"{"method": "ngram", "num_speculative_tokens": -1}"#, "invalid value"),
        (r#"{"method": "ngram", "num_speculative_tokens": 4, "temperature": 1}"#, "unknown field"),
        (r#"[1, 2]"#, "JSON object"),
        ("{", "JSON object"),
    ] {
        let err = settings(json).expect_err(json);
        assert!(err.contains(says), "{json}: {err}");
    }
}

#[test]
fn the_proposal_continues_the_latest_earlier_occurrence_of_the_longest_suffix() {
    // ... 1 2 3 [7 8] ... 2 3 [9] ... 1 2 3 -> n = 3 matches at 0 (followed by 7 8 ...).
    let tokens = [1, 2, 3, 7, 8, 5, 2, 3, 9, 4, 1, 2, 3];
    let mut out = Vec::new();
    propose(&ngram(1, 3), &tokens, 2, &mut out);
    assert_eq!(out, [7, 8], "the 3-gram wins over the later 2-gram 2 3 -> 9");
    out.clear();
    propose(&ngram(1, 2), &tokens, 2, &mut out);
    assert_eq!(out, [9, 4], "with 2-grams at most, the latest earlier 2 3 is followed by 9 4");
    out.clear();
    propose(&ngram(4, 5), &tokens, 2, &mut out);
    assert!(out.is_empty(), "no 4-gram recurs");
    out.clear();
    // A continuation shorter than `max` ends at the history's end (it may overlap the suffix).
    propose(&ngram(1, 1), &[5, 6, 5], 4, &mut out);
    assert_eq!(out, [6, 5]);
    out.clear();
    propose(&ngram(1, 3), &[4], 4, &mut out);
    assert!(out.is_empty());
    propose(&ngram(1, 3), &[4, 4, 4, 4], 0, &mut out);
    assert!(out.is_empty(), "max 0 proposes nothing");
}

#[test]
fn proposals_are_bounded_by_max_and_copied_from_the_sequence() {
    let tokens: Vec<TokenId> = (0..2000).map(|i| (i * 7919 % 13) as TokenId).collect();
    for max in [1, 4, 16] {
        let mut out = Vec::new();
        propose(&ngram(1, MAX_LOOKUP), &tokens, max, &mut out);
        assert!(!out.is_empty() && out.len() <= max);
        assert!(out.iter().all(|t| tokens.contains(t)));
    }
}
