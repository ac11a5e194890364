//! Benchmark results in the shape `vllm bench serve` reports them: per-request latencies reduced
//! to throughput and percentiles, printed as a table and written as JSON.

use std::time::Duration;

use serde::Serialize;

/// What one request measured.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    /// When it was sent, from the start of the run (`lumen bench serve`; zero elsewhere).
    pub start: Duration,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Arrival to first output token.
    pub ttft: Duration,
    /// Gaps between consecutive output tokens.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
}

/// Mean and percentiles of a latency, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(mut ms: Vec<f64>) -> Percentiles {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (ms.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            ms[lo] + (ms[hi] - ms[lo]) * (pos - lo as f64)
        };
        Percentiles { mean: ms.iter().sum::<f64>() / ms.len() as f64, p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }
}

/// One benchmark run, the JSON schema shared with `scripts/bench-vs-llamacpp.sh`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub engine: String,
    pub concurrency: usize,
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub prompt_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// `1000 / mean TPOT`: the decode speed one stream sees.
    pub decode_tokens_per_s_per_stream: f64,
    pub ttft_ms: Percentiles,
    /// Time per output token after the first: `(e2e - ttft) / (output_tokens - 1)`.
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub total_prompt_tokens: usize,
    pub total_output_tokens: usize,
    /// Requests that did not complete (HTTP error, broken stream); not part of any figure above.
    pub failed: usize,
    /// Why requests failed (status and body), the first few of `failed`.
    pub failures: Vec<String>,
    /// Offered load in requests/s (Poisson arrivals); `None` sends every request at once, as
    /// many in flight as `concurrency` allows.
    pub request_rate: Option<f64>,
    /// The fraction of requests under a JSON schema (`--structured-fraction`).
    pub structured_fraction: f64,
    /// Structured-output mask computation time per token, p50 and p99 (ms); `None` when no
    /// mask was computed.
    pub mask_ms: Option<(f64, f64)>,
    /// Speculative decoding (offline, when drafts were verified): (drafts, proposed tokens,
    /// accepted tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_decode: Option<(u64, u64, u64)>,
    /// Each tenant's figures (`--tenant`); absent without tenants.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<super::tenants::TenantReport>,
    /// Every request on its own (`--save-detailed`), in the order they were planned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<RequestDetail>>,
}

