//! Where the engine thread's time goes, step by step, logged every 512 steps: the gap before a
//! step (intake of new commands and publishing stats, counted only while the engine stays busy),
//! speculative proposals (a draft model's forwards), scheduling (with a draft model's prefill of
//! the step's prompt chunks) (the schedule, the packed batch and the row plans), the model's forward call
//! (queueing the step on the device, the device's work and reading its rows back) and the
//! bookkeeping after it (sampling, detokenizing, stop checks, output events). Whatever is
//! outside `forward` is time the device waits for the host unless it overlaps a step.

use std::time::Instant;

const EVERY: u32 = 512;

/// Phase times summed until logged.
#[derive(Debug, Default)]
pub struct StepPhases {
    steps: u32,
    rows: u64,
    gap_ms: f64,
    draft_ms: f64,
    schedule_ms: f64,
    forward_ms: f64,
    post_ms: f64,
    /// When the previous step ended, while the engine has stayed busy since.
    last_end: Option<Instant>,
}

/// The instants of one step.
pub struct StepMarks {
    pub start: Instant,
    /// When the step's drafts were proposed.
    pub drafted: Instant,
    pub forward_start: Instant,
    pub forward_end: Instant,
    pub end: Instant,
}

impl StepPhases {
    /// Forgets the previous step's end (the engine was idle since).
    pub fn idle(&mut self) {
        self.last_end = None;
    }

    /// Adds one step of `rows` token rows.
    pub fn record(&mut self, marks: &StepMarks, rows: usize) {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        if let Some(last) = self.last_end.replace(marks.end) {
            self.gap_ms += ms(last, marks.start);
        }
        self.steps += 1;
        self.rows += rows as u64;
        self.draft_ms += ms(marks.start, marks.drafted);
        self.schedule_ms += ms(marks.drafted, marks.forward_start);
        self.forward_ms += ms(marks.forward_start, marks.forward_end);
        self.post_ms += ms(marks.forward_end, marks.end);
        if self.steps == EVERY {
            let n = f64::from(self.steps);
            let total = self.gap_ms + self.draft_ms + self.schedule_ms + self.forward_ms + self.post_ms;
            tracing::info!(
                steps = self.steps,
                rows = self.rows as f64 / n,
                gap_ms = self.gap_ms / n,
                draft_ms = self.draft_ms / n,
                schedule_ms = self.schedule_ms / n,
                forward_ms = self.forward_ms / n,
                post_ms = self.post_ms / n,
                forward_share = if total > 0.0 { self.forward_ms / total } else { 0.0 },
                "engine step phases (mean per step)"
            );
            *self = StepPhases { last_end: self.last_end, ..StepPhases::default() };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn phases_sum_the_intervals_and_count_gaps_only_while_busy() {
        let mut phases = StepPhases::default();
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        phases.record(
            &StepMarks { start: ms(0), drafted: ms(0), forward_start: ms(1), forward_end: ms(11), end: ms(13) },
            4,
        );
        phases.record(
            &StepMarks { start: ms(14), drafted: ms(15), forward_start: ms(16), forward_end: ms(26), end: ms(27) },
            4,
        );
        assert_eq!(phases.steps, 2);
        assert!((phases.gap_ms - 1.0).abs() < 1e-9, "one gap, 13 -> 14 ms");
        assert!((phases.draft_ms - 1.0).abs() < 1e-9);
        assert!((phases.schedule_ms - 2.0).abs() < 1e-9);
        assert!((phases.forward_ms - 20.0).abs() < 1e-9);
        assert!((phases.post_ms - 3.0).abs() < 1e-9);
        phases.idle();
        phases.record(
            &StepMarks { start: ms(500), drafted: ms(500), forward_start: ms(501), forward_end: ms(502), end: ms(503) },
            1,
        );
        assert!((phases.gap_ms - 1.0).abs() < 1e-9, "an idle wait is not a gap");
    }
}
