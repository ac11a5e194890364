//! `lumen bench head`'s report: per cluster size, the idle cost and every load step, then a
//! summary row per size; printed as tables and written as JSON.

use anyhow::Context;
use serde::Serialize;

use super::load::StepResult;
use super::{HeadBenchArgs, Measured};

/// The head's loop counters from its `/metrics` (sums in seconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoopCounters {
    pub reconcile_count: f64,
    pub reconcile_sum_s: f64,
    pub heartbeat_count: f64,
    pub heartbeat_sum_s: f64,
}

impl LoopCounters {
    /// Reads them from the head's `/metrics` at `api`.
    pub async fn scrape(client: &reqwest::Client, api: &str) -> anyhow::Result<LoopCounters> {
        let text = client
            .get(format!("{api}/metrics"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("scraping the head's /metrics")?
            .text()
            .await?;
        Ok(LoopCounters::parse(&text))
    }

    fn parse(text: &str) -> LoopCounters {
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        LoopCounters {
            reconcile_count: value("lumen_head_reconcile_duration_seconds_count"),
            reconcile_sum_s: value("lumen_head_reconcile_duration_seconds_sum"),
            heartbeat_count: value("lumen_head_heartbeat_duration_seconds_count"),
            heartbeat_sum_s: value("lumen_head_heartbeat_duration_seconds_sum"),
        }
    }

    /// The growth since `earlier`.
    pub fn since(&self, earlier: &LoopCounters) -> LoopCounters {
        LoopCounters {
            reconcile_count: self.reconcile_count - earlier.reconcile_count,
            reconcile_sum_s: self.reconcile_sum_s - earlier.reconcile_sum_s,
            heartbeat_count: self.heartbeat_count - earlier.heartbeat_count,
            heartbeat_sum_s: self.heartbeat_sum_s - earlier.heartbeat_sum_s,
        }
    }

    fn mean_us(count: f64, sum_s: f64) -> f64 {
        if count > 0.0 { sum_s / count * 1e6 } else { 0.0 }
    }

    pub fn reconcile_mean_us(&self) -> f64 {
        Self::mean_us(self.reconcile_count, self.reconcile_sum_s)
    }

    pub fn heartbeat_mean_us(&self) -> f64 {
        Self::mean_us(self.heartbeat_count, self.heartbeat_sum_s)
    }
}

/// The cluster without load: what heartbeats and the control loop cost.
#[derive(Clone, Debug, Serialize)]
pub struct IdleReport {
    pub seconds: f64,
    /// The head's CPU, in percent of one core.
    pub head_core_pct: f64,
    pub heartbeats_per_s: f64,
    pub heartbeat_mean_us: f64,
    pub reconcile_passes_per_s: f64,
    pub reconcile_mean_us: f64,
    pub head_rss_mib: f64,
}

impl IdleReport {
    pub fn new(m: &Measured) -> IdleReport {
        IdleReport {
            seconds: m.seconds,
            head_core_pct: m.head_cores * 100.0,
            heartbeats_per_s: m.loops.heartbeat_count / m.seconds,
            heartbeat_mean_us: m.loops.heartbeat_mean_us(),
            reconcile_passes_per_s: m.loops.reconcile_count / m.seconds,
            reconcile_mean_us: m.loops.reconcile_mean_us(),
            head_rss_mib: m.head_rss_mib,
        }
    }
}

/// Quantiles of a latency in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(mut values: Vec<f64>) -> Quantiles {
        if values.is_empty() {
            return Quantiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Quantiles { p50: at(0.5), p99: at(0.99), p999: at(0.999), max: values[values.len() - 1] }
    }
}

/// One load step.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub mode: String,
    pub offered_rps: f64,
    /// Requests sent per second of the step (the Poisson draw of `offered_rps`).
    pub sent_rps: f64,
    pub sent: usize,
    pub completed: usize,
    pub failed: usize,
    pub first_failure: Option<String>,
    pub achieved_rps: f64,
    pub tokens_per_s: f64,
    /// Head-added latency (per chunk streamed, per response plain).
    pub added_ms: Quantiles,
    pub ttft_ms: Quantiles,
    pub e2e_ms: Quantiles,
    pub head_cores: f64,
    pub sim_cores: f64,
    pub client_cores: f64,
    pub head_rss_mib: f64,
    pub heartbeat_mean_us: f64,
    pub reconcile_mean_us: f64,
}

