//! Adaptive speculation: how many tokens to propose for one sequence in one step, from what its
//! drafts earned so far and what a row of the step costs on this replica.
//!
//! A draft's k-th token is accepted with probability about `alpha^k` (alpha: the sequence's
//! acceptance rate per proposed token, an exponential average with a hopeful prior, so a new
//! sequence tries), and costs one more row of the forward pass plus what proposing it costs
//! (`e` ms, an exponential average per proposed token: prompt lookup's search, nearly nothing;
//! a draft model's single-token rounds, its catch-up forward being the cost of keeping a draft
//! at all, whose bursts (a new long prompt) would otherwise turn drafting off). With a step of `rows` decode rows costing
//! `a + b * rows` ms (a line fitted over recent decode-only steps, proposals not included,
//! `LineFit`), the token is worth its time while `alpha^k >= (b + e) * rows / (a + b * rows)`:
//! the token it may add against the tokens the same milliseconds make without speculation. On a
//! GPU at small batches rows are nearly free and every sequence proposes the configured number
//! (unless its draft model costs more than the tokens it wins); on a CPU, or a GPU at large
//! batches, only well-accepted sequences do, and as few tokens as pay.
//!
//! Invariants: never more than the configured number of tokens; once the cost fit was
//! trustworthy, its last trustworthy line is used (steps of one row count wear its spread away
//! without changing the line); before that every sequence proposes the configured number, except on every other step (so
//! steps of different row counts make the fit possible even where every draft is full); a
//! sequence whose rate earns it nothing still proposes one token every [`PROBE_EVERY`] steps, so
//! its rate can recover, unless a proposed token costs more than it could ever win (the share
//! is above 1: then probing, which for a draft model means catching its cache up on every token
//! since, would only cost).

use crate::engine::step_cost::LineFit;

/// A sequence that earns no draft still proposes one token this often (steps).
pub const PROBE_EVERY: u32 = 16;
/// How much of a sequence's acceptance history one verified draft keeps.
const ACCEPTANCE_DECAY: f64 = 0.8;
/// The prior (accepted, tried) of a new sequence: a rate of 0.8 until drafts say otherwise.
const PRIOR: (f64, f64) = (4.0, 5.0);
/// Decode-only steps observed before the cost fit is used, and the spread of their row counts
/// it needs.
const MIN_STEPS: u64 = 16;
const MIN_SPREAD_ROWS: f64 = 0.5;

/// One sequence's acceptance so far.
#[derive(Clone, Debug)]
pub struct Acceptance {
    accepted: f64,
    tried: f64,
    /// Steps since it last proposed (while it earns no draft).
    idle: u32,
}

impl Default for Acceptance {
    fn default() -> Self {
        Acceptance { accepted: PRIOR.0, tried: PRIOR.1, idle: 0 }
    }
}

impl Acceptance {
    /// The estimated chance that a proposed token is accepted, given the ones before it were.
    pub fn rate(&self) -> f64 {
        self.accepted / self.tried
    }

    /// Records a verified draft of `proposed` tokens whose first `accepted` held: each accepted
    /// token was one success, the first rejected one (if any) one failure.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        let rejected = usize::from(accepted < proposed);
        self.accepted = self.accepted * ACCEPTANCE_DECAY + accepted as f64;
        self.tried = self.tried * ACCEPTANCE_DECAY + (accepted + rejected) as f64;
    }
}

/// How much of the proposal cost's history one step keeps.
const PROPOSAL_DECAY: f64 = 0.9;

/// The replica's speculation controller: the configured most, the decode steps' cost and the
/// proposals' cost.
#[derive(Clone, Debug)]
pub struct Controller {
    max: usize,
    cost: LineFit,
    /// Exponentially weighted proposal time (ms) and proposed tokens.
    proposal_ms: f64,
    proposed: f64,
    /// Steps begun ([`Controller::begin_step`]).
    steps: u64,
    /// The last trustworthy fit: steps of one row count (a stream the controller keeps from
    /// drafting) wear the fit's spread away, and the line they follow has not changed.
    known: Option<(f64, f64)>,
}

