//! The dashboard's time series: every [`DEFAULT_INTERVAL`] the sampler reads the cluster snapshot
//! (the replicas' latest heartbeat stats) and the request log, and appends one [`Sample`] to a
//! ring of [`DEFAULT_WINDOW`] (oldest dropped).
//!
//! A sample holds [`Metrics`] for the whole cluster, per deployment and per replica:
//! - `running`, `waiting`: as the workers last reported; summed.
//! - `prompt_tokens_per_s`, `generation_tokens_per_s`: the engines' own throughput figures; summed.
//! - `kv_cache_usage`: used / total KV blocks (0 when there are none).
//! - `prefix_cache_hit_rate`: hits / queries of the prefix cache counters over the last
//!   [`HIT_RATE_SAMPLES`] intervals (so each value spans at least one worker heartbeat); `None`
//!   without lookups.
//! - `requests_per_s`: requests the API finished since the previous sample, per second (head-side
//!   counts, so exact; by the deployment and replica the router chose).
//! - `ttft_ms`, `itl_ms`: p50/p90/p99 (nearest rank) over the requests that finished in the last
//!   [`LATENCY_WINDOW`] and are still in the request log; `None` when there are none.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;

use super::request_log::{FinishedCounts, RequestLog, RequestRecord};
use crate::cluster::{Cluster, ClusterSnapshot};

/// Time between samples.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// How far back the history reaches.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// Latency percentiles cover requests that finished this recently.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(30);
/// The prefix cache hit rate spans this many intervals.
pub const HIT_RATE_SAMPLES: usize = 3;

/// p50, p90 and p99 of a set of latencies, in ms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` for no values.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = (p * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Some(Percentiles { p50: at(0.50), p90: at(0.90), p99: at(0.99) })
    }
}

/// The figures of one scope (cluster, deployment or replica) at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub running: u64,
    pub waiting: u64,
    pub requests_per_s: f64,
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    /// 0..1.
    pub kv_cache_usage: f64,
    pub prefix_cache_hit_rate: Option<f64>,
    pub ttft_ms: Option<Percentiles>,
    pub itl_ms: Option<Percentiles>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaMetrics {
    #[serde(flatten)]
    pub metrics: Metrics,
    pub deployment: String,
    pub worker_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub unix_ms: u64,
    pub total: Metrics,
    pub deployments: BTreeMap<String, Metrics>,
    pub replicas: BTreeMap<String, ReplicaMetrics>,
}

/// The ring of samples, oldest first.
pub struct History {
    interval: Duration,
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// A history of samples `interval` apart reaching back `window`.
    pub fn new(interval: Duration, window: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(10));
        let capacity = ((window.as_secs_f64() / interval.as_secs_f64()).ceil() as usize).max(1);
        History { interval, capacity, samples: Mutex::new(VecDeque::with_capacity(capacity.min(4096))) }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The span the history covers when full.
    pub fn window(&self) -> Duration {
        self.interval * self.capacity as u32
    }

    fn samples_mut(&self) -> MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples_mut();
        if samples.len() == self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples taken at or after `since_unix_ms` (all with 0), oldest first.
    pub fn since(&self, since_unix_ms: u64) -> Vec<Sample> {
        self.samples_mut().iter().filter(|s| s.unix_ms >= since_unix_ms).cloned().collect()
    }
}

/// Turns snapshots into samples; remembers what rates need from earlier samples.
#[derive(Default)]
pub struct Sampler {
    /// When the previous sample was taken and the finished counts then.
    previous: Option<(u64, FinishedCounts)>,
    /// Per replica (prefix cache queries, hits), one map per recent sample, oldest first.
    prefix: VecDeque<HashMap<String, (u64, u64)>>,
}

