//! How choices and requests end: a choice's last delta (held-back text flushed), its blocks
//! freed, and the request's `Finished` with usage and timings once no choice is left; aborts
//! (one request, or all at shutdown) and failing everything after an engine error. Every path
//! sends the deferred output of the last step first (`core_deferred.rs`), so a stream's tokens
//! all come before its end.

use std::time::Instant;

use super::{EngineCore, SeqState};
use crate::TokenId;
use crate::engine::request::{ChoiceDelta, EngineEvent, FinishReason, RequestTimings, StopReason, TokenLogprob, Usage};
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;

impl EngineCore {
    /// Ends a request early: its choices finish with `abort` and its blocks are freed now.
    pub fn abort(&mut self, request_id: &str) {
        self.flush_deferred();
        let Some(req) = self.requests.get(request_id) else {
            return;
        };
        for seq in req.live.clone() {
            self.finish_seq(seq, FinishReason::Abort, None, String::new(), None);
        }
    }

    /// Aborts every request (shutdown).
    pub fn abort_all(&mut self) {
        let ids: Vec<String> = self.requests.keys().cloned().collect();
        for id in ids {
            self.abort(&id);
        }
    }

    /// Fails every request with `message` and clears all state (after an engine error).
    pub fn fail_all(&mut self, message: &str) {
        self.flush_deferred();
        for (_, req) in self.requests.drain() {
            let _ = req.tx.send(EngineEvent::Failed(message.to_string()));
        }
        for id in self.seqs.keys().copied().collect::<Vec<_>>() {
            self.scheduler.remove(id);
        }
        self.seqs.clear();
    }

    /// Ends one choice: flushes held-back text, sends its last delta, frees its blocks, and ends
    /// the request once no choice is left.
    pub(super) fn finish_seq(
        &mut self,
        seq: SeqId,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
        mut text: String,
        last: Option<(TokenId, Vec<TokenLogprob>)>,
    ) {
        let Some(mut state) = self.seqs.remove(&seq) else {
            return;
        };
        let cached = self.scheduler.remove(seq).map_or(0, |s| s.cached_prompt_tokens);
        let Some(req) = self.requests.get_mut(&state.request) else {
            return;
        };
        req.cached_tokens = req.cached_tokens.max(cached);
        if reason == FinishReason::Length {
            text.push_str(&drain_text(&mut state, &self.tokenizer));
        }
        let (token_ids, logprobs) = match last {
            Some((t, lp)) => (vec![t], lp),
            None => (Vec::new(), Vec::new()),
        };
        let _ = req.tx.send(EngineEvent::Delta(ChoiceDelta {
            index: state.index,
            text,
            token_ids,
            logprobs,
            finish_reason: Some(reason),
            stop_reason,
        }));
        match reason {
            FinishReason::Stop => self.counters.requests_finished_stop += 1,
            FinishReason::Length => self.counters.requests_finished_length += 1,
            FinishReason::Abort => self.counters.requests_finished_abort += 1,
        }
        req.live.retain(|&s| s != seq);
        if req.live.is_empty() && (req.forked || reason == FinishReason::Abort) {
            self.finish_request(&state.request);
        }
    }

    /// Ends a request whose choices are all done: its usage and timings go out in `Finished`,
    /// and its latency and size histograms are recorded.
    pub(super) fn finish_request(&mut self, request: &str) {
        if let Some(req) = self.requests.remove(request) {
            let now = Instant::now();
            let usage = Usage {
                prompt_tokens: req.prompt_len,
                completion_tokens: req.completion_tokens,
                cached_tokens: req.cached_tokens,
            };
            let timings = RequestTimings {
                queue: req.scheduled_at.unwrap_or(now).duration_since(req.arrival),
                first_token: req.first_token_at.map(|t| t.duration_since(req.arrival)),
                total: now.duration_since(req.arrival),
            };
            let histograms = &mut self.counters.histograms;
            histograms.e2e_latency.observe_duration(timings.total);
            histograms.queue_time.observe_duration(timings.queue);
            histograms.prompt_tokens.observe(req.prompt_len as f64);
            histograms.generation_tokens.observe(req.completion_tokens as f64);
            let _ = req.tx.send(EngineEvent::Finished { usage, timings });
        }
    }
}

/// What the detokenizer and the stop matcher still hold, released at a finish that is not a stop
/// string or token.
pub(super) fn drain_text(state: &mut SeqState, tokenizer: &Tokenizer) -> String {
    let tail = state.detok.finish(tokenizer).unwrap_or_default();
    let mut text = state.stop.push(&tail).emit;
    text.push_str(&state.stop.finish());
    text
}

impl EngineCore {
    /// Aborts requests whose receivers are gone (clients that disconnected).
    pub(super) fn drop_disconnected(&mut self) {
        let gone: Vec<String> =
            self.requests.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.abort(&id);
        }
    }
}
