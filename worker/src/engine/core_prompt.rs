//! Prompt log-probabilities (vLLM's `prompt_logprobs`, and `echo` with `logprobs`), computed in
//! the prefill the engine runs anyway: the scheduler asks the batch for the logits row of every
//! prompt position of such a sequence ([`Schedule::prompt_rows`], after the sampling rows), and
//! here each row gives the next prompt token's log-probability under the raw logits, its rank
//! and the `k` most likely alternatives. Rows arrive chunk by chunk (chunked prefill) and never
//! twice (the scheduler keeps count across preemption); once the request holds one entry per
//! prompt token after the first, they go out in one [`EngineEvent::PromptLogprobs`], before the
//! first delta (the last prompt rows run in the step that samples the first token, and are read
//! before it).

use std::time::Instant;

use super::EngineCore;
use crate::TokenId;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{EngineEvent, EngineRequest, PromptLogprobs, TokenLogprob};
use crate::sampling::ranked_logprob;
use crate::sampling::reduce::{ReducedRows, RowPlan, RowResult};
use crate::scheduler::Schedule;

/// A request's prompt log-probabilities while its prefill runs.
pub(super) struct Gathering {
    /// Alternatives per token.
    pub k: usize,
    /// The prompt's first token, which has no log-probability.
    pub first_token: TokenId,
    pub first_piece: String,
    /// Entries gathered so far: prompt token `i + 1` at index `i`.
    pub tokens: Vec<TokenLogprob>,
}

impl EngineCore {
    /// What a new request gathers, if it asked for prompt log-probabilities. A one-token prompt
    /// has nothing to score: its (empty) event goes out at once.
    pub(super) fn start_prompt_logprobs(
        &self,
        req: &EngineRequest,
        tx: &UnboundedSender<EngineEvent>,
    ) -> Option<Gathering> {
        let k = req.prompt_logprobs?;
        let first_token = *req.prompt_token_ids.first()?;
        let first_piece = self.tokenizer.token_piece(first_token);
        if req.prompt_token_ids.len() == 1 {
            let _ =
                tx.send(EngineEvent::PromptLogprobs(PromptLogprobs { first_token, first_piece, tokens: Vec::new() }));
            return None;
        }
        Some(Gathering { k, first_token, first_piece, tokens: Vec::new() })
    }

    /// Full-row plans for the step's prompt rows (after the sampling rows' plans), so a model
    /// that reduces on its device copies them back whole.
    pub(super) fn plan_prompt_rows(&mut self, schedule: &Schedule) {
        if self.plans.is_empty() {
            return; // no plans: every row comes back in full
        }
        let rows: usize = schedule.prompt_rows.iter().map(|(_, r)| r.len()).sum();
        self.plans.extend(std::iter::repeat_with(RowPlan::full).take(rows));
    }

    /// Reads the step's prompt rows (those after the first `samplers` rows of `reduced`) into
    /// their requests, and sends each request's entries once it has them all.
    pub(super) fn take_prompt_rows(&mut self, schedule: &Schedule, reduced: &ReducedRows, samplers: usize) {
        let mut rows = reduced.rows.iter().skip(samplers);
        for (seq, positions) in &schedule.prompt_rows {
            let step_rows: Vec<_> = rows.by_ref().take(positions.len()).collect();
            let Some(request) = self.seqs.get(seq).map(|s| s.request.clone()) else {
                continue;
            };
            let Some(next) =
                self.scheduler.get(*seq).map(|s| s.tokens[positions.start + 1..positions.end + 1].to_vec())
            else {
                continue;
            };
            let Some(req) = self.requests.get_mut(&request) else {
                continue;
            };
            let Some(acc) = req.prompt_logprobs.as_mut() else {
                continue;
            };
            for (&token, row) in next.iter().zip(step_rows) {
                let RowResult::Full(range) = row else {
                    continue; // never planned otherwise
                };
                let (logprob, rank, top) = ranked_logprob(&reduced.logits[range.clone()], token, acc.k);
                acc.tokens.push(TokenLogprob {
                    token,
                    piece: self.tokenizer.token_piece(token),
                    logprob,
                    top: top.into_iter().map(|(t, lp)| (t, self.tokenizer.token_piece(t), lp)).collect(),
                    rank,
                });
            }
            if acc.tokens.len() + 1 >= req.prompt_len
                && let Some(acc) = req.prompt_logprobs.take()
            {
                let event =
                    PromptLogprobs { first_token: acc.first_token, first_piece: acc.first_piece, tokens: acc.tokens };
                let _ = req.tx.send(EngineEvent::PromptLogprobs(event));
            }
        }
    }
}

impl EngineCore {
    /// Prompt tokens computed this step (prefill and recompute), for the prompt throughput.
    pub(super) fn count_prompt_tokens(&mut self, schedule: &Schedule, now: Instant) {
        let mut prompt = 0u64;
        for item in &schedule.seqs {
            if let Some(s) = self.scheduler.get(item.id) {
                let end = item.start + item.len;
                prompt += end.min(s.prompt_len).saturating_sub(item.start) as u64;
            }
        }
        self.prompt_rate.add(now, prompt);
    }
}