/// Sums of one scope before they become [`Metrics`].
#[derive(Default)]
struct Acc {
    running: u64,
    waiting: u64,
    prompt_tps: f64,
    generation_tps: f64,
    kv_used: u64,
    kv_total: u64,
    queries: u64,
    hits: u64,
    finished: u64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

impl Acc {
    fn add(&mut self, other: &Acc) {
        self.running += other.running;
        self.waiting += other.waiting;
        self.prompt_tps += other.prompt_tps;
        self.generation_tps += other.generation_tps;
        self.kv_used += other.kv_used;
        self.kv_total += other.kv_total;
        self.queries += other.queries;
        self.hits += other.hits;
    }

    fn latencies(&mut self, record: &RequestRecord) {
        self.ttft.extend(record.ttft_ms);
        self.itl.extend(record.itl_ms);
    }

    fn metrics(self, seconds: f64) -> Metrics {
        Metrics {
            running: self.running,
            waiting: self.waiting,
            requests_per_s: if seconds > 0.0 { self.finished as f64 / seconds } else { 0.0 },
            prompt_tokens_per_s: self.prompt_tps,
            generation_tokens_per_s: self.generation_tps,
            kv_cache_usage: if self.kv_total > 0 { self.kv_used as f64 / self.kv_total as f64 } else { 0.0 },
            prefix_cache_hit_rate: (self.queries > 0).then(|| self.hits as f64 / self.queries as f64),
            ttft_ms: Percentiles::of(self.ttft),
            itl_ms: Percentiles::of(self.itl),
        }
    }
}

impl Sampler {
    /// The sample for `now_unix_ms` from `snapshot` and the requests in `log`.
    pub fn sample(&mut self, now_unix_ms: u64, snapshot: &ClusterSnapshot, log: &RequestLog) -> Sample {
        let counts = log.counts();
        let seconds = self.previous.as_ref().map_or(0.0, |(at, _)| now_unix_ms.saturating_sub(*at) as f64 / 1000.0);
        let before = self.previous.as_ref().map(|(_, c)| c);
        let prefix_now: HashMap<String, (u64, u64)> = snapshot
            .replicas
            .iter()
            .filter_map(|r| {
                r.stats.as_ref().map(|s| (r.replica_id.clone(), (s.prefix_cache_queries, s.prefix_cache_hits)))
            })
            .collect();
        let oldest_prefix = self.prefix.front();

        let mut replicas: BTreeMap<String, Acc> = BTreeMap::new();
        for r in &snapshot.replicas {
            let mut acc = Acc::default();
            if let Some(s) = &r.stats {
                acc.running = u64::from(s.running);
                acc.waiting = u64::from(s.waiting);
                acc.prompt_tps = s.prompt_tokens_per_s;
                acc.generation_tps = s.generation_tokens_per_s;
                acc.kv_used = s.kv_blocks_used;
                acc.kv_total = s.kv_blocks_total;
                // Counters that went backwards (a restarted engine) count from zero.
                let (q0, h0) = oldest_prefix.and_then(|m| m.get(&r.replica_id)).copied().unwrap_or((0, 0));
                let (q0, h0) = if s.prefix_cache_queries < q0 || s.prefix_cache_hits < h0 { (0, 0) } else { (q0, h0) };
                acc.queries = s.prefix_cache_queries - q0;
                acc.hits = s.prefix_cache_hits - h0;
            }
            acc.finished =
                delta(counts.by_replica.get(&r.replica_id), before.and_then(|b| b.by_replica.get(&r.replica_id)));
            replicas.insert(r.replica_id.clone(), acc);
        }

        let mut deployments: BTreeMap<String, Acc> = BTreeMap::new();
        let names =
            snapshot.deployments.iter().map(|d| &d.spec.name).chain(snapshot.replicas.iter().map(|r| &r.deployment));
        for name in names {
            deployments.entry(name.clone()).or_insert_with(|| Acc {
                finished: delta(counts.by_deployment.get(name), before.and_then(|b| b.by_deployment.get(name))),
                ..Acc::default()
            });
        }
        let mut total = Acc { finished: delta(Some(&counts.total), before.map(|b| &b.total)), ..Acc::default() };
        for r in &snapshot.replicas {
            if let Some(acc) = replicas.get(&r.replica_id) {
                total.add(acc);
                if let Some(d) = deployments.get_mut(&r.deployment) {
                    d.add(acc);
                }
            }
        }

        let recent = log.since(now_unix_ms.saturating_sub(LATENCY_WINDOW.as_millis() as u64));
        for record in &recent {
            total.latencies(record);
            if let Some(acc) = record.deployment.as_ref().and_then(|d| deployments.get_mut(d)) {
                acc.latencies(record);
            }
            if let Some(acc) = record.replica_id.as_ref().and_then(|r| replicas.get_mut(r)) {
                acc.latencies(record);
            }
        }

        self.previous = Some((now_unix_ms, counts));
        self.prefix.push_back(prefix_now);
        while self.prefix.len() > HIT_RATE_SAMPLES {
            self.prefix.pop_front();
        }
        let placement: HashMap<&str, (&str, &str)> = snapshot
            .replicas
            .iter()
            .map(|r| (r.replica_id.as_str(), (r.deployment.as_str(), r.worker_id.as_str())))
            .collect();
        Sample {
            unix_ms: now_unix_ms,
            total: total.metrics(seconds),
            deployments: deployments.into_iter().map(|(k, acc)| (k, acc.metrics(seconds))).collect(),
            replicas: replicas
                .into_iter()
                .map(|(id, acc)| {
                    let (deployment, worker_id) = placement.get(id.as_str()).copied().unwrap_or_default();
                    let metrics = ReplicaMetrics {
                        metrics: acc.metrics(seconds),
                        deployment: deployment.to_string(),
                        worker_id: worker_id.to_string(),
                    };
                    (id, metrics)
                })
                .collect(),
        }
    }
}

fn delta(now: Option<&u64>, before: Option<&u64>) -> u64 {
    now.copied().unwrap_or(0).saturating_sub(before.copied().unwrap_or(0))
}

/// Samples `cluster` and `log` into `history` every interval until `shutdown` resolves.
pub async fn run_sampler(
    cluster: Cluster,
    log: Arc<RequestLog>,
    history: Arc<History>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut ticker = tokio::time::interval(history.interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sampler = Sampler::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let snapshot = cluster.snapshot();
        history.push(sampler.sample(crate::clock::unix_ms(), &snapshot, &log));
        log.retain_replica_counts(|id| snapshot.replicas.iter().any(|r| r.replica_id == id));
    }
}

#[cfg(test)]
mod tests {
    use lumen_proto::v1 as pb;

