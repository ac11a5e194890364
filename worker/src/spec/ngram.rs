//! The prompt-lookup (n-gram) proposer: the tokens that followed the most recent earlier
//! occurrence of the sequence's last n tokens, for the longest n from `lookup_max` down to
//! `lookup_min` that occurs (vLLM's `ngram` method; no model runs).
//!
//! Invariants: proposes at most `max` tokens, all copied from the sequence itself (so every
//! token id is one the model already produced or read); the search is one backward scan of at
//! most [`SEARCH_WINDOW`] tokens, comparing at most `lookup_max` tokens where the last token
//! recurs, and never allocates beyond `out`.

use super::SpecSettings;
use crate::TokenId;

/// The most recent tokens the lookup searches (a long reasoning chain's whole history would
/// make every step's search grow with it).
pub const SEARCH_WINDOW: usize = 16384;

/// Appends to `out` up to `max` tokens proposed to follow `tokens` (the prompt and the output so
/// far); nothing when no n-gram of the settings' lengths recurs within [`SEARCH_WINDOW`].
///
/// One backward pass: at each earlier position holding the last token, the length of the
/// match ending there (capped at `lookup_max`); the longest match of at least `lookup_min`
/// wins, the latest among equals, and a full-length match ends the search.
pub fn propose(settings: &SpecSettings, tokens: &[TokenId], max: usize, out: &mut Vec<TokenId>) {
    let len = tokens.len();
    if max == 0 || len < 2 {
        return;
    }
    let longest = settings.lookup_max.min(len - 1);
    let last = tokens[len - 1];
    let floor = len.saturating_sub(SEARCH_WINDOW);
    let mut best: Option<(usize, usize)> = None; // (match length, end position)
    for end in (floor..len - 1).rev() {
        if tokens[end] != last {
            continue;
        }
        let cap = longest.min(end + 1);
        let matched = (1..cap).take_while(|&k| tokens[end - k] == tokens[len - 1 - k]).count() + 1;
        if matched >= settings.lookup_min && best.is_none_or(|(m, _)| matched > m) {
            best = Some((matched, end));
            if matched == longest {
                break;
            }
        }
    }
    if let Some((_, end)) = best {
        let follow = &tokens[end + 1..];
        out.extend_from_slice(&follow[..follow.len().min(max)]);
    }
}
