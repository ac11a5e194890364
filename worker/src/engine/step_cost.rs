//! Step costs, measured: how long a step of `n` tokens takes on this replica, and from that how
//! many prompt tokens a step that carries decodes may take so it stays near a time goal.
//!
//! Under load a step mixes every running sequence's next token with prompt chunks; with a fixed
//! token budget (`max_num_batched_tokens`), a step that takes a full budget of prompt tokens
//! holds every decoding stream for its whole length, which is what sets the tail of the
//! inter-token latency. The model here is a line, `ms = a + b * tokens`, fitted by least squares
//! over recent steps with exponential forgetting (each step's weight decays by [`DECAY`] per
//! later step), so it follows the device and the context lengths as they change.
//!
//! Invariants:
//! - No limit until the fit is trustworthy: at least [`MIN_STEPS`] steps observed and enough
//!   spread in their sizes; until then (and with the goal off) prompt chunks fill the budget.
//! - The limit never falls below [`MIN_PROMPT_TOKENS`], so prompts always progress, however
//!   slow a decode step alone is; and it only applies to steps that carry decodes.
//! - Burst-aware (an experiment, off by default): with a `min_pressure` above 0 the limit binds
//!   only while prompt work is steady, i.e. while the share of recent steps that mixed prompt
//!   tokens with decodes (an exponential average over ~[`PRESSURE_WINDOW`] steps) is at least
//!   `min_pressure`. A burst of arrivals (a closed-loop benchmark's wave) then lands in a few
//!   full steps few tokens wait on, while steady arrivals are still spread. Unlimited, a burst
//!   keeps the share low, so the rule does not feed itself.

/// How fast old steps are forgotten (per step observed).
const DECAY: f64 = 0.98;
/// Steps seen before the fit is used.
const MIN_STEPS: u64 = 16;
/// The least spread of step sizes (weighted standard deviation, tokens) the fit needs.
const MIN_SPREAD_TOKENS: f64 = 32.0;
/// The fewest prompt tokens a step with decodes may take.
pub const MIN_PROMPT_TOKENS: usize = 256;
/// Steps the prompt-pressure average spans (its weight per step is `1 / PRESSURE_WINDOW`).
const PRESSURE_WINDOW: f64 = 64.0;

/// A line `y = a + b * x` fitted by least squares over observations with exponential
/// forgetting (each observation's weight decays by [`DECAY`] per later one).
#[derive(Clone, Debug, Default)]
pub struct LineFit {
    count: u64,
    // Exponentially weighted sums: weight, x, y, x^2, x*y.
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl LineFit {
    /// Adds the observation `(x, y)`.
    pub fn observe(&mut self, x: f64, y: f64) {
        self.w = self.w * DECAY + 1.0;
        self.sx = self.sx * DECAY + x;
        self.sy = self.sy * DECAY + y;
        self.sxx = self.sxx * DECAY + x * x;
        self.sxy = self.sxy * DECAY + x * y;
        self.count += 1;
    }

    /// The fitted `(a, b)` with `a >= 0` and `b > 0`; `None` before `min_count` observations,
    /// or while their x spread less than `min_spread` (weighted standard deviation).
    pub fn fit(&self, min_count: u64, min_spread: f64) -> Option<(f64, f64)> {
        if self.count < min_count || self.w <= 0.0 {
            return None;
        }
        let mean_x = self.sx / self.w;
        let var_x = self.sxx / self.w - mean_x * mean_x;
        if var_x < min_spread * min_spread {
            return None;
        }
        let b = (self.sxy / self.w - mean_x * self.sy / self.w) / var_x;
        if !b.is_finite() || b <= 0.0 {
            return None;
        }
        let a = (self.sy / self.w - b * mean_x).max(0.0);
        Some((a, b))
    }
}

/// The fitted step cost and the goal it serves.
#[derive(Clone, Debug)]
pub struct StepCostModel {
    /// Goal for a step that carries decodes, ms; `None`: no goal (chunks fill the budget).
    goal_ms: Option<f64>,
    /// The least prompt pressure at which the limit binds (0: always).
    min_pressure: f64,
    /// Share of recent steps that mixed prompt tokens with decodes (exponential average).
    pressure: f64,
    /// Step ms against step tokens.
    line: LineFit,
}

impl StepCostModel {
    /// A model serving `goal_ms`; the limit binds only at a prompt pressure of `min_pressure`
    /// or more (0: always; see the module docs).
    pub fn new(goal_ms: Option<f64>, min_pressure: f64) -> StepCostModel {
        let goal_ms = goal_ms.filter(|g| g.is_finite() && *g > 0.0);
        let min_pressure = if min_pressure.is_finite() { min_pressure.clamp(0.0, 1.0) } else { 0.0 };
        StepCostModel { goal_ms, min_pressure, pressure: 0.0, line: LineFit::default() }
    }

    /// Records a step of `tokens` tokens that took `ms` milliseconds (wall time of the step);
    /// `mixed`: it carried prompt tokens beside decodes.
    pub fn observe(&mut self, tokens: usize, mixed: bool, ms: f64) {
        if self.goal_ms.is_none() || !ms.is_finite() || ms < 0.0 {
            return;
        }
        self.pressure += (f64::from(u8::from(mixed)) - self.pressure) / PRESSURE_WINDOW;
        self.line.observe(tokens as f64, ms);
    }

