//! Output work of a step that can wait for the next one: the text of a sampled token that ends
//! nothing (detokenizing it, the logprob pieces) and its delta event. The engine queues the next
//! step on the device first and does this work while the device runs it
//! (`Model::forward_overlapped`), so on a GPU it costs no step time.
//!
//! Invariants: only a token that does not end its choice as far as the engine knows is deferred
//! (no stop token, length reached or grammar completed by a token fed at once, and no stop
//! strings to match; a structured-output token is with the mask workers already, and a grammar
//! it completes ends the choice at the next token), so whether a sequence runs on is known
//! without its text; a sequence's deferred token is flushed before its next
//! token is handled and before anything else is sent for its request (a finish, an abort, a
//! failure), so every stream keeps its order; a token whose sequence or request is gone by
//! then is dropped.

use std::collections::HashMap;

use super::{RequestState, SeqState, token_logprobs};
use crate::TokenId;
use crate::engine::request::{ChoiceDelta, EngineEvent};
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;

/// A sampled token whose output waits.
struct Pending {
    seq: SeqId,
    token: TokenId,
    /// Whether `min_tokens` was passed with this token (stop-string matching starts there).
    past_min: bool,
    /// The token's log-probability and the top alternatives, when the request asked for them.
    logprobs: Option<(f32, Vec<(TokenId, f32)>)>,
}

/// The deferred tokens of the last step, in the order they were sampled.
#[derive(Default)]
pub(super) struct DeferredOutputs {
    pending: Vec<Pending>,
}

impl DeferredOutputs {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether a token of `seq` waits (possible within one step only when a speculative draft
    /// gave the sequence several tokens).
    pub fn holds(&self, seq: SeqId) -> bool {
        self.pending.iter().any(|p| p.seq == seq)
    }

    pub fn push(&mut self, seq: SeqId, token: TokenId, past_min: bool, logprobs: Option<(f32, Vec<(TokenId, f32)>)>) {
        self.pending.push(Pending { seq, token, past_min, logprobs });
    }

    /// Sends `seq`'s deferred tokens now, leaving the others' waiting (a later token of `seq`
    /// in the same step, a draft's, is about to go out).
    pub fn flush_seq(
        &mut self,
        seq: SeqId,
        seqs: &mut HashMap<SeqId, SeqState>,
        requests: &HashMap<String, RequestState>,
        tokenizer: &Tokenizer,
    ) {
        let (mut mine, rest): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.seq == seq);
        self.pending = rest;
        Self::send(&mut mine, seqs, requests, tokenizer);
    }

    /// Detokenizes every deferred token and sends its delta.
    pub fn flush(
        &mut self,
        seqs: &mut HashMap<SeqId, SeqState>,
        requests: &HashMap<String, RequestState>,
        tokenizer: &Tokenizer,
    ) {
        let mut pending = std::mem::take(&mut self.pending);
        Self::send(&mut pending, seqs, requests, tokenizer);
        self.pending = pending; // empty, its capacity kept
    }

    /// Sends and removes every token of `pending`, in order.
    fn send(
        pending: &mut Vec<Pending>,
        seqs: &mut HashMap<SeqId, SeqState>,
        requests: &HashMap<String, RequestState>,
        tokenizer: &Tokenizer,
    ) {
        for p in pending.drain(..) {
            let Some(state) = seqs.get_mut(&p.seq) else { continue };
            let Some(req) = requests.get(&state.request) else { continue };
            let text = state.push_text(tokenizer, p.token, p.past_min).emit;
            let logprobs =
                token_logprobs(tokenizer, p.token, p.logprobs.as_ref().map(|(lp, top)| (*lp, top.as_slice())));
            let _ = req.tx.send(EngineEvent::Delta(ChoiceDelta {
                index: state.index,
                text,
                token_ids: vec![p.token],
                logprobs,
                finish_reason: None,
                stop_reason: None,
            }));
        }
    }
}