/// One request of a run as `--save-detailed` keeps it (vLLM's per-request lists, one object per
/// request): a failed request carries its send time and error, and no timings.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestDetail {
    /// When it was sent, from the start of the run (ms).
    pub start_ms: f64,
    /// The tenant that sent it (`--tenant`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub output_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e_ms: Option<f64>,
    /// Gaps between consecutive output tokens (ms).
    pub itl_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RequestDetail {
    /// The detail of a completed request.
    pub fn of(record: &RequestRecord, tenant: Option<String>) -> RequestDetail {
        RequestDetail {
            start_ms: ms(record.start),
            tenant,
            output_tokens: record.output_tokens,
            ttft_ms: Some(ms(record.ttft)),
            e2e_ms: Some(ms(record.e2e)),
            itl_ms: record.itl.iter().map(|d| ms(*d)).collect(),
            error: None,
        }
    }

    /// The detail of a request sent at `start` that failed.
    pub fn failed(start: Duration, error: String, tenant: Option<String>) -> RequestDetail {
        RequestDetail {
            start_ms: ms(start),
            tenant,
            output_tokens: 0,
            ttft_ms: None,
            e2e_ms: None,
            itl_ms: Vec::new(),
            error: Some(error),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    /// Reduces the records of a run that took `duration`.
    pub fn new(
        engine: String,
        concurrency: usize,
        input_len: usize,
        output_len: usize,
        duration: Duration,
        records: &[RequestRecord],
    ) -> Report {
        let secs = duration.as_secs_f64().max(1e-9);
        let prompt: usize = records.iter().map(|r| r.prompt_tokens).sum();
        let output: usize = records.iter().map(|r| r.output_tokens).sum();
        let tpot: Vec<f64> = records
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| ms(r.e2e.saturating_sub(r.ttft)) / (r.output_tokens - 1) as f64)
            .collect();
        let tpot = Percentiles::of(tpot);
        Report {
            engine,
            concurrency,
            num_prompts: records.len(),
            input_len,
            output_len,
            duration_s: secs,
            request_throughput: records.len() as f64 / secs,
            prompt_tokens_per_s: prompt as f64 / secs,
            output_tokens_per_s: output as f64 / secs,
            decode_tokens_per_s_per_stream: if tpot.mean > 0.0 { 1e3 / tpot.mean } else { 0.0 },
            ttft_ms: Percentiles::of(records.iter().map(|r| ms(r.ttft)).collect()),
            tpot_ms: tpot,
            itl_ms: Percentiles::of(records.iter().flat_map(|r| r.itl.iter().map(|&d| ms(d))).collect()),
            total_prompt_tokens: prompt,
            total_output_tokens: output,
            failed: 0,
            failures: Vec::new(),
            request_rate: None,
            structured_fraction: 0.0,
            mask_ms: None,
            spec_decode: None,
            tenants: Vec::new(),
            requests: None,
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, k: &str, v: String| t.push_str(&format!("{k:<36}{v:>14}\n"));
        t.push_str(&format!("============ {} (concurrency {}) ============\n", self.engine, self.concurrency));
        row(&mut t, "Successful requests:", self.num_prompts.to_string());
        row(&mut t, "Failed requests:", self.failed.to_string());
        let rate = self.request_rate.map_or_else(|| "inf".to_string(), |r| format!("{r:.2}"));
        row(&mut t, "Offered request rate (req/s):", rate);
        row(&mut t, "Input / output tokens per request:", format!("{} / {}", self.input_len, self.output_len));
        row(&mut t, "Benchmark duration (s):", format!("{:.2}", self.duration_s));
        row(
            &mut t,
            "Total prompt / output tokens:",
            format!("{} / {}", self.total_prompt_tokens, self.total_output_tokens),
        );
        row(&mut t, "Request throughput (req/s):", format!("{:.2}", self.request_throughput));
        row(&mut t, "Prompt throughput (tok/s):", format!("{:.1}", self.prompt_tokens_per_s));
        row(&mut t, "Output token throughput (tok/s):", format!("{:.1}", self.output_tokens_per_s));
        row(&mut t, "Decode speed per stream (tok/s):", format!("{:.1}", self.decode_tokens_per_s_per_stream));
        for (name, p) in [("TTFT", &self.ttft_ms), ("TPOT", &self.tpot_ms), ("ITL", &self.itl_ms)] {
            row(&mut t, &format!("{name} mean / p50 (ms):"), format!("{:.1} / {:.1}", p.mean, p.p50));
            row(&mut t, &format!("{name} p90 / p99 (ms):"), format!("{:.1} / {:.1}", p.p90, p.p99));
        }
        if self.structured_fraction > 0.0 {
            row(&mut t, "Requests under a JSON schema:", format!("{:.0}%", self.structured_fraction * 100.0));
            let mask = self.mask_ms.map_or_else(|| "-".to_string(), |(p50, p99)| format!("{p50:.3} / {p99:.3}"));
            row(&mut t, "Mask time per token p50 / p99 (ms):", mask);
        }
        if let Some((drafts, proposed, accepted)) = self.spec_decode {
            let rate = if proposed == 0 { 0.0 } else { 100.0 * accepted as f64 / proposed as f64 };
            let per_draft = if drafts == 0 { 0.0 } else { accepted as f64 / drafts as f64 };
            row(&mut t, "Speculative acceptance:", format!("{rate:.1}% ({per_draft:.2} tokens per draft)"));
        }
        if !self.tenants.is_empty() {
            t.push_str(&super::tenants::table(&self.tenants));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_samples() {
        let p = Percentiles::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(p.mean, 2.5);
        assert_eq!(p.p50, 2.5);
        assert!((p.p90 - 3.7).abs() < 1e-9);
    }

    #[test]
    fn report_derives_throughput_and_tpot_from_records() {
        let r = RequestRecord {
            prompt_tokens: 10,
            output_tokens: 11,
            ttft: Duration::from_millis(100),
            itl: vec![Duration::from_millis(10); 10],
            e2e: Duration::from_millis(200),
            ..Default::default()
        };
        let rep = Report::new("x".into(), 1, 10, 11, Duration::from_secs(2), &[r.clone(), r]);
        assert_eq!(rep.output_tokens_per_s, 11.0);
        assert_eq!(rep.tpot_ms.mean, 10.0);
        assert_eq!(rep.decode_tokens_per_s_per_stream, 100.0);
        assert_eq!(rep.itl_ms.p99, 10.0);
    }
}
