//! The engine's side of reducing logits on the device (`sampling::reduce`): before a step, one
//! [`RowPlan`] per row that samples (only when the model reduces on its device); after it,
//! sampling a sequence from its reduced row. Rows planned `Full` take the host path
//! (`EngineCore::sample_seq`), so results are the same either way. A constrained sequence's
//! reduced row carries its structured-output mask (the device applies it; no row is copied).

use super::{EngineCore, SeqState};
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
            // A draft's rows are verified on the host from full rows (`core_spec.rs`).
            let plan = if item.draft > 0 { RowPlan::full() } else { plan };
            self.plans.push(plan);
            self.plan_draft_rows(item.draft);
        }
    }

    /// Samples `seq`'s next token from its reduced row and accepts it.
    pub(super) fn sample_reduced(&mut self, seq: SeqId, reduced: Reduced<'_>) {
        let Some(mut state) = self.seqs.remove(&seq) else {
            return;
        };
        let Some(req) = self.requests.get(&state.request) else {
            self.seqs.insert(seq, state);
            return;
        };
        let suppress = self.suppressed(&state, &state.request);
        let (params, sampler) = (&req.sampling, &mut state.sampler);
        let (sampled, mask_time) = match state.grammar.as_ref().filter(|g| g.is_active()) {
            Some(g) => g.with_mask(|mask| sampler.sample_reduced(reduced, params, &suppress, mask.ok())),
            None => (sampler.sample_reduced(reduced, params, &suppress, None), None),
        };
        self.record_mask_time(mask_time);
        state.sampler.record(sampled.token);
        self.seqs.insert(seq, state);
        self.scheduler.append_token(seq, sampled.token);
        self.accept(seq, sampled);
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
