//! The engine's side of reducing logits on the device (`sampling::reduce`): before a step, one
//! [`RowPlan`] per row that samples (only when the model reduces on its device); after it,
//! sampling a sequence from its reduced row. Rows planned `Full` take the host path
//! (`EngineCore::sample_seq`), so results are the same either way. A constrained sequence's
//! reduced row carries its structured-output mask (the device applies it; no row is copied).
//! A speculative draft's rows repeat its first row's plan when no row depends on the tokens
//! before it (no penalty history, nothing suppressed), and are planned full otherwise.

use super::{EngineCore, SeqState};
use crate::sampling::Sampled;
use crate::sampling::reduce::{Reduced, Reduction, RowPlan};
use crate::scheduler::{Schedule, SeqId};

impl EngineCore {
    /// Fills `self.plans` for the step's sampling rows, in row order; leaves it empty when the
    /// model does not reduce on its device.
    pub(super) fn plan_rows(&mut self, schedule: &Schedule) {
        self.plans.clear();
        if !self.model.reduces_on_device() {
            return;
        }
        for item in schedule.seqs.iter().filter(|s| s.samples) {
            let plan = match self.seqs.get(&item.id) {
                Some(state) => match self.requests.get(&state.request) {
                    // The first token of an `n > 1` request forks from the full row.
                    Some(req) if req.forked => {
                        let mut plan = state.sampler.plan_row(&req.sampling, &self.suppressed(state, &state.request));
                        if plan.reduction != Reduction::Full {
                            plan.mask = Self::plan_mask(state);
                        }
                        plan
                    }
                    _ => RowPlan::full(),
                },
                None => RowPlan::full(),
            };
            // A draft's rows (`core_spec.rs`) share the first row's plan when nothing in it
            // depends on the tokens before them; otherwise they come back full.
            let shared = item.draft > 0 && plan.reduction != Reduction::Full && self.draft_rows_share_plans(item.id);
            let plan = if item.draft > 0 && !shared { RowPlan::full() } else { plan };
            let draft_plan = if shared { plan.clone() } else { RowPlan::full() };
            self.plans.push(plan);
            self.plans.extend(std::iter::repeat_n(draft_plan, item.draft));
        }
    }

    /// Samples `seq`'s next token from its reduced row and accepts it.
    pub(super) fn sample_reduced(&mut self, seq: SeqId, reduced: Reduced<'_>) {
        let Some(mut state) = self.seqs.remove(&seq) else {
            return;
        };
        let Some(sampled) = self.sample_reduced_with(&mut state, reduced) else {
            self.seqs.insert(seq, state);
            return;
        };
        self.seqs.insert(seq, state);
        self.scheduler.append_token(seq, sampled.token);
        self.accept(seq, sampled);
    }

    /// Samples the token `state`'s reduced row gives and records it in its sampler (the reduced
    /// counterpart of `sample_with`); `None` when its request is gone.
    pub(super) fn sample_reduced_with(&mut self, state: &mut SeqState, reduced: Reduced<'_>) -> Option<Sampled> {
        let req = self.requests.get(&state.request)?;
        let suppress = self.suppressed(state, &state.request);
        let (params, sampler) = (&req.sampling, &mut state.sampler);
        let (sampled, mask_time) = match state.grammar.as_ref().filter(|g| g.is_active()) {
            Some(g) => g.with_mask(|mask| sampler.sample_reduced(reduced, params, &suppress, mask.ok())),
            None => (sampler.sample_reduced(reduced, params, &suppress, None), None),
        };
        self.record_mask_time(mask_time);
        state.sampler.record(sampled.token);
        Some(sampled)
    }

    /// Whether `seq`'s draft rows can take the plan of the row before them: its sampler keeps
    /// no history and nothing is suppressed now (so nothing is for the rows after either).
    fn draft_rows_share_plans(&self, seq: SeqId) -> bool {
        self.seqs
            .get(&seq)
            .is_some_and(|state| !state.sampler.keeps_history() && self.suppressed(state, &state.request).is_empty())
    }

    /// The step's suppressed ids of a sequence: EOS and the stop tokens while `min_tokens` is
    /// not reached.
    pub(super) fn suppressed(&self, state: &SeqState, req_id: &str) -> Vec<crate::TokenId> {
        match self.requests.get(req_id) {
            Some(req) if state.generated < req.stop.min_tokens => {
                let eos = if req.stop.ignore_eos { &[][..] } else { self.tokenizer.eos_token_ids() };
                eos.iter().chain(&req.stop.stop_token_ids).copied().collect()
            }
            _ => Vec::new(),
        }
    }
}
