//! The engine's side of structured outputs (`grammar`): a constrained sequence's matcher starts
//! with it and its first mask is requested at once (computed while the prompt is prefilled),
//! unless it waits behind a reasoning gate: then its tokens are free and only their text is fed
//! to the gate, and the matcher starts with the token after the one that opened it;
//! each accepted token advances the matcher and, if the choice goes on, the next mask is
//! requested (computed while the next forward pass runs); sampling waits for it. A complete
//! grammar ends the choice with `stop`; a matcher error (a limit hit mid-generation) fails the
//! request, since its output could no longer be guaranteed.

use std::time::Duration;

use super::{EngineCore, SeqState};
use crate::engine::EngineEvent;
use crate::grammar::{Advance, CompiledGrammar, ReasoningGate, SeqGrammar, TokenMask};
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

    /// Feeds `token` to `seq`'s matcher: `Ok(true)` when the grammar is now complete, `Ok(false)`
    /// when it goes on (or the sequence is unconstrained, or still behind its gate), `Err` with
    /// the reason it failed.
    pub(super) fn advance_grammar(&mut self, seq: SeqId, token: crate::TokenId) -> Result<bool, String> {
        let Some(g) = self.seqs.get_mut(&seq).and_then(|s| s.grammar.as_mut()) else { return Ok(false) };
        if !g.is_active() {
            g.pass_gate(&self.tokenizer.token_piece(token));
            return Ok(false);
        }
        match g.advance(token) {
            Advance::Continue => Ok(false),
            Advance::Stopped => Ok(true),
            Advance::Failed(e) => Err(format!("structured output: {e}")),
        }
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
