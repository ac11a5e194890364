//! The engine's side of speculative decoding (`crate::spec`): before a step, a draft for each
//! decoding sequence that may take one (prompt lookup, or the draft model's batched forwards);
//! after it, the draft verified against the target's rows.
//!
//! Verification samples each of a drafted sequence's rows in order with the sequence's own
//! sampler (as an undrafted step would sample its one row), accepting the draft token while the
//! sample equals it; the first sample that differs, or the sample after the last draft token,
//! is the step's final token. Accepted tokens go through `accept` one by one (text, stop checks,
//! limits, deltas), so a choice that ends on a draft token ends there and its later rows are
//! not used. See `spec` for why this is exact.
//!
//! Which sequences draft: decoding, generating sequences past their first token (an `n > 1`
//! request forks at its first token from one row), without a structured-output grammar (its
//! matcher would have to advance through the draft before the masks of the later rows exist);
//! with room for more than one token before `max_tokens` and `max_model_len`; as many tokens as
//! pay for the sequence's acceptance at this replica's row cost (`spec::adaptive`); and none at
//! all in a step with more running sequences than `disable_by_batch_size`.

use super::EngineCore;
use crate::Result;
use crate::sampling::reduce::{Reduced, ReducedRows, RowResult};
use crate::scheduler::{Schedule, SeqId};
use crate::spec::draft_model::{DraftAsk, DraftModel};

impl EngineCore {
    /// Speculates with `draft` (`draft_model`): its proposals go through the same verification.
    pub fn with_draft_model(mut self, draft: DraftModel) -> EngineCore {
        self.draft = Some(draft);
        self
    }

    /// The draft model, when one proposes (`draft_model`).
    pub fn draft_model(&self) -> Option<&DraftModel> {
        self.draft.as_ref()
    }

    /// Proposes a draft for every sequence that may take one this step (a draft model's
    /// forwards run here).
    pub(super) fn propose_drafts(&mut self) -> Result<()> {
        let Some(settings) = self.spec else { return Ok(()) };
        let started = std::time::Instant::now();
        self.spec_control.begin_step();
        if settings.disable_by_batch_size.is_some_and(|limit| self.scheduler.num_running() > limit) {
            if let Some(draft) = &mut self.draft {
                draft.retain_running(self.scheduler.running());
            }
            return Ok(());
        }
        let mut running = std::mem::take(&mut self.spec_running);
        running.clear();
        running.extend_from_slice(self.scheduler.running());
        let rows = running.len();
        self.spec_asks.clear();
        for &id in &running {
            if !self.may_draft(id) {
                continue;
            }
            let (Some(state), Some(seq)) = (self.seqs.get_mut(&id), self.scheduler.get(id)) else { continue };
            let Some(req) = self.requests.get(&state.request) else { continue };
            if seq.num_uncomputed() != 1 || seq.draft > 0 {
                continue;
            }
            // The step yields up to draft + 1 tokens; the choice's limits bound them.
            let room = req
                .stop
                .max_tokens
                .saturating_sub(state.generated + 1)
                .min(self.limits.max_model_len.saturating_sub(seq.tokens.len() + 1));
            // As many as pay on this replica for this sequence's acceptance (`spec::adaptive`).
            let wanted = if room == 0 { 0 } else { self.spec_control.tokens(&mut state.acceptance, rows) };
            if wanted.min(room) > 0 {
                self.spec_asks.push((id, wanted.min(room)));
            }
        }
        let mut proposed = 0; // by prompt lookup
        match &mut self.draft {
            None => {
                for &(id, max) in &self.spec_asks {
                    let Some(seq) = self.scheduler.get(id) else { continue };
                    self.spec_tokens.clear();
                    crate::spec::ngram::propose(&settings, &seq.tokens, max, &mut self.spec_tokens);
                    if !self.spec_tokens.is_empty() && self.scheduler.set_draft(id, &self.spec_tokens) {
                        proposed += self.spec_tokens.len();
                    }
                }
            }
            Some(draft) => {
                // Every ask is a running sequence's, so each has its tokens: `spec_drafts[i]`
                // is `spec_asks[i]`'s draft.
                let scheduler = &self.scheduler;
                let asks: Vec<DraftAsk<'_>> = self
                    .spec_asks
                    .iter()
                    .map(|&(id, max)| DraftAsk {
                        id,
                        tokens: &scheduler.get(id).expect("a running sequence").tokens,
                        max,
                    })
                    .collect();
                let proposed = draft.propose(&running, &asks, &mut self.spec_drafts);
                // What one more draft token costs: a single-token round of the draft.
                let (ms, tokens) = draft.last_rounds();
                self.spec_running = running;
                if let Err(e) = proposed {
                    self.end_speculation(&e);
                    return Ok(());
                }
                for (&(id, _), tokens) in self.spec_asks.iter().zip(&self.spec_drafts) {
                    if !tokens.is_empty() {
                        self.scheduler.set_draft(id, tokens);
                    }
                }
                self.spec_control.observe_proposals(tokens, ms);
                return Ok(());
            }
        }
        self.spec_control.observe_proposals(proposed, started.elapsed().as_secs_f64() * 1e3);
        self.spec_running = running;
        Ok(())
    }

