//! The periodic engine line, one per replica, as vLLM logs it, so `kubectl logs` tells the story:
//!
//! ```text
//! Avg prompt throughput: 212.3 tokens/s, Avg generation throughput: 48.0 tokens/s, Running: 3 reqs,
//! Waiting: 0 reqs, Preempted: 0 reqs, KV cache usage: 4.7%, Prefix cache hit rate: 35.2%
//! ```
//!
//! Contract: every `interval` the logger reads each loaded replica's stats and writes one
//! `info` event (structured fields `replica`, `model`, `prompt_throughput`,
//! `generation_throughput`, `running`, `waiting`, `preempted`, `kv_cache_usage`,
//! `prefix_cache_hit_rate`) for each replica that is busy now or was busy since its previous
//! line; idle replicas stay quiet. Throughputs are averages over the time since the replica's
//! previous reading (prompt tokens as `vllm:prompt_tokens_total` counts them), `Preempted` counts
//! preemptions in that time, and the prefix cache hit rate is over that time's lookups (over all
//! lookups so far when there were none). A replica that verified speculative drafts in that
//! time also logs vLLM's speculative line (fields `mean_acceptance_length`,
//! `accepted_throughput`, `drafted_throughput`, `accepted`, `drafted`, `acceptance_rate`):
//!
//! ```text
//! SpecDecoding metrics: Mean acceptance length: 2.61, Accepted throughput: 95.2 tokens/s,
//! Drafted throughput: 160.0 tokens/s, Accepted: 952 tokens, Drafted: 1600 tokens,
//! Avg Draft acceptance rate: 59.5%
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::node::WorkerNode;

/// A replica's counters at one reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    prompt: u64,
    generation: u64,
    finished: u64,
    preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    drafts: u64,
    drafted: u64,
    accepted: u64,
}

impl Counters {
    fn of(s: &pb::ReplicaStats) -> Counters {
        Counters {
            prompt: s.prompt_tokens_total,
            generation: s.generation_tokens_total,
            finished: s.requests_finished_stop + s.requests_finished_length + s.requests_finished_abort,
            preemptions: s.preemptions_total,
            prefix_queries: s.prefix_cache_queries,
            prefix_hits: s.prefix_cache_hits,
            drafts: s.spec_decode_drafts,
            drafted: s.spec_decode_draft_tokens,
            accepted: s.spec_decode_accepted_tokens,
        }
    }
}

/// The speculative line's numbers (over the time since the replica's previous reading).
#[derive(Clone, Debug, PartialEq)]
pub struct SpecLine {
    /// Tokens a verified draft yielded on average, the token after the draft included (vLLM's).
    pub mean_acceptance_length: f64,
    pub accepted_throughput: f64,
    pub drafted_throughput: f64,
    pub accepted: u64,
    pub drafted: u64,
    /// Percent, 0..=100.
    pub acceptance_rate: f64,
}

/// One engine line's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineLine {
    pub prompt_throughput: f64,
    pub generation_throughput: f64,
    pub running: u32,
    pub waiting: u32,
    pub preempted: u64,
    /// Percent, 0..=100.
    pub kv_cache_usage: f64,
    /// Percent, 0..=100.
    pub prefix_cache_hit_rate: f64,
    /// Speculative decoding in the same time, when drafts were verified.
    pub spec: Option<SpecLine>,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

impl EngineLine {
    /// The line for `now`, `elapsed` after the reading `before` (zeros for a replica not read
    /// before); `None` when the replica was idle throughout.
    fn between(before: Counters, now: &pb::ReplicaStats, elapsed: Duration) -> Option<EngineLine> {
        let after = Counters::of(now);
        if now.running + now.waiting == 0 && after == before {
            return None;
        }
        let seconds = elapsed.as_secs_f64().max(1e-3);
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
        let queries = after.prefix_queries.saturating_sub(before.prefix_queries);
        let prefix_cache_hit_rate = if queries == 0 {
            percent(after.prefix_hits, after.prefix_queries)
        } else {
            percent(after.prefix_hits.saturating_sub(before.prefix_hits), queries)
        };
        Some(EngineLine {
            prompt_throughput: per_s(after.prompt, before.prompt),
            generation_throughput: per_s(after.generation, before.generation),
            running: now.running,
            waiting: now.waiting,
            preempted: after.preemptions.saturating_sub(before.preemptions),
            kv_cache_usage: percent(now.kv_blocks_used, now.kv_blocks_total),
            prefix_cache_hit_rate,
            spec: SpecLine::between(&before, &after, seconds),
        })
    }

