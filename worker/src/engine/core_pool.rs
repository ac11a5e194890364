//! The engine's side of pooling (embedding requests, `engine::pooling`): a pooling request is a
//! prefill-only sequence scheduled with everything else. The scheduler asks the batch for the
//! final hidden state of each prompt position it pools ([`Schedule::hidden_rows`]); here each
//! row goes into the request's [`PoolAccumulator`], and once it has every row the vector goes
//! out in one [`EngineEvent::Embedding`], followed by `Finished`, and the sequence's blocks are
//! freed at once (nothing is sampled, no KV is kept beyond what the prefix cache may reuse).

use super::EngineCore;
use crate::engine::pooling::PoolAccumulator;
use crate::engine::{EngineEvent, EngineRequest};
use crate::scheduler::{Schedule, SeqId, Sequence};

impl EngineCore {
    /// Marks `seq` as pooling when `req` is a pooling request, and returns its accumulator.
    pub(super) fn start_pooling(&self, req: &EngineRequest, seq: &mut Sequence) -> Option<PoolAccumulator> {
        let params = req.pooling?;
        let len = req.prompt_token_ids.len();
        seq.pooling = true;
        seq.hidden_pending = params.positions(len);
        Some(PoolAccumulator::new(params, len, self.model.config().hidden_size))
    }

    /// Reads the step's hidden rows into their requests, and finishes the requests that have
    /// them all.
    pub(super) fn take_hidden_rows(&mut self, schedule: &Schedule) {
        let hidden_size = self.model.config().hidden_size;
        let hidden = self.model.hidden_states();
        let mut rows = hidden.chunks_exact(hidden_size);
        let mut complete = Vec::new();
        for (seq, positions) in &schedule.hidden_rows {
            let step_rows = rows.by_ref().take(positions.len());
            let Some(acc) =
                self.seqs.get(seq).and_then(|s| self.requests.get_mut(&s.request)).and_then(|r| r.pooled.as_mut())
            else {
                continue;
            };
            step_rows.for_each(|row| acc.add(row));
            if acc.is_complete() {
                complete.push(*seq);
            }
        }
        for seq in complete {
            self.finish_pooled(seq);
        }
    }

    /// Sends `seq`'s vector, frees its blocks and ends its request.
    fn finish_pooled(&mut self, seq: SeqId) {
        let Some(state) = self.seqs.remove(&seq) else {
            return;
        };
        let cached = self.scheduler.remove(seq).map_or(0, |s| s.cached_prompt_tokens);
        let Some(req) = self.requests.get_mut(&state.request) else {
            return;
        };
        req.cached_tokens = cached;
        req.live.clear();
        if let Some(acc) = req.pooled.take() {
            let _ = req.tx.send(EngineEvent::Embedding(acc.finish()));
        }
        self.counters.prompt_tokens_total += req.prompt_len as u64;
        self.counters.requests_finished_stop += 1;
        self.finish_request(&state.request);
    }
}