    /// Whether sequence `id` may ever take a draft: not under a grammar (its matcher would have
    /// to advance through the draft before later rows' masks exist), not pooling, and past an
    /// `n > 1` request's first token (the choices fork from one row).
    fn may_draft(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|state| {
            state.grammar.is_none()
                && self.requests.get(&state.request).is_some_and(|req| req.forked && req.pooled.is_none())
        })
    }

    /// Ends speculation for this replica after the draft model failed (the target still
    /// serves): every draft state goes with the draft model.
    fn end_speculation(&mut self, error: &crate::WorkerError) {
        tracing::error!(%error, "the draft model failed: speculative decoding is off from now on");
        self.draft = None;
        self.spec = None;
    }

    /// A draft model computes the prompt chunks this step prefills, in step with the target, so
    /// a sequence's first draft does not wait on a second prefill of its prompt (none before the
    /// controller knows that drafting can pay, and none for sequences that never draft).
    pub(super) fn draft_prefill(&mut self, schedule: &Schedule) {
        if self.draft.is_none() || !self.spec_control.drafts_can_pay(self.scheduler.num_running()) {
            return;
        }
        let asks: Vec<DraftAsk<'_>> = schedule
            .seqs
            .iter()
            .filter(|item| item.len > 1 + item.draft && self.may_draft(item.id))
            .filter_map(|item| {
                let seq = self.scheduler.get(item.id)?;
                Some(DraftAsk {
                    id: item.id,
                    tokens: &seq.tokens[..(item.start + item.len).min(seq.tokens.len())],
                    max: 0,
                })
            })
            .collect();
        let Some(draft) = self.draft.as_mut().filter(|_| !asks.is_empty()) else { return };
        if let Err(e) = draft.propose(self.scheduler.running(), &asks, &mut self.spec_drafts) {
            self.end_speculation(&e);
        }
    }

    /// Logits rows the step's sampling sequences take, drafts included.
    pub(super) fn sampling_rows(schedule: &Schedule) -> usize {
        schedule.seqs.iter().filter(|s| s.samples).map(|s| 1 + s.draft).sum()
    }

    /// Verifies `seq`'s draft of `draft` tokens against its rows of `reduced`, from `first` (one
    /// per draft token and one after, in position order; full, or reduced on the device as
    /// planned) and accepts what holds.
    pub(super) fn verify_draft(&mut self, seq: SeqId, draft: usize, first: usize, reduced: &mut ReducedRows) {
        let (Some(s), Some(req_id)) = (self.scheduler.get(seq), self.seqs.get(&seq).map(|s| s.request.clone())) else {
            return;
        };
        // The proposer's buffer (free until the next step's proposals) holds the draft while
        // accepting tokens changes the sequence.
        let mut proposed = std::mem::take(&mut self.spec_tokens);
        proposed.clear();
        proposed.extend_from_slice(&s.tokens[s.tokens.len() - draft..]);
        let mut accepted = 0;
        for i in 0..=draft {
            let Some(mut state) = self.seqs.remove(&seq) else { break };
            let sampled = match reduced.rows[first + i].clone() {
                RowResult::Full(range) => {
                    Some(self.sample_with(&mut state, &req_id, &mut reduced.logits[range.clone()]))
                }
                RowResult::Token(token) => self.sample_reduced_with(&mut state, Reduced::Token(token)),
                RowResult::TopK(range) => {
                    self.sample_reduced_with(&mut state, Reduced::TopK(&reduced.candidates[range.clone()]))
                }
            };
            self.seqs.insert(seq, state);
            let Some(sampled) = sampled else { break };
            if proposed.get(i) == Some(&sampled.token) {
                accepted += 1;
                self.accept(seq, sampled);
                if self.seqs.contains_key(&seq) {
                    continue;
                }
                break; // the choice ended on an accepted token
            }
            self.scheduler.resolve_draft(seq, accepted);
            self.scheduler.append_token(seq, sampled.token);
            self.accept(seq, sampled);
            break;
        }
        if self.scheduler.get(seq).is_some_and(|s| s.draft > 0) {
            // Verification stopped before the step's last token (its request went away): the
            // sequence keeps what was accepted and samples again from there.
            self.scheduler.abandon_draft(seq, accepted);
        }
        self.spec_tokens = proposed;
        self.counters.spec_decode.record(draft, accepted);
        if let Some(state) = self.seqs.get_mut(&seq) {
            state.acceptance.record(draft, accepted);
        }
    }
}
