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
    /// Time since the engine last finished a step while it had work (stuck-engine detection).
    pub stalled_for: Duration,
}

impl EngineStats {
    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 { 0.0 } else { self.kv_blocks_used as f64 / self.kv_blocks_total as f64 }
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