    /// The fitted `(a, b)`: fixed ms per step and ms per token; `None` until trustworthy.
    pub fn fit(&self) -> Option<(f64, f64)> {
        self.line.fit(MIN_STEPS, MIN_SPREAD_TOKENS)
    }

    /// The most prompt tokens a step carrying `decodes` decode tokens should take, or `None`
    /// for no limit beyond the token budget.
    pub fn prompt_limit(&self, decodes: usize) -> Option<usize> {
        let goal = self.goal_ms?;
        if decodes == 0 || self.pressure < self.min_pressure {
            return None;
        }
        let (a, b) = self.fit()?;
        let left = goal - a - b * decodes as f64;
        let tokens = if left > 0.0 { (left / b) as usize } else { 0 };
        Some(tokens.max(MIN_PROMPT_TOKENS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(goal: Option<f64>, steps: &[(usize, f64)]) -> StepCostModel {
        let mut m = StepCostModel::new(goal, 0.0);
        for &(tokens, ms) in steps {
            m.observe(tokens, true, ms);
        }
        m
    }

    #[test]
    fn the_fit_recovers_a_linear_cost_and_sizes_prompt_chunks_to_the_goal() {
        // 10 ms a step plus 0.025 ms a token (an 8B model's shape on an H100, roughly).
        let steps: Vec<(usize, f64)> =
            (0..64).map(|i| [256usize, 1024, 4096, 8448][i % 4]).map(|t| (t, 10.0 + 0.025 * t as f64)).collect();
        let m = fed(Some(50.0), &steps);
        let (a, b) = m.fit().expect("enough varied steps");
        assert!((a - 10.0).abs() < 1e-6 && (b - 0.025).abs() < 1e-9, "a {a}, b {b}");
        // 256 decodes cost 16.4 ms; the other 33.6 ms buy 1344 prompt tokens.
        let limit = m.prompt_limit(256).unwrap();
        assert!((1342..=1345).contains(&limit), "{limit}");
        assert_eq!(m.prompt_limit(0), None, "a step without decodes is not limited");
        // A goal below what the decodes alone cost still lets prompts progress.
        let tight = fed(Some(5.0), &steps);
        assert_eq!(tight.prompt_limit(256), Some(MIN_PROMPT_TOKENS));
    }

    #[test]
    fn no_limit_without_a_goal_or_before_the_fit_is_trustworthy() {
        let varied: Vec<(usize, f64)> = (0..64).map(|i| if i % 2 == 0 { (256, 16.0) } else { (4096, 110.0) }).collect();
        assert_eq!(fed(None, &varied).prompt_limit(256), None, "goal off");
        assert_eq!(fed(Some(50.0), &varied[..8]).prompt_limit(256), None, "too few steps");
        let same: Vec<(usize, f64)> = (0..64).map(|_| (256, 16.0)).collect();
        assert_eq!(fed(Some(50.0), &same).prompt_limit(256), None, "no spread in step sizes");
        assert!(fed(Some(50.0), &varied).prompt_limit(256).is_some());
    }

    #[test]
    fn old_steps_are_forgotten_as_the_device_changes() {
        let mut steps: Vec<(usize, f64)> =
            (0..200).map(|i| if i % 2 == 0 { (256usize, 0.0) } else { (4096, 0.0) }).collect();
        for (i, s) in steps.iter_mut().enumerate() {
            // Twice as slow per token for the last 150 steps.
            let b = if i < 50 { 0.02 } else { 0.04 };
            s.1 = 8.0 + b * s.0 as f64;
        }
        let (_, b) = fed(Some(50.0), &steps).fit().unwrap();
        assert!((b - 0.04).abs() < 0.001, "b {b} follows the recent steps");
    }

    #[test]
    fn a_burst_of_prompts_is_not_limited_when_the_limit_waits_for_steady_pressure() {
        let cost = |t: usize| 10.0 + 0.025 * t as f64;
        let mut m = StepCostModel::new(Some(50.0), 0.5);
        // A wave: two full prompt steps among 62 decode-only ones, again and again.
        for i in 0..640 {
            let mixed = i % 64 < 2;
            let tokens = if mixed { 8192 } else { [256, 300, 1024][i % 3] };
            m.observe(tokens, mixed, cost(tokens));
        }
        assert!(m.fit().is_some());
        assert_eq!(m.prompt_limit(256), None, "a burst goes through whole (pressure {:.2})", m.pressure);
        // Steady arrivals: prompt tokens in most steps.
        for i in 0..128 {
            let mixed = i % 4 != 0;
            let tokens = if mixed { 1600 } else { 256 };
            m.observe(tokens, mixed, cost(tokens));
        }
        assert!(m.prompt_limit(256).is_some(), "steady prompt work is spread (pressure {:.2})", m.pressure);
        // With no threshold the limit binds at any pressure, as before.
        let mut always = StepCostModel::new(Some(50.0), 0.0);
        for i in 0..64 {
            let tokens = [256, 4096][i % 2];
            always.observe(tokens, false, cost(tokens));
        }
        assert!(always.prompt_limit(256).is_some());
    }
}
