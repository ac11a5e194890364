//! vLLM's Prometheus series from a replica's [`pb::ReplicaStats`]: the one conversion both the
//! head (`/metrics` on 8000 and 8265, every replica of the cluster) and each worker (its own
//! `/metrics`) use, so the two expositions cannot drift apart.
//!
//! Contract:
//! - Names are vLLM's (see [`names`]); every series carries the caller's labels in the caller's
//!   order (the head: `model_name, deployment, replica, worker`; a worker: `model_name, replica`),
//!   and `vllm:request_success_total` adds `finished_reason` (`stop`, `length`, `abort`).
//! - Speculative decoding's `vllm:spec_decode_*` counters appear only for a replica that has
//!   verified a draft (vLLM registers them only when speculation is configured);
//!   `vllm:spec_decode_num_accepted_tokens_per_pos_total` adds `position` (`0` is the first
//!   proposed token).
//! - Gauges are the replica's load when its stats were taken; counters and histograms count
//!   since the replica started (a replica that is replaced starts again from zero under its new
//!   `replica` label, which Prometheus treats as a new series).
//! - `vllm:gpu_cache_usage_perc` and `vllm:kv_cache_usage_perc` are the same fraction in 0..=1
//!   (vLLM's "perc" is a fraction too); both are exported because vLLM renamed the first.
//! - Histograms come from the worker's engine as cumulative bucket counts; only the names in
//!   [`HISTOGRAMS`] are exported (a name from a newer worker is skipped, never written raw into
//!   the exposition), and a histogram whose counts disagree with its bounds is skipped.

use std::collections::BTreeMap;
use std::collections::HashMap;

use prometheus::core::Desc;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};

use crate::v1 as pb;

/// vLLM's series names.
pub mod names {
    pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
    pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
    pub const GPU_CACHE_USAGE: &str = "vllm:gpu_cache_usage_perc";
    pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
    pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
    pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
    pub const NUM_PREEMPTIONS: &str = "vllm:num_preemptions_total";
    pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries_total";
    pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits_total";
    pub const SPEC_DECODE_NUM_DRAFTS: &str = "vllm:spec_decode_num_drafts_total";
    pub const SPEC_DECODE_NUM_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens_total";
    pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens_total";
    pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS: &str = "vllm:spec_decode_num_accepted_tokens_per_pos_total";
    pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
    pub const TIME_PER_OUTPUT_TOKEN: &str = "vllm:time_per_output_token_seconds";
    pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
    pub const REQUEST_QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
    pub const REQUEST_PROMPT_TOKENS: &str = "vllm:request_prompt_tokens";
    pub const REQUEST_GENERATION_TOKENS: &str = "vllm:request_generation_tokens";
    /// Lumen's own: the time to compute one structured-output token mask (vLLM has no such series).
    pub const STRUCTURED_OUTPUT_MASK: &str = "lumen:structured_output_mask_seconds";
}

/// The label `vllm:request_success_total` adds to the caller's.
pub const FINISHED_REASON: &str = "finished_reason";
/// The label `vllm:spec_decode_num_accepted_tokens_per_pos_total` adds to the caller's.
pub const POSITION: &str = "position";

/// The labels of replica series on the head.
pub const HEAD_LABELS: [&str; 4] = ["model_name", "deployment", "replica", "worker"];
/// The labels of replica series on a worker's own `/metrics`.
pub const WORKER_LABELS: [&str; 2] = ["model_name", "replica"];

/// Why a set of families could not be encoded.
pub type EncodeError = prometheus::Error;

/// The content type of the text exposition.
pub const TEXT_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