impl StepReport {
    pub fn new(mode: &str, offered: f64, r: StepResult, m: &Measured) -> StepReport {
        let seconds = r.elapsed.as_secs_f64().max(1e-9);
        StepReport {
            mode: mode.to_string(),
            offered_rps: offered,
            sent_rps: r.sent as f64 / r.duration.as_secs_f64().max(1e-9),
            sent: r.sent,
            completed: r.completed,
            failed: r.failed,
            first_failure: r.first_failure,
            achieved_rps: r.completed as f64 / seconds,
            tokens_per_s: r.tokens as f64 / seconds,
            added_ms: Quantiles::of(r.added_us.iter().map(|&us| us as f64 / 1e3).collect()),
            ttft_ms: Quantiles::of(r.ttft_ms),
            e2e_ms: Quantiles::of(r.e2e_ms),
            head_cores: m.head_cores,
            sim_cores: m.sim_cores,
            client_cores: m.client_cores,
            head_rss_mib: m.head_rss_mib,
            heartbeat_mean_us: m.loops.heartbeat_mean_us(),
            reconcile_mean_us: m.loops.reconcile_mean_us(),
        }
    }

    /// No failure, and completions (per second of the step and its tail) at least 95% of what
    /// was sent per second: comparing with what was sent, not the nominal rate, leaves the
    /// Poisson draw's noise out.
    pub fn kept_up(&self) -> bool {
        self.failed == 0 && self.achieved_rps >= super::KEEP_UP * self.sent_rps
    }

    /// The step as one progress line.
    pub fn line(&self) -> String {
        format!(
            "{:<6} offered {:>6.0}/s  done {:>7.0}/s  tokens {:>8.0}/s  added p50 {:.2} p99 {:.2} ms  head {:.2} cores  failed {}",
            self.mode,
            self.offered_rps,
            self.achieved_rps,
            self.tokens_per_s,
            self.added_ms.p50,
            self.added_ms.p99,
            self.head_cores,
            self.failed
        )
    }
}

/// One cluster size.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    pub workers: usize,
    pub replicas: usize,
    /// From starting the workers to every replica running.
    pub ready_s: f64,
    pub head_rss_mib: f64,
    pub idle: IdleReport,
    pub steps: Vec<StepReport>,
}

