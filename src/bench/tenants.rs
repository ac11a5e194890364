//! Tenants in `lumen bench serve`: `--tenant NAME:KEY:RATE` (repeatable) sends each tenant's
//! requests with its own API key, as its own Poisson process of RATE requests per second, and
//! reports each tenant's figures beside the run's. It is the benchmark of a server shared by
//! teams: e.g. one tenant at ten times the other's rate against a saturated server, run once with
//! the head's fair queue (`--queue-policy fair`) and once without (`fcfs`).
//!
//! Contract: with tenants, `--num-prompts` is split in proportion to the rates (each tenant gets
//! at least one request); every tenant's first request goes at the start and the arrivals of all
//! tenants share one clock; `--concurrency` still caps the requests in flight, whoever sends them;
//! `--request-rate` is not used, and `--api-key` only for the model list and the warm-up (else
//! the first tenant's key). A tenant's throughput share is its output tokens over every tenant's; its output tokens
//! per second are over the whole run. Its contended share is the same ratio over the contended
//! window only: from the start until the first tenant's last request ends (while every tenant
//! still had work), each request's tokens taken as spread evenly from its first token to its
//! end; under a two-sided backlog that is what the server's scheduling gave each tenant, where
//! the whole run's share only repeats the offered ratio. Keys never appear in the report.

use std::time::Duration;

use serde::Serialize;

use super::report::{Percentiles, RequestRecord};
use super::workload::Arrivals;

/// One `--tenant NAME:KEY:RATE`.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantSpec {
    pub name: String,
    pub key: String,
    /// Requests per second (Poisson).
    pub rate: f64,
}

/// Parses `NAME:KEY:RATE` (the key may itself hold `:`).
pub fn parse_tenant(s: &str) -> Result<TenantSpec, String> {
    let shape = || format!("expected NAME:KEY:RATE (e.g. heavy:sk-123:4), got {s:?}");
    let (name, rest) = s.split_once(':').ok_or_else(shape)?;
    let (key, rate) = rest.rsplit_once(':').ok_or_else(shape)?;
    if name.is_empty() || key.is_empty() {
        return Err(shape());
    }
    let rate: f64 = rate.trim().parse().map_err(|e| format!("the rate of tenant {name:?}: {e}"))?;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(format!("the rate of tenant {name:?} must be a positive number of requests per second"));
    }
    Ok(TenantSpec { name: name.to_string(), key: key.to_string(), rate })
}

/// Checks a set of tenants: distinct names, and no more tenants than requests.
pub fn check(tenants: &[TenantSpec], num_prompts: usize) -> anyhow::Result<()> {
    for (i, t) in tenants.iter().enumerate() {
        if tenants[..i].iter().any(|o| o.name == t.name) {
            anyhow::bail!("--tenant {:?} is given twice", t.name);
        }
    }
    if tenants.len() > num_prompts {
        anyhow::bail!("--num-prompts {num_prompts} is fewer than the {} tenants", tenants.len());
    }
    Ok(())
}

