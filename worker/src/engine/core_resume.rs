//! Resuming a request that began on another replica: the head sends the output it already
//! delivered, per choice ([`EngineRequest::resumed`]), and each unfinished choice gets a sequence
//! brought to where the original stood after it, so what follows is what the original would have
//! produced (choice `i`'s seeded stream is stream `i` of the seed, as when it forked):
//! - the scheduler's sequence holds prompt + output, all computed by the prefill (the prefix
//!   cache serves what it can);
//! - the sampler counts them as output (the penalties) and its seeded stream skips the draws they
//!   took ([`SequenceSampler::resume`](crate::sampling::SequenceSampler::resume));
//! - the detokenizer and the stop-string matcher take each token's text as `accept` gave it to
//!   them (through the matcher only past `min_tokens`), and nothing is sent: the client has it;
//! - `generated` and the request's completion tokens count them, so `max_tokens`, `min_tokens`,
//!   the context length and the usage cover the whole request;
//! - a structured output's matcher takes them (a reasoning gate their text first), so the next
//!   mask is the one the original would have computed; the first mask is requested after them.
//!   A token the matcher refuses (another grammar than the original's) fails the request. One
//!   that completed the grammar (the original ended the choice at the token after it, which the
//!   client never saw) leaves a stopped matcher: the choice ends at its first new token, as on
//!   the original.
//!
//! Invariant: no resumed token of an unfinished choice ended the original (it would have finished
//! there), so none ends the continuation; validation keeps them fewer than `max_tokens`. A
//! finished choice gets no sequence; its tokens count in the usage only.

use super::{EngineCore, SeqState};
use crate::TokenId;
use crate::engine::EngineRequest;
use crate::grammar::Feed;

impl EngineCore {
    /// Replays one choice's resumed `output` of `req` into its new sequence's `state` (see the
    /// module docs); nothing for a new request. `Err`: the structured output's matcher refused
    /// a token.
    pub(super) fn replay_output(
        &mut self,
        state: &mut SeqState,
        req: &EngineRequest,
        output: &[TokenId],
    ) -> Result<(), String> {
        state.sampler.resume(&req.sampling, output);
        for &token in output {
            state.generated += 1;
            state.push_text(&self.tokenizer, token, state.generated > req.stop.min_tokens);
            if let Some(g) = state.grammar.as_mut() {
                if !g.is_active() {
                    g.pass_gate(&self.tokenizer.token_piece(token));
                } else if let Feed::Failed(e) = g.feed(token, None) {
                    return Err(format!("structured output: the resumed output does not match the constraint: {e}"));
                }
            }
        }
        if let Some(g) = state.grammar.as_ref().filter(|g| g.is_active() && !output.is_empty()) {
            g.request_mask(&mut self.mask_workers);
        }
        Ok(())
    }
}
