//! A sequence's draft: tokens proposed by speculative decoding (`crate::spec`), held at the end
//! of its tokens until the step that computes them is verified.
//!
//! Invariants: only a decoding sequence (nothing left to compute but its last sampled token)
//! takes a draft; what is left of a draft is computed whole in one step with the token before it
//! (the scheduler first trims it to the step's budget less one token for each decoding sequence
//! after it, and to the blocks the sequence holds or the pool has free: a draft never preempts
//! anything nor takes another sequence's decode token; preemption drops it); its positions are
//! never registered in the prefix cache (`complete` hashes verified tokens only); resolving it
//! keeps the accepted prefix (their K/V, computed in context, stay valid), drops the rest, and
//! gives back the blocks only the dropped positions needed, so a rejected draft leaks nothing.

use super::{Scheduler, SeqId};
use crate::TokenId;

impl Scheduler {
    /// The running sequences, in scheduling order.
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    /// Appends `tokens` to decoding sequence `id` as its draft (replacing none: a sequence with
    /// a draft, or not decoding, is left as it is). Returns whether the draft was taken.
    pub fn set_draft(&mut self, id: SeqId, tokens: &[TokenId]) -> bool {
        let Some(s) = self.seqs.get_mut(&id) else { return false };
        if tokens.is_empty() || s.draft > 0 || s.num_uncomputed() != 1 {
            return false;
        }
        s.tokens.extend_from_slice(tokens);
        s.draft = tokens.len();
        true
    }

    /// Shortens `id`'s draft to at most `max_tokens` tokens to compute in all and to the
    /// blocks it holds plus the free ones, so it neither takes budget nor preempts.
    pub(super) fn fit_draft(&mut self, id: SeqId, max_tokens: usize) {
        let Some(s) = self.seqs.get(&id) else { return };
        let room = (s.blocks.len() + self.pool.num_free()) * self.cfg.block_size;
        self.trim_draft(id, max_tokens.min(room.saturating_sub(s.num_computed)));
    }

    /// Shortens `id`'s draft so at most `max_tokens` tokens are left to compute (the token
    /// before the draft always stays).
    pub(super) fn trim_draft(&mut self, id: SeqId, max_tokens: usize) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        let drop = s.num_uncomputed().saturating_sub(max_tokens.max(1)).min(s.draft);
        s.tokens.truncate(s.tokens.len() - drop);
        s.draft -= drop;
    }

    /// Ends `id`'s draft keeping its first `accepted` tokens, and makes its last kept token
    /// uncomputed again, so its next step samples from it (a verification that could not
    /// finish).
    pub fn abandon_draft(&mut self, id: SeqId, accepted: usize) {
        self.resolve_draft(id, accepted);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.num_computed = s.num_computed.min(s.tokens.len().saturating_sub(1));
        }
    }

    /// Ends `id`'s draft after its step ran: its first `accepted` tokens become ordinary
    /// computed tokens, the rest are removed with the blocks only they needed. The caller then
    /// appends the step's sampled token ([`Scheduler::append_token`]).
    pub fn resolve_draft(&mut self, id: SeqId, accepted: usize) {
        let bs = self.cfg.block_size;
        let Some(s) = self.seqs.get_mut(&id) else { return };
        let rejected = s.draft - accepted.min(s.draft);
        s.tokens.truncate(s.tokens.len() - rejected);
        s.num_computed = s.num_computed.min(s.tokens.len());
        s.draft = 0;
        // Room for the token the caller appends next; blocks past it held only dropped positions.
        let keep = (s.tokens.len() + 1).div_ceil(bs).max(s.num_computed.div_ceil(bs));
        if s.blocks.len() > keep {
            let spare: Vec<_> = s.blocks.drain(keep..).collect();
            self.pool.release(spare.into_iter().rev());
        }
    }
}

#[cfg(test)]
#[path = "draft_tests.rs"]
mod tests;
