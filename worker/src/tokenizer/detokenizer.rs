//! Incremental detokenizing: token ids in, text deltas out, one token at a time.
//!
//! Contract:
//! - The concatenation of every `push` result and `finish` equals the one-shot decode of all the
//!   pushed ids (for tokenizers whose decoder is local, e.g. byte-level BPE; decoders that rewrite
//!   across long spans may differ at the seams).
//! - A delta never ends in half a UTF-8 character: while the decoded tail ends in U+FFFD the text
//!   is held back, for at most [`MAX_HELD_TOKENS`] tokens (a character needs at most 4), after
//!   which the replacement character is emitted so garbage bytes cannot stall the stream.
//! - Cost is O(1) amortised per token: each step decodes only the window `ids[prefix_offset..]`
//!   (vLLM's prefix/read offsets); the text of `ids[prefix_offset..read_offset]` is the context
//!   that gives the new tokens their leading space/merging right, and is subtracted.

use crate::TokenId;
use crate::error::Result;

use super::Tokenizer;

/// Tokens held back waiting for a UTF-8 character to complete before emitting anyway.
pub const MAX_HELD_TOKENS: usize = 8;
/// Prompt tokens used as decoding context for the first generated tokens.
const PROMPT_CONTEXT_TOKENS: usize = 5;
/// Drop consumed ids once this many precede the window, so memory stays bounded.
const COMPACT_AT: usize = 64;

/// Turns a stream of token ids into text deltas.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    skip_special_tokens: bool,
    /// Ids from `prefix_offset`'s predecessors (up to `COMPACT_AT`) to the newest.
    ids: Vec<TokenId>,
    /// Start of the context window in `ids`.
    prefix_offset: usize,
    /// First id whose text has not been emitted yet.
    read_offset: usize,
    /// Decoded text of `ids[prefix_offset..read_offset]`, computed once per window.
    prefix_text: Option<String>,
}

impl IncrementalDetokenizer {
    /// A detokenizer with no context.
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer {
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            prefix_text: None,
        }
    }

    /// A detokenizer whose first tokens are decoded after the prompt's last few tokens, so a
    /// tokenizer that strips a leading space at the start of text does not strip it here.
    pub fn with_prompt(prompt: &[TokenId], skip_special_tokens: bool) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        IncrementalDetokenizer { ids: tail.to_vec(), read_offset: tail.len(), ..Self::new(skip_special_tokens) }
    }

    /// Adds one generated token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: TokenId) -> Result<String> {
        self.ids.push(id);
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let held = self.ids.len() - self.read_offset;
        if full.ends_with('\u{FFFD}') && held < MAX_HELD_TOKENS {
            return Ok(String::new());
        }
        self.emit(tok, full)
    }

    /// Flushes text still held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.emit(tok, full)
    }

    /// Emits `full` minus the window's context text and slides the window forward.
    fn emit(&mut self, tok: &Tokenizer, full: String) -> Result<String> {
        let prefix = match self.prefix_text.take() {
            Some(p) => p,
            None => tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?,
        };
        let delta = if full.starts_with(&prefix) {
            full[prefix.len()..].to_string()
        } else {
            // The decoder rewrote the context (rare): emit from the first differing character.
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .find(|((_, a), b)| a != b)
                .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
            full[common..].to_string()
        };
        if delta.is_empty() && self.ids.len() - self.read_offset < MAX_HELD_TOKENS {
            // Nothing visible yet (a skipped special token); keep the context as it is.
            self.prefix_text = Some(prefix);
            return Ok(delta);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset >= COMPACT_AT {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(delta)
    }
}

#[cfg(test)]
impl IncrementalDetokenizer {
    /// Ids kept in memory (for tests of the O(1) window).
    pub(crate) fn window_len(&self) -> usize {
        self.ids.len()
    }
}