impl Controller {
    /// A controller proposing at most `max` tokens per sequence and step.
    pub fn new(max: usize) -> Controller {
        Controller { max, cost: LineFit::default(), proposal_ms: 0.0, proposed: 0.0, steps: 0, known: None }
    }

    /// Marks the start of a step's proposals.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// Records a step without prompt tokens: `rows` rows (decode tokens and drafts) in `ms`,
    /// proposing not included.
    pub fn observe_step(&mut self, rows: usize, ms: f64) {
        if ms.is_finite() && ms >= 0.0 {
            self.cost.observe(rows as f64, ms);
            if let Some(fit) = self.cost.fit(MIN_STEPS, MIN_SPREAD_ROWS) {
                self.known = Some(fit);
            }
        }
    }

    /// Records a step's proposals: `tokens` proposed in `ms`.
    pub fn observe_proposals(&mut self, tokens: usize, ms: f64) {
        if tokens > 0 && ms.is_finite() && ms >= 0.0 {
            self.proposal_ms = self.proposal_ms * PROPOSAL_DECAY + ms;
            self.proposed = self.proposed * PROPOSAL_DECAY + tokens as f64;
        }
    }

    /// What proposing one token costs, ms (0 until a proposal was timed).
    pub fn proposal_cost(&self) -> f64 {
        if self.proposed > 0.0 { self.proposal_ms / self.proposed } else { 0.0 }
    }

    /// The share of a step of `rows` decode rows that one more proposed token costs, its row and
    /// its proposal (0 while unknown; above 1 when proposing costs more than a step's row
    /// makes): the acceptance chance the token must beat.
    pub fn row_share(&self, rows: usize) -> f64 {
        match self.known {
            Some((a, b)) => {
                let rows = rows.max(1) as f64;
                (b + self.proposal_cost()) * rows / (a + b * rows)
            }
            None => 0.0,
        }
    }

    /// Whether a draft token can pay in a step of `rows` decode rows at all (the costs are known
    /// and a fully accepted token would win more than it costs).
    pub fn drafts_can_pay(&self, rows: usize) -> bool {
        self.known.is_some() && self.row_share(rows) < 1.0
    }

