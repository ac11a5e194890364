//! The prompt-lookup (n-gram) proposer: the tokens that followed the most recent earlier
//! occurrence of the sequence's last n tokens, for the longest n from `lookup_max` down to
//! `lookup_min` that occurs (vLLM's `ngram` method; no model runs).
//!
//! Invariants: proposes at most `max` tokens, all copied from the sequence itself (so every
//! token id is one the model already produced or read); the search is one backward scan of the
//! history per n, at most [`super::MAX_LOOKUP`] scans, and never allocates beyond `out`.

use super::SpecSettings;
use crate::TokenId;

/// Appends to `out` up to `max` tokens proposed to follow `tokens` (the prompt and the output so
/// far); nothing when no n-gram of the settings' lengths recurs.
pub fn propose(settings: &SpecSettings, tokens: &[TokenId], max: usize, out: &mut Vec<TokenId>) {
    let len = tokens.len();
    if max == 0 || len < 2 {
        return;
    }
    for n in (settings.lookup_min..=settings.lookup_max.min(len - 1)).rev() {
        let suffix = &tokens[len - n..];
        // The latest start `i < len - n` with tokens[i..i + n] == suffix: its continuation
        // begins at i + n, which is before the end, so at least one token follows.
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
            let follow = &tokens[i + n..];
            out.extend_from_slice(&follow[..follow.len().min(max)]);
            return;
        }
    }
}