    fn log(&self, replica: &str, model: &str) {
        tracing::info!(
            replica,
            model,
            prompt_throughput = self.prompt_throughput,
            generation_throughput = self.generation_throughput,
            running = self.running,
            waiting = self.waiting,
            preempted = self.preempted,
            kv_cache_usage = self.kv_cache_usage,
            prefix_cache_hit_rate = self.prefix_cache_hit_rate,
            "Avg prompt throughput: {:.1} tokens/s, Avg generation throughput: {:.1} tokens/s, Running: {} reqs, \
             Waiting: {} reqs, Preempted: {} reqs, KV cache usage: {:.1}%, Prefix cache hit rate: {:.1}%",
            self.prompt_throughput,
            self.generation_throughput,
            self.running,
            self.waiting,
            self.preempted,
            self.kv_cache_usage,
            self.prefix_cache_hit_rate,
        );
        if let Some(spec) = &self.spec {
            spec.log(replica, model);
        }
    }
}

impl SpecLine {
    fn between(before: &Counters, after: &Counters, seconds: f64) -> Option<SpecLine> {
        let drafts = after.drafts.saturating_sub(before.drafts);
        if drafts == 0 {
            return None;
        }
        let accepted = after.accepted.saturating_sub(before.accepted);
        let drafted = after.drafted.saturating_sub(before.drafted);
        Some(SpecLine {
            mean_acceptance_length: 1.0 + accepted as f64 / drafts as f64,
            accepted_throughput: accepted as f64 / seconds,
            drafted_throughput: drafted as f64 / seconds,
            accepted,
            drafted,
            acceptance_rate: percent(accepted, drafted),
        })
    }

    fn log(&self, replica: &str, model: &str) {
        tracing::info!(
            replica,
            model,
            mean_acceptance_length = self.mean_acceptance_length,
            accepted_throughput = self.accepted_throughput,
            drafted_throughput = self.drafted_throughput,
            accepted = self.accepted,
            drafted = self.drafted,
            acceptance_rate = self.acceptance_rate,
            "SpecDecoding metrics: Mean acceptance length: {:.2}, Accepted throughput: {:.1} tokens/s, \
             Drafted throughput: {:.1} tokens/s, Accepted: {} tokens, Drafted: {} tokens, Avg Draft acceptance rate: {:.1}%",
            self.mean_acceptance_length,
            self.accepted_throughput,
            self.drafted_throughput,
            self.accepted,
            self.drafted,
            self.acceptance_rate,
        );
    }
}

/// Each replica's previous reading, and the lines due now.
#[derive(Default)]
struct StatsLogger {
    previous: HashMap<String, (Instant, Counters)>,
}

impl StatsLogger {
    /// Takes a reading of every replica at `at`; returns the lines due, by replica.
    fn read(&mut self, replicas: &[pb::ReplicaStats], at: Instant, interval: Duration) -> Vec<(String, EngineLine)> {
        let mut lines = Vec::new();
        let mut seen = HashMap::with_capacity(replicas.len());
        for s in replicas.iter().filter(|s| !s.model_name.is_empty()) {
            let first = (at.checked_sub(interval).unwrap_or(at), Counters::default());
            let (since, before) = self.previous.get(&s.replica_id).copied().unwrap_or(first);
            if let Some(line) = EngineLine::between(before, s, at.saturating_duration_since(since)) {
                lines.push((s.replica_id.clone(), line));
            }
            seen.insert(s.replica_id.clone(), (at, Counters::of(s)));
        }
        self.previous = seen;
        lines
    }
}

