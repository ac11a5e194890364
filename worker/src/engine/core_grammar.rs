//! The engine's side of structured outputs (`grammar`): a constrained sequence's matcher starts
//! with it and its first mask is requested at once (computed while the prompt is prefilled),
//! unless it waits behind a reasoning gate: then its tokens are free and only their text is fed
//! to the gate, and the matcher starts with the token after the one that opened it;
//! each accepted token on which the choice goes on is handed to the mask workers, which feed it
//! to the matcher and compute the next mask while the next forward pass runs (the engine thread
//! does no matcher work); sampling waits for the mask. A token that ends the choice anyway is
//! fed at once. A complete grammar ends the choice with `stop`: at once when the token was fed
//! at once, else at the sequence's next token, which is dropped (a stopped matcher's mask allows
//! only end-of-sequence, and the text and usage are those of the tokens before it). A matcher
//! error (a limit hit mid-generation) fails the request, since its output could no longer be
//! guaranteed.

use std::time::Duration;

use super::{EngineCore, FinishReason, SeqState, drain_text};
use crate::engine::EngineEvent;
use crate::grammar::{CompiledGrammar, Feed, ReasoningGate, SeqGrammar, TokenMask};
use crate::scheduler::SeqId;

impl EngineCore {
    /// A new sequence's matcher, its first mask already on its way, or behind a gate that
    /// opens when the output writes `after`.
    pub(super) fn start_grammar(&mut self, compiled: &CompiledGrammar, after: Option<&str>) -> SeqGrammar {
        let grammar = SeqGrammar::new(compiled, after.filter(|m| !m.is_empty()).map(ReasoningGate::new));
        if grammar.is_active() {
            grammar.request_mask(&mut self.mask_workers);
        }
        grammar
    }

    /// Hands `token` to `seq`'s matcher: queued with the mask workers when the choice goes on
    /// (`ends`: it ends with this token anyway, so the token is fed now); a gated sequence's
    /// token passes its gate instead, and the first mask is requested when the gate opens.
    /// `Taken` for an unconstrained sequence.
    pub(super) fn advance_grammar(&mut self, seq: SeqId, token: crate::TokenId, ends: bool) -> Feed {
        let Some(g) = self.seqs.get_mut(&seq).and_then(|s| s.grammar.as_mut()) else { return Feed::Taken };
        if !g.is_active() {
            if g.pass_gate(&self.tokenizer.token_piece(token)) && !ends {
                g.request_mask(&mut self.mask_workers);
            }
            return Feed::Taken;
        }
        match g.feed(token, (!ends).then_some(&mut self.mask_workers)) {
            Feed::Failed(e) => Feed::Failed(format!("structured output: {e}")),
            other => other,
        }
    }

    /// Ends `seq`'s choice, whose last token completed the grammar (learnt at the token after
    /// it, which is dropped): `stop`, with the text it still held back.
    pub(super) fn finish_complete_grammar(&mut self, seq: SeqId) {
        let Some(state) = self.seqs.get_mut(&seq) else { return };
        let text = drain_text(state, &self.tokenizer);
        self.finish_seq(seq, FinishReason::Stop, None, text, None);
    }

    /// The mask a device applies to `state`'s row while reducing it.
    pub(super) fn plan_mask(state: &SeqState) -> Option<TokenMask> {
        state.grammar.as_ref().filter(|g| g.is_active()).map(SeqGrammar::token_mask)
    }

    pub(super) fn record_mask_time(&mut self, time: Option<Duration>) {
        if let Some(time) = time {
            self.counters.histograms.structured_output_mask.observe_duration(time);
        }
    }

    /// Ends `seq`'s whole request with a failure: every choice is dropped and its blocks freed.
    pub(super) fn fail_request_of(&mut self, seq: SeqId, message: &str) {
        let Some(req_id) = self.seqs.get(&seq).map(|s| s.request.clone()) else { return };
        let Some(req) = self.requests.remove(&req_id) else { return };
        for s in &req.live {
            self.seqs.remove(s);
            self.scheduler.remove(*s);
        }
        self.counters.requests_finished_abort += req.live.len() as u64;
        tracing::warn!(request_id = %req_id, %message, "request failed");
        let _ = req.tx.send(EngineEvent::Failed(message.to_string()));
    }
}
