//! Live engine statistics, published by the engine thread after every step.
//!
//! Counters and [`Histogram`]s count since the engine started. Histograms are plain bucket
//! counts with fixed upper bounds (vLLM's buckets), so the engine needs no metrics library;
//! the worker's service turns them into Prometheus series (`lumen_proto::metrics`).

use std::sync::Arc;
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
    /// Each request's whole prompt (cached tokens included), counted once when its first token
    /// is produced, as vLLM counts `prompt_tokens_total`.
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
    /// Per-request latencies and sizes.
    pub histograms: EngineHistograms,
    /// Speculative decoding's counters (vLLM's `spec_decode_*`).
    pub spec_decode: SpecDecodeStats,
}

/// What speculative decoding proposed and what was accepted, as vLLM counts it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecDecodeStats {
    /// Drafts verified (one per sequence and step that carried proposed tokens).
    pub drafts: u64,
    /// Proposed tokens verified.
    pub draft_tokens: u64,
    /// Proposed tokens accepted.
    pub accepted_tokens: u64,
    /// Accepted tokens by their position in the draft (index 0: the first proposed token).
    pub accepted_per_position: Vec<u64>,
}

impl SpecDecodeStats {
    /// Counts one verified draft of `proposed` tokens of which the first `accepted` held.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        self.drafts += 1;
        self.draft_tokens += proposed as u64;
        self.accepted_tokens += accepted as u64;
        if self.accepted_per_position.len() < proposed {
            self.accepted_per_position.resize(proposed, 0);
        }
        for count in &mut self.accepted_per_position[..accepted] {
            *count += 1;
        }
    }
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

/// vLLM's buckets for time to first token, in seconds.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's buckets for inter-token latency, in seconds.
pub const INTER_TOKEN_BUCKETS: [f64; 19] =
    [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for request-level times (end to end, queue), in seconds.
pub const REQUEST_TIME_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
/// Lumen's structured-output mask time: 10 us to 100 ms, finer below 1 ms (the target).
pub const MASK_TIME_BUCKETS: [f64; 14] =
    [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 1e-1];

/// 1, 2, 5, 10, 20, 50, ... up to and including `max` (vLLM's buckets for token counts).
pub fn one_two_five_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 1usize;
    'outer: loop {
        for m in [1, 2, 5] {
            let Some(v) = decade.checked_mul(m) else { break 'outer };
            if v > max {
                break 'outer;
            }
            out.push(v as f64);
        }
        let Some(next) = decade.checked_mul(10) else { break };
        decade = next;
    }
    out
}

/// Observations counted into buckets with fixed upper bounds (Prometheus' histogram, without
/// Prometheus). A value lands in the first bucket whose bound is >= it; above every bound it is
/// only in the total `count`.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: Arc<[f64]>,
    /// `counts[i]`: observations in `(bounds[i-1], bounds[i]]`; one extra slot for above all.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram; `bounds` must be ascending.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram { bounds: bounds.into(), counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, value: f64) {
        let slot = self.bounds.partition_point(|&b| b < value);
        self.counts[slot] += 1;
        self.sum += value;
        self.count += 1;
    }

    pub fn observe_duration(&mut self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Observations <= each bound (as many as bounds).
    pub fn cumulative_counts(&self) -> Vec<u64> {
        self.counts[..self.bounds.len()]
            .iter()
            .scan(0u64, |total, &c| {
                *total += c;
                Some(*total)
            })
            .collect()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new(&[])
    }
}

/// The engine's histograms (vLLM's series; the service names them on the wire).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineHistograms {
    /// Arrival to a request's first token.
    pub time_to_first_token: Histogram,
    /// Every gap between two consecutive tokens of one sequence (per token, not a per-request
    /// mean, as vLLM's `time_per_output_token_seconds` before its per-request variant).
    pub inter_token_latency: Histogram,
    /// Arrival to the request's end (whatever the finish reason).
    pub e2e_latency: Histogram,
    /// Arrival to the request's first schedule (to its end if it never ran).
    pub queue_time: Histogram,
    /// Prompt tokens per finished request.
    pub prompt_tokens: Histogram,
    /// Generated tokens per finished request (all choices).
    pub generation_tokens: Histogram,
    /// Time to compute one structured-output mask (one per constrained token).
    pub structured_output_mask: Histogram,
}

impl EngineHistograms {
    /// Empty histograms; token-count buckets go up to `max_model_len`.
    pub fn new(max_model_len: usize) -> EngineHistograms {
        let tokens = one_two_five_buckets(max_model_len);
        EngineHistograms {
            time_to_first_token: Histogram::new(&TTFT_BUCKETS),
            inter_token_latency: Histogram::new(&INTER_TOKEN_BUCKETS),
            e2e_latency: Histogram::new(&REQUEST_TIME_BUCKETS),
            queue_time: Histogram::new(&REQUEST_TIME_BUCKETS),
            prompt_tokens: Histogram::new(&tokens),
            generation_tokens: Histogram::new(&tokens),
            structured_output_mask: Histogram::new(&MASK_TIME_BUCKETS),
        }
    }
}

impl Default for EngineHistograms {
    fn default() -> EngineHistograms {
        EngineHistograms::new(0)
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

    #[test]
    fn histogram_counts_each_value_in_the_first_bucket_at_or_above_it() {
        let mut h = Histogram::new(&[0.1, 1.0, 10.0]);
        for v in [0.05, 0.1, 0.5, 1.0, 3.0, 100.0] {
            h.observe(v);
        }
        assert_eq!(h.cumulative_counts(), vec![2, 4, 5], "a value equal to a bound is in that bound's bucket");
        assert_eq!(h.count(), 6, "values above every bound count only in the total (+Inf)");
        assert!((h.sum() - 104.65).abs() < 1e-9);
    }

    #[test]
    fn token_buckets_go_one_two_five_up_to_the_limit() {
        assert_eq!(one_two_five_buckets(1024), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(one_two_five_buckets(0), Vec::<f64>::new());
        assert_eq!(one_two_five_buckets(usize::MAX).last(), Some(&1e19), "stops before overflowing");
    }
}