    use super::*;
    use crate::cluster::{Deployment, DeploymentSnapshot, DeploymentStatus, ReplicaSnapshot, ReplicaState};
    use crate::observe::request_log::Route;

    fn replica(id: &str, deployment: &str, stats: pb::ReplicaStats) -> ReplicaSnapshot {
        ReplicaSnapshot {
            replica_id: id.into(),
            deployment: deployment.into(),
            worker_id: format!("w-{id}"),
            state: ReplicaState::Running,
            message: None,
            in_flight: 0,
            info: None,
            stats: Some(stats),
            start_time_s: 0.0,
        }
    }

    fn snapshot(replicas: Vec<ReplicaSnapshot>) -> ClusterSnapshot {
        let deployment = DeploymentSnapshot {
            spec: Deployment { name: "llm".into(), ..Deployment::default() },
            status: DeploymentStatus::Healthy,
            message: None,
            created_unix_s: 0,
            running_replicas: 2,
            target_replicas: 2,
        };
        ClusterSnapshot { workers: Vec::new(), deployments: vec![deployment], replicas }
    }

    fn stats(running: u32, used: u64, total: u64, queries: u64, hits: u64) -> pb::ReplicaStats {
        pb::ReplicaStats {
            running,
            waiting: 1,
            kv_blocks_used: used,
            kv_blocks_total: total,
            prefix_cache_queries: queries,
            prefix_cache_hits: hits,
            generation_tokens_per_s: 10.0,
            ..Default::default()
        }
    }