    /// Tokens to propose for a sequence of `acceptance` in a step of `rows` decode rows.
    pub fn tokens(&self, acceptance: &mut Acceptance, rows: usize) -> usize {
        if self.known.is_none() && self.steps.is_multiple_of(2) {
            return 0; // learning the cost: a step without drafts
        }
        let (alpha, share) = (acceptance.rate().clamp(0.0, 0.999), self.row_share(rows));
        let (mut k, mut chance) = (0, alpha);
        while k < self.max && chance >= share && chance > 0.0 {
            k += 1;
            chance *= alpha;
        }
        if k > 0 {
            acceptance.idle = 0;
            return k;
        }
        acceptance.idle += 1;
        // A probe learns the acceptance; where a proposed token costs more than a plain step's
        // row makes (a draft model as large as the target), no acceptance would pay.
        if acceptance.idle >= PROBE_EVERY && share < 1.0 {
            acceptance.idle = 0;
            return 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller whose decode steps cost `a + b * rows` ms.
    fn costing(max: usize, a: f64, b: f64) -> Controller {
        let mut c = Controller::new(max);
        c.begin_step();
        for i in 0..64 {
            let rows = 1 + i % 5;
            c.observe_step(rows, a + b * rows as f64);
        }
        c
    }

    fn with_rate(rate: f64) -> Acceptance {
        Acceptance { accepted: rate * 100.0, tried: 100.0, idle: 0 }
    }

    #[test]
    fn before_the_cost_is_known_every_sequence_proposes_the_most_on_every_other_step() {
        let mut c = Controller::new(4);
        c.begin_step();
        assert_eq!(c.tokens(&mut Acceptance::default(), 1), 4);
        assert_eq!(c.tokens(&mut with_rate(0.2), 64), 4);
        c.begin_step();
        assert_eq!(c.tokens(&mut Acceptance::default(), 1), 0, "a step that teaches the cost of fewer rows");
        // Full drafts and none give the fit its spread, and then it decides.
        for i in 0..16 {
            c.begin_step();
            c.observe_step(if i % 2 == 0 { 5 } else { 1 }, if i % 2 == 0 { 24.5 } else { 6.5 });
        }
        assert!((c.row_share(1) - 4.5 / 6.5).abs() < 1e-6);
        assert_eq!(c.tokens(&mut with_rate(0.95), 1), 4);
    }

    #[test]
    fn a_draft_model_that_costs_more_than_it_wins_is_turned_down() {
        // A CPU running a model that drafts for itself: each draft token takes a forward of the
        // same model (6.5 ms) besides its row (4.5 ms), while a plain step makes a token in 6.5.
        let mut cpu = costing(4, 2.0, 4.5);
        cpu.observe_proposals(4, 26.0);
        assert!((cpu.proposal_cost() - 6.5).abs() < 1e-9);
        assert!(cpu.row_share(1) > 1.0 && !cpu.drafts_can_pay(1));
        let mut perfect = with_rate(1.0);
        let proposed: Vec<usize> = (0..4 * PROBE_EVERY).map(|_| cpu.tokens(&mut perfect, 1)).collect();
        assert_eq!(proposed.iter().sum::<usize>(), 0, "not even a probe: {proposed:?}");
        // An 8B target on a GPU with a 1B draft: 6 ms a step, 0.02 ms a row, 1.5 ms a draft
        // token at one stream: a quarter of the step, so tokens accepted 80% of the time pay.
        let mut gpu = costing(4, 6.0, 0.02);
        gpu.observe_proposals(4, 6.0);
        assert!((gpu.row_share(1) - 1.52 / 6.02).abs() < 1e-6 && gpu.drafts_can_pay(1));
        assert!(!Controller::new(4).drafts_can_pay(1), "not before the costs are known");
        assert_eq!(gpu.tokens(&mut with_rate(0.8), 1), 4, "0.8^4 = 0.41 beats 0.25");
        assert_eq!(gpu.tokens(&mut with_rate(0.4), 1), 1, "0.4 beats 0.25, 0.16 does not");
    }

    #[test]
    fn where_rows_cost_time_only_well_accepted_sequences_propose_and_only_what_pays() {
        // A small model on a CPU: 2 ms a step, 4.5 ms a row (a row is 69% of a one-row step).
        let cpu = costing(4, 2.0, 4.5);
        assert!((cpu.row_share(1) - 4.5 / 6.5).abs() < 1e-6);
        assert_eq!(cpu.tokens(&mut with_rate(0.95), 1), 4, "0.95^4 = 0.81 still beats 0.69");
        assert_eq!(cpu.tokens(&mut with_rate(0.8), 1), 1, "0.8 beats 0.69, 0.64 does not");
        let mut poor = with_rate(0.5);
        let proposed: Vec<usize> = (0..2 * PROBE_EVERY).map(|_| cpu.tokens(&mut poor, 1)).collect();
        assert_eq!(proposed.iter().filter(|&&k| k == 1).count(), 2, "a probe every {PROBE_EVERY} steps: {proposed:?}");
        assert!(proposed.iter().all(|&k| k <= 1));
    }

    #[test]
    fn on_a_gpu_rows_are_nearly_free_at_small_batches_and_not_at_large_ones() {
        // An 8B model's decode on one GPU, roughly: 6 ms a step, 0.02 ms a row.
        let gpu = costing(4, 6.0, 0.02);
        assert_eq!(gpu.tokens(&mut with_rate(0.3), 1), 4, "one stream: even a poor rate pays");
        // 256 rows: rows are 46% of the step.
        assert_eq!(gpu.tokens(&mut with_rate(0.6), 256), 1);
        assert_eq!(gpu.tokens(&mut with_rate(0.9), 256), 4);
    }

    #[test]
    fn acceptance_follows_recent_drafts() {
        let mut a = Acceptance::default();
        assert!((a.rate() - 0.8).abs() < 1e-9, "the prior");
        for _ in 0..20 {
            a.record(4, 0);
        }
        assert!(a.rate() < 0.05, "{}", a.rate());
        for _ in 0..20 {
            a.record(4, 4);
        }
        assert!(a.rate() > 0.95, "{}", a.rate());
        a.record(4, 2); // two successes, one failure
        assert!(a.rate() < 0.95);
    }
}
