//! Live engine statistics, published by the engine thread after every step.

use std::time::{Duration, Instant};

/// A snapshot of the engine's load and counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Prompt tokens looked up in / found in the prefix cache.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub preemptions_total: u64,
    pub requests_finished_stop: u64,
    pub requests_finished_length: u64,
    pub requests_finished_abort: u64,
    pub steps_total: u64,
    /// Recent throughput (tokens per second over the last few seconds).
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    /// Time since the engine last finished a step while it had work, as of `taken_at`.
    pub stalled_for: Duration,
    /// When the engine thread published this snapshot (after every step, and when it wakes up
    /// with new work); `None` before the thread ran.
    pub taken_at: Option<Instant>,
}

impl EngineStats {
    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 { 0.0 } else { self.kv_blocks_used as f64 / self.kv_blocks_total as f64 }
    }

    /// How long the engine has been busy without finishing a step, as of `now`. A snapshot the
    /// engine thread stopped replacing (it is stuck inside a step) keeps ageing, so a hung engine
    /// shows a growing stall even though nobody recomputes its stats; an idle engine never stalls.
    pub fn stalled_at(&self, now: Instant) -> Duration {
        if self.running + self.waiting == 0 {
            return Duration::ZERO;
        }
        let age = self.taken_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.stalled_for + age
    }

    /// Prefix cache hit rate over all lookups so far.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_cache_queries == 0 {
            0.0
        } else {
            self.prefix_cache_hits as f64 / self.prefix_cache_queries as f64
        }
    }
}

/// Token throughput over a sliding window of a few seconds.
#[derive(Debug)]
pub struct RateMeter {
    window: Duration,
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter { window, samples: Default::default() }
    }

    /// Records `tokens` done at `now`.
    pub fn add(&mut self, now: Instant, tokens: u64) {
        self.samples.push_back((now, tokens));
        while let Some(&(t, _)) = self.samples.front() {
            if now.duration_since(t) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Tokens per second over the window ending at `now`.
    pub fn rate(&self, now: Instant) -> f64 {
        let recent: u64 =
            self.samples.iter().filter(|(t, _)| now.duration_since(*t) <= self.window).map(|(_, n)| n).sum();
        recent as f64 / self.window.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_snapshot_keeps_ageing_and_an_idle_one_never_stalls() {
        let taken = Instant::now();
        let later = taken + Duration::from_secs(5);
        let busy = EngineStats {
            running: 1,
            stalled_for: Duration::from_secs(1),
            taken_at: Some(taken),
            ..EngineStats::default()
        };
        assert_eq!(busy.stalled_at(later), Duration::from_secs(6));
        let idle = EngineStats { taken_at: Some(taken), ..EngineStats::default() };
        assert_eq!(idle.stalled_at(later), Duration::ZERO);
        let waiting = EngineStats { waiting: 2, taken_at: Some(taken), ..EngineStats::default() };
        assert_eq!(waiting.stalled_at(later), Duration::from_secs(5));
    }
}
