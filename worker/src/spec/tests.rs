use crate::TokenId;
use crate::splitmix::SplitMix64;

use super::ngram::propose;
use super::*;

fn ngram(min: usize, max: usize) -> SpecSettings {
    SpecSettings {
        method: SpecMethod::Ngram,
        num_tokens: 4,
        lookup_min: min,
        lookup_max: max,
        disable_by_batch_size: None,
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

/// The definition, by brute force: for n from `lookup_max` down to `lookup_min`, the latest
/// earlier occurrence of the last n tokens, and what follows it.
fn by_definition(settings: &SpecSettings, tokens: &[TokenId], max: usize) -> Vec<TokenId> {
    let len = tokens.len();
    if max == 0 || len < 2 {
        return Vec::new();
    }
    for n in (settings.lookup_min..=settings.lookup_max.min(len - 1)).rev() {
        let suffix = &tokens[len - n..];
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
            let follow = &tokens[i + n..];
            return follow[..follow.len().min(max)].to_vec();
        }
    }
    Vec::new()
}

#[test]
fn the_one_pass_search_proposes_what_the_definition_says() {
    let mut mix = SplitMix64(0x9E37_79B9_7F4A_7C15);
    let mut next = |bound: u64| mix.below(bound as usize) as u64;
    for case in 0..3000 {
        let len = 1 + next(60) as usize;
        let vocab = 2 + next(5);
        let tokens: Vec<TokenId> = (0..len).map(|_| next(vocab) as TokenId).collect();
        let min = 1 + next(4) as usize;
        let settings = ngram(min, min + next(4) as usize);
        let max = next(6) as usize;
        let mut out = Vec::new();
        propose(&settings, &tokens, max, &mut out);
        assert_eq!(out, by_definition(&settings, &tokens, max), "case {case}: {tokens:?} {settings:?} max {max}");
    }
}