/// Splits `total` requests in proportion to the tenants' rates (largest remainders get the
/// rest), each at least one.
pub fn counts(tenants: &[TenantSpec], total: usize) -> Vec<usize> {
    let sum: f64 = tenants.iter().map(|t| t.rate).sum();
    let exact: Vec<f64> = tenants.iter().map(|t| total as f64 * t.rate / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| (e.floor() as usize).max(1)).collect();
    let mut order: Vec<usize> = (0..tenants.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut order = order.into_iter().cycle();
    while counts.iter().sum::<usize>() < total {
        counts[order.next().unwrap_or_default()] += 1;
    }
    // Raising a share to one may have taken too many: the largest give them back.
    while counts.iter().sum::<usize>() > total.max(tenants.len()) {
        let largest = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap_or_default();
        counts[largest] -= 1;
    }
    counts
}

/// When each request is sent (from the run's start) and by which tenant, in sending order.
pub fn schedule(tenants: &[TenantSpec], counts: &[usize], seed: u64) -> Vec<(Duration, usize)> {
    let mut all = Vec::with_capacity(counts.iter().sum());
    for (i, (tenant, &n)) in tenants.iter().zip(counts).enumerate() {
        let mut arrivals = Arrivals::new(tenant.rate, seed.wrapping_add(i as u64 + 1));
        let mut at = Duration::ZERO;
        for k in 0..n {
            if k > 0 {
                at += arrivals.next_gap();
            }
            all.push((at, i));
        }
    }
    // Stable: at equal times the earlier tenant goes first.
    all.sort_by_key(|&(at, _)| at);
    all
}

/// One tenant's figures.
#[derive(Clone, Debug, Serialize)]
pub struct TenantReport {
    pub tenant: String,
    /// Its offered load, requests per second.
    pub request_rate: f64,
    /// Requests that completed.
    pub num_requests: usize,
    pub failed: usize,
    pub ttft_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub total_output_tokens: usize,
    /// Over the whole run.
    pub output_tokens_per_s: f64,
    /// Its output tokens over every tenant's.
    pub throughput_share: f64,
    /// Its share of the output tokens produced in the contended window (see the module docs).
    pub contended_share: f64,
    /// The contended window's length, seconds (the same for every tenant).
    pub contended_window_s: f64,
}

/// Output tokens of `record` produced before `until` (from the run's start), its tokens spread
/// evenly from its first token to its end.
fn tokens_before(record: &RequestRecord, until: Duration) -> f64 {
    let n = record.output_tokens as f64;
    let first = record.start + record.ttft;
    let end = record.start + record.e2e;
    if n == 0.0 || until <= first {
        return 0.0;
    }
    if until >= end || n == 1.0 {
        return n;
    }
    let span = (end - first).as_secs_f64().max(1e-9);
    (1.0 + (n - 1.0) * (until - first).as_secs_f64() / span).min(n)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Each tenant's report from its completed `records` and `failed` count, over a run of `duration`.
pub fn reports(
    tenants: &[TenantSpec],
    records: &[Vec<RequestRecord>],
    failed: &[usize],
    duration: Duration,
) -> Vec<TenantReport> {
    let total: usize = records.iter().flatten().map(|r| r.output_tokens).sum();
    let secs = duration.as_secs_f64().max(1e-9);
    let last_end = |rs: &Vec<RequestRecord>| rs.iter().map(|r| r.start + r.e2e).max();
    let window = records.iter().filter_map(last_end).min().unwrap_or_default();
    let in_window: Vec<f64> = records.iter().map(|rs| rs.iter().map(|r| tokens_before(r, window)).sum()).collect();
    let window_total: f64 = in_window.iter().sum();
    tenants
        .iter()
        .zip(records.iter().zip(failed).zip(&in_window))
        .map(|(t, ((records, &failed), &contended))| {
            let output: usize = records.iter().map(|r| r.output_tokens).sum();
            TenantReport {
                tenant: t.name.clone(),
                request_rate: t.rate,
                num_requests: records.len(),
                failed,
                ttft_ms: Percentiles::of(records.iter().map(|r| ms(r.ttft)).collect()),
                e2e_ms: Percentiles::of(records.iter().map(|r| ms(r.e2e)).collect()),
                total_output_tokens: output,
                output_tokens_per_s: output as f64 / secs,
                throughput_share: if total > 0 { output as f64 / total as f64 } else { 0.0 },
                contended_share: if window_total > 0.0 { contended / window_total } else { 0.0 },
                contended_window_s: window.as_secs_f64(),
            }
        })
        .collect()
}

/// The tenants as a table, one row each.
pub fn table(reports: &[TenantReport]) -> String {
    let mut t = String::from("------------------------------ per tenant ------------------------------\n");
    t.push_str(&format!(
        "{:<12}{:>7}{:>6}{:>5}{:>10}{:>10}{:>10}{:>11}{:>7}{:>11}\n",
        "tenant", "req/s", "done", "fail", "TTFT p50", "TTFT p99", "e2e p50", "out tok/s", "share", "contended"
    ));
    for r in reports {
        t.push_str(&format!(
            "{:<12}{:>7.2}{:>6}{:>5}{:>10.0}{:>10.0}{:>10.0}{:>11.1}{:>6.1}%{:>10.1}%\n",
            r.tenant,
            r.request_rate,
            r.num_requests,
            r.failed,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.e2e_ms.p50,
            r.output_tokens_per_s,
            r.throughput_share * 100.0,
            r.contended_share * 100.0
        ));
    }
    let window = reports.first().map_or(0.0, |r| r.contended_window_s);
    t.push_str(&format!(
        "(latencies in ms; share: of all output tokens; contended: of those in the first {window:.1} s, \
         while every tenant had work)\n"
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, rate: f64) -> TenantSpec {
        TenantSpec { name: name.into(), key: format!("sk-{name}"), rate }
    }

    #[test]
    fn a_tenant_is_name_key_and_rate() {
        assert_eq!(parse_tenant("heavy:sk:with:colons:2.5"), Ok(tenant_with("heavy", "sk:with:colons", 2.5)));
        for bad in ["heavy", "heavy:4", ":k:1", "h::1", "h:k:0", "h:k:-1", "h:k:inf", "h:k:fast"] {
            assert!(parse_tenant(bad).is_err(), "{bad}");
        }
    }

    fn tenant_with(name: &str, key: &str, rate: f64) -> TenantSpec {
        TenantSpec { name: name.into(), key: key.into(), rate }
    }

    #[test]
    fn requests_are_split_by_rate_with_one_each_at_least() {
        assert_eq!(counts(&[tenant("h", 10.0), tenant("l", 1.0)], 110), vec![100, 10]);
        assert_eq!(counts(&[tenant("h", 10.0), tenant("l", 1.0)], 2), vec![1, 1]);
        let split = counts(&[tenant("a", 1.0), tenant("b", 1.0), tenant("c", 1.0)], 10);
        assert_eq!(split.iter().sum::<usize>(), 10);
        assert!(split.iter().all(|&n| (3..=4).contains(&n)), "{split:?}");
        assert!(check(&[tenant("a", 1.0), tenant("a", 2.0)], 10).is_err());
        assert!(check(&[tenant("a", 1.0), tenant("b", 2.0)], 1).is_err());
    }

    #[test]
    fn the_schedule_merges_every_tenants_arrivals_in_time_order() {
        let tenants = [tenant("h", 10.0), tenant("l", 1.0)];
        let plan = schedule(&tenants, &[20, 2], 7);
        assert_eq!(plan.len(), 22);
        assert!(plan.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(plan.iter().filter(|(_, t)| *t == 1).count(), 2);
        assert_eq!(plan[..2].iter().map(|(at, _)| *at).collect::<Vec<_>>(), [Duration::ZERO; 2], "both start at once");
    }

    #[test]
    fn the_contended_share_counts_only_tokens_made_while_every_tenant_had_work() {
        let at = |start: u64, tokens: usize, e2e: u64| RequestRecord {
            start: Duration::from_secs(start),
            output_tokens: tokens,
            ttft: Duration::ZERO,
            e2e: Duration::from_secs(e2e),
            ..Default::default()
        };
        let tenants = [tenant("a", 1.0), tenant("b", 1.0)];
        // `b` ends at 10 s; `a` made 31 tokens by then (one request of 31 in 0-10 s), b 11; a's
        // second request (10-20 s) is after the window.
        let records = [vec![at(0, 31, 10), at(10, 31, 10)], vec![at(0, 11, 10)]];
        let got = reports(&tenants, &records, &[0, 0], Duration::from_secs(20));
        assert_eq!(got[0].contended_window_s, 10.0);
        assert!((got[0].contended_share - 31.0 / 42.0).abs() < 1e-9, "{}", got[0].contended_share);
        assert!((got[1].contended_share - 11.0 / 42.0).abs() < 1e-9);
        // Over the whole run, a's share is 62 of 73.
        assert!((got[0].throughput_share - 62.0 / 73.0).abs() < 1e-9);
        // Halfway through a request, half its tokens after the first are counted.
        assert_eq!(tokens_before(&at(0, 11, 10), Duration::from_secs(5)), 6.0);
        assert!(table(&got).contains("contended"));
    }

    #[test]
    fn shares_are_of_all_output_tokens() {
        let record = |tokens| RequestRecord { output_tokens: tokens, ..Default::default() };
        let tenants = [tenant("h", 10.0), tenant("l", 1.0)];
        let got = reports(&tenants, &[vec![record(30), record(30)], vec![record(20)]], &[1, 0], Duration::from_secs(2));
        assert_eq!((got[0].num_requests, got[0].failed, got[0].total_output_tokens), (2, 1, 60));
        assert_eq!(got[0].throughput_share, 0.75);
        assert_eq!(got[1].output_tokens_per_s, 10.0);
        assert!(table(&got).contains("75.0%"));
    }
}