    fn finished(log: &RequestLog, replica: &str, unix_ms: u64, ttft_ms: f64) {
        log.push(RequestRecord {
            id: "x".into(),
            unix_ms,
            route: Route::Chat,
            model: Some("m".into()),
            deployment: Some("llm".into()),
            replica_id: Some(replica.into()),
            stream: true,
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 3,
            ttft_ms: Some(ttft_ms),
            duration_ms: 100.0,
            itl_ms: Some(5.0),
            finish_reason: Some("stop".into()),
            error: None,
            prompt: None,
            migrations: 0,
        });
    }

    #[test]
    fn sums_replicas_into_deployments_and_total_with_kv_usage_as_a_block_ratio() {
        let log = RequestLog::new(100, false);
        let snap =
            snapshot(vec![replica("a", "llm", stats(2, 10, 100, 0, 0)), replica("b", "llm", stats(3, 30, 100, 0, 0))]);
        let sample = Sampler::default().sample(10_000, &snap, &log);
        assert_eq!(sample.total.running, 5);
        assert_eq!(sample.total.waiting, 2);
        assert_eq!(sample.total.generation_tokens_per_s, 20.0);
        assert!((sample.total.kv_cache_usage - 0.2).abs() < 1e-9);
        assert_eq!(sample.deployments["llm"].running, 5);
        assert_eq!(sample.replicas["a"].metrics.running, 2);
        assert_eq!(sample.replicas["a"].deployment, "llm");
        assert_eq!(sample.replicas["b"].worker_id, "w-b");
        assert_eq!(sample.total.prefix_cache_hit_rate, None, "no lookups yet");
        assert_eq!(sample.total.ttft_ms, None);
    }

    #[test]
    fn requests_per_second_and_hit_rate_come_from_counter_deltas() {
        let log = RequestLog::new(100, false);
        let mut sampler = Sampler::default();
        sampler.sample(0, &snapshot(vec![replica("a", "llm", stats(0, 0, 1, 100, 50))]), &log);
        for i in 0..4 {
            finished(&log, "a", 1_000 + i, 10.0 * (i + 1) as f64);
        }
        let sample = sampler.sample(2_000, &snapshot(vec![replica("a", "llm", stats(0, 0, 1, 110, 59))]), &log);
        assert_eq!(sample.total.requests_per_s, 2.0);
        assert_eq!(sample.deployments["llm"].requests_per_s, 2.0);
        assert_eq!(sample.replicas["a"].metrics.requests_per_s, 2.0);
        assert_eq!(sample.total.prefix_cache_hit_rate, Some(0.9), "9 hits of 10 queries since the last sample");
        let ttft = sample.replicas["a"].metrics.ttft_ms.expect("latencies of recent requests");
        assert_eq!((ttft.p50, ttft.p90, ttft.p99), (20.0, 40.0, 40.0));
        assert_eq!(sample.total.itl_ms.map(|p| p.p50), Some(5.0));
    }

    #[test]
    fn old_requests_leave_the_latency_window() {
        let log = RequestLog::new(100, false);
        finished(&log, "a", 1_000, 10.0);
        let now = 1_000 + LATENCY_WINDOW.as_millis() as u64 + 1;
        let sample = Sampler::default().sample(now, &snapshot(Vec::new()), &log);
        assert_eq!(sample.total.ttft_ms, None);
    }

    #[test]
    fn history_keeps_the_window_and_filters_by_time() {
        let history = History::new(Duration::from_secs(2), Duration::from_secs(6));
        let empty = |unix_ms| Sample {
            unix_ms,
            total: Metrics::default(),
            deployments: BTreeMap::new(),
            replicas: BTreeMap::new(),
        };
        for t in 0..5 {
            history.push(empty(t * 2_000));
        }
        let kept: Vec<u64> = history.since(0).iter().map(|s| s.unix_ms).collect();
        assert_eq!(kept, [4_000, 6_000, 8_000]);
        assert_eq!(history.since(6_000).len(), 2);
        assert_eq!(history.window(), Duration::from_secs(6));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(vec![7.0]).map(|p| p.p99), Some(7.0));
        assert_eq!(Percentiles::of(Vec::new()), None);
    }
}