/// Per cluster size, the highest streamed rate that kept up within the p99 goal.
#[derive(Clone, Debug, Serialize)]
pub struct SummaryRow {
    pub workers: usize,
    pub sustained_stream_rps: f64,
    pub tokens_per_s: f64,
    pub added_p99_ms: f64,
    pub head_cores: f64,
    pub head_rss_mib: f64,
    pub heartbeat_core_pct: f64,
    pub ready_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeadReport {
    pub max_tokens: usize,
    pub prompt_len: usize,
    pub step_ms: f64,
    pub heartbeat_interval_ms: u64,
    pub p99_goal_ms: f64,
    pub summary: Vec<SummaryRow>,
    pub clusters: Vec<ClusterReport>,
}

impl HeadReport {
    pub fn new(args: &HeadBenchArgs, clusters: Vec<ClusterReport>) -> HeadReport {
        let summary = clusters
            .iter()
            .map(|c| {
                let best = c
                    .steps
                    .iter()
                    .filter(|s| s.mode == "stream" && s.kept_up())
                    .filter(|s| s.added_ms.p99 < args.p99_goal_ms)
                    .max_by(|a, b| a.achieved_rps.total_cmp(&b.achieved_rps));
                SummaryRow {
                    workers: c.workers,
                    sustained_stream_rps: best.map_or(0.0, |s| s.achieved_rps),
                    tokens_per_s: best.map_or(0.0, |s| s.tokens_per_s),
                    added_p99_ms: best.map_or(0.0, |s| s.added_ms.p99),
                    head_cores: best.map_or(0.0, |s| s.head_cores),
                    head_rss_mib: c.head_rss_mib,
                    heartbeat_core_pct: c.idle.head_core_pct,
                    ready_s: c.ready_s,
                }
            })
            .collect();
        HeadReport {
            max_tokens: args.max_tokens,
            prompt_len: args.prompt_len,
            step_ms: args.step_ms,
            heartbeat_interval_ms: args.heartbeat_interval_ms,
            p99_goal_ms: args.p99_goal_ms,
            summary,
            clusters,
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        for c in &self.clusters {
            out += &format!(
                "\n== {} workers, {} replicas: ready in {:.1} s; idle head {:.2}% of a core ({:.0} heartbeats/s, {:.1} us each; {:.1} passes/s, {:.1} us each), RSS {:.0} MiB\n",
                c.workers,
                c.replicas,
                c.ready_s,
                c.idle.head_core_pct,
                c.idle.heartbeats_per_s,
                c.idle.heartbeat_mean_us,
                c.idle.reconcile_passes_per_s,
                c.idle.reconcile_mean_us,
                c.idle.head_rss_mib
            );
            out += "mode    offered/s   done/s   tokens/s  added p50  p99    p99.9  max(ms)  ttft p50  cores: head  workers  client  RSS MiB  failed\n";
            for s in &c.steps {
                out += &format!(
                    "{:<6} {:>9.0} {:>8.0} {:>10.0} {:>9.2} {:>6.2} {:>7.2} {:>7.1} {:>9.2} {:>11.2} {:>8.2} {:>7.2} {:>8.0} {:>7}\n",
                    s.mode,
                    s.offered_rps,
                    s.achieved_rps,
                    s.tokens_per_s,
                    s.added_ms.p50,
                    s.added_ms.p99,
                    s.added_ms.p999,
                    s.added_ms.max,
                    s.ttft_ms.p50,
                    s.head_cores,
                    s.sim_cores,
                    s.client_cores,
                    s.head_rss_mib,
                    s.failed
                );
            }
        }
        out += &format!(
            "\nSummary ({} tokens per request, {} ms steps, heartbeats every {} ms; sustained = highest streamed rate kept up with p99 added < {} ms)\n",
            self.max_tokens, self.step_ms, self.heartbeat_interval_ms, self.p99_goal_ms
        );
        out +=
            "workers  sustained req/s  tokens/s  added p99 ms  head cores  head RSS MiB  idle head % core  ready s\n";
        for r in &self.summary {
            out += &format!(
                "{:>7} {:>16.0} {:>9.0} {:>13.2} {:>11.2} {:>12.0} {:>17.2} {:>8.1}\n",
                r.workers,
                r.sustained_stream_rps,
                r.tokens_per_s,
                r.added_p99_ms,
                r.head_cores,
                r.head_rss_mib,
                r.heartbeat_core_pct,
                r.ready_s
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_counters_are_read_from_the_exposition_text() {
        let text = "# HELP lumen_head_reconcile_duration_seconds x\nlumen_head_reconcile_duration_seconds_bucket{le=\"1\"} 4\n\
                    lumen_head_reconcile_duration_seconds_sum 0.002\nlumen_head_reconcile_duration_seconds_count 4\n\
                    lumen_head_heartbeat_duration_seconds_sum 0.0003\nlumen_head_heartbeat_duration_seconds_count 30\n";
        let now = LoopCounters::parse(text);
        assert_eq!((now.reconcile_count, now.heartbeat_count), (4.0, 30.0));
        assert!((now.reconcile_mean_us() - 500.0).abs() < 1e-6 && (now.heartbeat_mean_us() - 10.0).abs() < 1e-6);
        let grown =
            now.since(&LoopCounters { reconcile_count: 1.0, reconcile_sum_s: 0.001, ..LoopCounters::default() });
        assert_eq!(grown.reconcile_count, 3.0);
        assert_eq!(LoopCounters::parse("").heartbeat_mean_us(), 0.0);
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let q = Quantiles::of((1..=1000).map(f64::from).collect());
        assert_eq!((q.p50, q.p99, q.max), (501.0, 990.0, 1000.0));
        assert_eq!(Quantiles::of(Vec::new()).max, 0.0);
    }
}