/// Logs every replica's engine line each `interval` until `shutdown`; `None` when `interval` is
/// zero (logging off).
pub fn spawn_stats_logger(node: WorkerNode, interval: Duration, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut logger = StatsLogger::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let replicas = node.stats().await;
            let models: HashMap<&str, &str> =
                replicas.iter().map(|s| (s.replica_id.as_str(), s.model_name.as_str())).collect();
            for (replica, line) in logger.read(&replicas, Instant::now(), interval) {
                line.log(&replica, models.get(replica.as_str()).copied().unwrap_or_default());
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(running: u32, generation: u64) -> pb::ReplicaStats {
        pb::ReplicaStats {
            replica_id: "llm-1".into(),
            model_name: "smol".into(),
            running,
            generation_tokens_total: generation,
            prompt_tokens_total: generation * 2,
            kv_blocks_total: 10,
            kv_blocks_used: u64::from(running),
            prefix_cache_queries: generation * 4,
            prefix_cache_hits: generation,
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_logs_while_busy_and_once_after_then_stays_quiet() {
        let mut logger = StatsLogger::default();
        let second = Duration::from_secs(1);
        let t0 = Instant::now();
        assert!(logger.read(&[stats(0, 0)], t0, second).is_empty(), "idle from the start: quiet");
        let busy = logger.read(&[stats(2, 40)], t0 + 2 * second, second);
        assert_eq!(busy.len(), 1);
        let line = &busy[0].1;
        assert_eq!((line.running, line.generation_throughput, line.prompt_throughput), (2, 20.0, 40.0));
        assert_eq!((line.kv_cache_usage, line.prefix_cache_hit_rate), (20.0, 25.0));
        let tail = logger.read(&[stats(0, 50)], t0 + 3 * second, second);
        assert_eq!(tail.len(), 1, "the tick after the last request still reports it");
        assert_eq!(tail[0].1.generation_throughput, 10.0);
        assert!(logger.read(&[stats(0, 50)], t0 + 4 * second, second).is_empty(), "idle again: quiet");
        assert_eq!(busy[0].1.spec, None, "no drafts, no speculative line");
    }

    #[test]
    fn drafts_verified_since_the_last_reading_make_the_speculative_line() {
        let mut logger = StatsLogger::default();
        let second = Duration::from_secs(1);
        let t0 = Instant::now();
        let with_drafts = |generation, drafts, drafted, accepted| pb::ReplicaStats {
            spec_decode_drafts: drafts,
            spec_decode_draft_tokens: drafted,
            spec_decode_accepted_tokens: accepted,
            ..stats(1, generation)
        };
        logger.read(&[with_drafts(40, 10, 40, 20)], t0, second);
        let lines = logger.read(&[with_drafts(80, 15, 60, 35)], t0 + 2 * second, second);
        let spec = lines[0].1.spec.clone().expect("5 drafts in the interval");
        // 5 drafts of 20 tokens in 2 s, 15 accepted: 4 tokens a draft with the one after it.
        assert_eq!(
            spec,
            SpecLine {
                mean_acceptance_length: 4.0,
                accepted_throughput: 7.5,
                drafted_throughput: 10.0,
                accepted: 15,
                drafted: 20,
                acceptance_rate: 75.0
            }
        );
        let quiet = logger.read(&[with_drafts(90, 15, 60, 35)], t0 + 3 * second, second);
        assert_eq!(quiet[0].1.spec, None, "busy without new drafts: the engine line alone");
    }

    #[test]
    fn loading_replicas_are_not_logged() {
        let loading = pb::ReplicaStats { replica_id: "llm-2".into(), running: 1, ..Default::default() };
        assert!(StatsLogger::default().read(&[loading], Instant::now(), Duration::from_secs(1)).is_empty());
    }
}