const GAUGES: [(&str, &str); 4] = [
    (names::NUM_REQUESTS_RUNNING, "Number of requests in model execution batches."),
    (names::NUM_REQUESTS_WAITING, "Number of requests waiting to be processed."),
    (names::GPU_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage (vLLM's older name)."),
    (names::KV_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage."),
];

const COUNTERS: [(&str, &str); 6] = [
    (names::PROMPT_TOKENS, "Number of prefill tokens processed (each request's whole prompt, once)."),
    (names::GENERATION_TOKENS, "Number of generation tokens processed."),
    (names::REQUEST_SUCCESS, "Count of finished requests (choices), by finish reason."),
    (names::NUM_PREEMPTIONS, "Cumulative number of preemptions from the engine."),
    (names::PREFIX_CACHE_QUERIES, "Prefix cache queries, in terms of number of queried tokens."),
    (names::PREFIX_CACHE_HITS, "Prefix cache hits, in terms of number of cached tokens."),
];

/// vLLM's speculative decoding counters (exported for a replica with drafts > 0).
const SPEC_DECODE_COUNTERS: [(&str, &str); 4] = [
    (names::SPEC_DECODE_NUM_DRAFTS, "Number of spec decoding drafts."),
    (names::SPEC_DECODE_NUM_DRAFT_TOKENS, "Number of draft tokens."),
    (names::SPEC_DECODE_NUM_ACCEPTED_TOKENS, "Number of accepted tokens."),
    (names::SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS, "Accepted tokens per draft position."),
];

/// The histograms a worker may report, with their help text.
pub const HISTOGRAMS: [(&str, &str); 7] = [
    (names::TIME_TO_FIRST_TOKEN, "Histogram of time to first token in seconds (arrival to first token)."),
    (
        names::TIME_PER_OUTPUT_TOKEN,
        "Histogram of inter-token latency in seconds: every gap between two tokens of a sequence.",
    ),
    (names::E2E_REQUEST_LATENCY, "Histogram of end-to-end request latency in seconds (arrival to finish)."),
    (names::REQUEST_QUEUE_TIME, "Histogram of time spent waiting before the first schedule, in seconds."),
    (names::REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed, per request."),
    (names::REQUEST_GENERATION_TOKENS, "Number of generation tokens processed, per request."),
    (names::STRUCTURED_OUTPUT_MASK, "Histogram of the time to compute one structured-output token mask, in seconds."),
];

/// Metric families being assembled, one per name, each with the metrics of every replica added.
#[derive(Default)]
pub struct Families {
    by_name: BTreeMap<String, MetricFamily>,
}

impl Families {
    pub fn new() -> Families {
        Families::default()
    }

    /// Adds one replica's vLLM series, each labelled with `labels` (name, value) in order.
    pub fn add_replica(&mut self, stats: &pb::ReplicaStats, labels: &[(&str, &str)]) {
        let usage =
            if stats.kv_blocks_total == 0 { 0.0 } else { stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64 };
        let gauges = [f64::from(stats.running), f64::from(stats.waiting), usage, usage];
        for ((name, help), value) in GAUGES.iter().zip(gauges) {
            self.gauge(name, help, labels, value);
        }
        let [prompt, generation, success, preemptions, queries, hits] = COUNTERS;
        self.counter(prompt, labels, stats.prompt_tokens_total);
        self.counter(generation, labels, stats.generation_tokens_total);
        let finished = [
            ("stop", stats.requests_finished_stop),
            ("length", stats.requests_finished_length),
            ("abort", stats.requests_finished_abort),
        ];
        for (reason, value) in finished {
            self.counter(success, &with_label(labels, FINISHED_REASON, reason), value);
        }
        self.counter(preemptions, labels, stats.preemptions_total);
        self.counter(queries, labels, stats.prefix_cache_queries);
        self.counter(hits, labels, stats.prefix_cache_hits);
        self.spec_decode(stats, labels);
        for h in &stats.histograms {
            self.histogram(h, labels);
        }
    }

    /// Speculative decoding's counters, only for a replica that has verified a draft.
    fn spec_decode(&mut self, stats: &pb::ReplicaStats, labels: &[(&str, &str)]) {
        if stats.spec_decode_drafts == 0 {
            return;
        }
        let [drafts, draft_tokens, accepted, per_position] = SPEC_DECODE_COUNTERS;
        self.counter(drafts, labels, stats.spec_decode_drafts);
        self.counter(draft_tokens, labels, stats.spec_decode_draft_tokens);
        self.counter(accepted, labels, stats.spec_decode_accepted_tokens);
        for (position, &value) in stats.spec_decode_accepted_per_position.iter().enumerate() {
            let position = position.to_string();
            self.counter(per_position, &with_label(labels, POSITION, &position), value);
        }
    }

    /// Adds a gauge sample to the family `name` (created with `help` if new).
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let mut gauge = Gauge::new();
        gauge.set_value(value);
        let mut metric = metric(labels);
        metric.set_gauge(gauge);
        self.push(name, help, MetricType::GAUGE, metric);
    }

    fn counter(&mut self, (name, help): (&str, &str), labels: &[(&str, &str)], value: u64) {
        let mut counter = Counter::new();
        counter.set_value(value as f64);
        let mut metric = metric(labels);
        metric.set_counter(counter);
        self.push(name, help, MetricType::COUNTER, metric);
    }

    fn histogram(&mut self, h: &pb::HistogramSnapshot, labels: &[(&str, &str)]) {
        let Some(&(name, help)) = HISTOGRAMS.iter().find(|(n, _)| *n == h.name) else {
            return;
        };
        if h.bounds.len() != h.cumulative_counts.len() {
            return;
        }
        let buckets = h
            .bounds
            .iter()
            .zip(&h.cumulative_counts)
            .map(|(&bound, &count)| {
                let mut bucket = Bucket::new();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect();
        let mut histogram = Histogram::new();
        histogram.set_bucket(buckets);
        histogram.set_sample_sum(h.sum);
        histogram.set_sample_count(h.count);
        let mut metric = metric(labels);
        metric.set_histogram(histogram);
        self.push(name, help, MetricType::HISTOGRAM, metric);
    }

    fn push(&mut self, name: &str, help: &str, kind: MetricType, metric: Metric) {
        let family = self.by_name.entry(name.to_string()).or_insert_with(|| {
            let mut family = MetricFamily::new();
            family.set_name(name.to_string());
            family.set_help(help.to_string());
            family.set_field_type(kind);
            family
        });
        family.mut_metric().push(metric);
    }

    /// The families, sorted by name.
    pub fn into_vec(self) -> Vec<MetricFamily> {
        self.by_name.into_values().collect()
    }
}

/// `labels` with `(name, value)` added last.
fn with_label<'a>(labels: &[(&'a str, &'a str)], name: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push((name, value));
    all
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    let pairs = labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::new();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect();
    let mut metric = Metric::new();
    metric.set_label(pairs);
    metric
}

/// Descriptors of every replica series with the variable labels `labels`, for a
/// [`prometheus::core::Collector`] that exports them.
pub fn replica_descs(labels: &[&str]) -> Result<Vec<Desc>, prometheus::Error> {
    GAUGES
        .iter()
        .chain(&COUNTERS)
        .chain(&SPEC_DECODE_COUNTERS)
        .chain(&HISTOGRAMS)
        .map(|(name, help)| {
            let extra = match *name {
                names::REQUEST_SUCCESS => Some(FINISHED_REASON),
                names::SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS => Some(POSITION),
                _ => None,
            };
            let labels = labels.iter().chain(&extra).map(|l| l.to_string()).collect();
            Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())
        })
        .collect()
}

/// The text exposition of `families`.
pub fn encode_text(families: &[MetricFamily]) -> Result<String, EncodeError> {
    let mut out = String::new();
    prometheus::TextEncoder::new().encode_utf8(families, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> pb::ReplicaStats {
        pb::ReplicaStats {
            replica_id: "llm-0001".into(),
            model_name: "smol".into(),
            running: 2,
            waiting: 1,
            kv_blocks_total: 8,
            kv_blocks_used: 2,
            prompt_tokens_total: 40,
            generation_tokens_total: 12,
            requests_finished_length: 3,
            requests_finished_stop: 1,
            histograms: vec![
                pb::HistogramSnapshot {
                    name: names::TIME_TO_FIRST_TOKEN.into(),
                    bounds: vec![0.1, 1.0],
                    cumulative_counts: vec![1, 3],
                    sum: 1.5,
                    count: 4,
                },
                pb::HistogramSnapshot { name: "vllm:made_up\"} 1\n".into(), count: 1, ..Default::default() },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_becomes_vllm_series_with_the_callers_labels() {
        let mut families = Families::new();
        families.add_replica(&stats(), &[("model_name", "smol"), ("replica", "llm-0001")]);
        let text = encode_text(&families.into_vec()).expect("encodes");
        let labels = r#"model_name="smol",replica="llm-0001""#;
        for line in [
            format!("vllm:num_requests_running{{{labels}}} 2"),
            format!("vllm:num_requests_waiting{{{labels}}} 1"),
            format!("vllm:kv_cache_usage_perc{{{labels}}} 0.25"),
            format!("vllm:gpu_cache_usage_perc{{{labels}}} 0.25"),
            format!("vllm:prompt_tokens_total{{{labels}}} 40"),
            format!("vllm:generation_tokens_total{{{labels}}} 12"),
            format!("vllm:request_success_total{{{labels},finished_reason=\"length\"}} 3"),
            format!("vllm:request_success_total{{{labels},finished_reason=\"stop\"}} 1"),
            format!("vllm:request_success_total{{{labels},finished_reason=\"abort\"}} 0"),
            format!("vllm:time_to_first_token_seconds_bucket{{{labels},le=\"0.1\"}} 1"),
            format!("vllm:time_to_first_token_seconds_bucket{{{labels},le=\"+Inf\"}} 4"),
            format!("vllm:time_to_first_token_seconds_count{{{labels}}} 4"),
            "# TYPE vllm:prompt_tokens_total counter".to_string(),
            "# TYPE vllm:time_to_first_token_seconds histogram".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("made_up"), "an unknown histogram name must not reach the exposition:\n{text}");
    }

    #[test]
    fn replicas_share_one_family_per_name() {
        let mut families = Families::new();
        families.add_replica(&stats(), &[("replica", "a")]);
        families.add_replica(&stats(), &[("replica", "b")]);
        let families = families.into_vec();
        let running = families.iter().find(|f| f.name() == names::NUM_REQUESTS_RUNNING).expect("family");
        assert_eq!(running.get_metric().len(), 2);
        assert_eq!(families.iter().filter(|f| f.name() == names::NUM_REQUESTS_RUNNING).count(), 1);
    }

    #[test]
    fn a_histogram_with_mismatched_counts_is_skipped() {
        let mut s = stats();
        s.histograms[0].cumulative_counts.pop();
        let mut families = Families::new();
        families.add_replica(&s, &[]);
        assert!(families.into_vec().iter().all(|f| f.name() != names::TIME_TO_FIRST_TOKEN));
    }

    #[test]
    fn descriptors_cover_every_series_and_validate() {
        let descs = replica_descs(&HEAD_LABELS).expect("valid names and labels");
        assert_eq!(descs.len(), GAUGES.len() + COUNTERS.len() + SPEC_DECODE_COUNTERS.len() + HISTOGRAMS.len());
        let per_position = descs
            .iter()
            .find(|d| d.fq_name == names::SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS)
            .expect("per-position descriptor");
        assert_eq!(per_position.variable_labels.last().map(String::as_str), Some(POSITION));
    }

    #[test]
    fn spec_decode_counters_appear_with_a_position_label_once_a_draft_was_verified() {
        let mut s = stats();
        s.spec_decode_drafts = 5;
        s.spec_decode_draft_tokens = 15;
        s.spec_decode_accepted_tokens = 9;
        s.spec_decode_accepted_per_position = vec![5, 3, 1];
        let mut families = Families::new();
        families.add_replica(&s, &[("model_name", "smol"), ("replica", "llm-0001")]);
        let text = encode_text(&families.into_vec()).expect("encodes");
        let labels = r#"model_name="smol",replica="llm-0001""#;
        for line in [
            format!("vllm:spec_decode_num_drafts_total{{{labels}}} 5"),
            format!("vllm:spec_decode_num_draft_tokens_total{{{labels}}} 15"),
            format!("vllm:spec_decode_num_accepted_tokens_total{{{labels}}} 9"),
            format!("vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position=\"0\"}} 5"),
            format!("vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position=\"1\"}} 3"),
            format!("vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position=\"2\"}} 1"),
            "# TYPE vllm:spec_decode_num_drafts_total counter".to_string(),
            "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        let positions = text.lines().filter(|l| l.starts_with("vllm:spec_decode_num_accepted_tokens_per_pos_total{"));
        assert_eq!(positions.count(), 3, "one series per draft position:\n{text}");
    }

    #[test]
    fn no_spec_decode_series_without_a_draft() {
        let mut s = stats();
        s.spec_decode_accepted_per_position = vec![0, 0];
        let mut families = Families::new();
        families.add_replica(&s, &[("replica", "a")]);
        let families = families.into_vec();
        assert!(families.iter().any(|f| f.name() == names::NUM_PREEMPTIONS), "the other counters are there");
        for (name, _) in SPEC_DECODE_COUNTERS {
            assert!(families.iter().all(|f| f.name() != name), "{name} must not appear with drafts == 0");
        }
    }
}
