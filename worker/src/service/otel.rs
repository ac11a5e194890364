//! A `Generate` request's OpenTelemetry span on the worker (vLLM's `llm_request`), continuing
//! the trace the head sent as `traceparent` in the gRPC metadata.
//!
//! Nothing is threaded through the engine: the span starts when the call arrives and, when the
//! request finishes, is completed from the engine's own timing record (the `Finished` event's
//! `Timings`, measured from the engine's arrival): child spans `queue` (arrival to first
//! scheduled), `prefill` (to the first token) and `decode` (to the end), laid out backwards from
//! the moment `Finished` is seen, and vLLM's `gen_ai.*` attributes. A request that fails or is
//! cancelled ends its span with an error status.
//!
//! Invariants: no span unless `--otlp-traces-endpoint` is set ([`WorkerSpan::start`] answers
//! `None`); the span ends exactly once ([`WorkerSpan`] is consumed by its end); no prompt text.

use std::time::{Duration, SystemTime};

use lumen_proto::otel::{self, attr};
use lumen_proto::v1 as pb;
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

/// The span of one request on this worker.
pub struct WorkerSpan {
    cx: Context,
}

impl WorkerSpan {
    /// A span for `request`, child of the head's span in `metadata`; `None` when tracing is off.
    pub fn start(metadata: &tonic::metadata::MetadataMap, request: &pb::GenerateRequest) -> Option<WorkerSpan> {
        let tracer = otel::tracer()?;
        let parent = otel::extract_grpc(metadata);
        let span = tracer
            .span_builder(otel::REQUEST_SPAN)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(attr::REQUEST_ID, request.request_id.clone()),
                KeyValue::new("lumen.replica_id", request.replica_id.clone()),
            ])
            .start_with_context(tracer, &parent);
        Some(WorkerSpan { cx: parent.with_span(span) })
    }

    /// Ends the span with the request's `Finished` event: usage, latencies and the phases.
    pub fn finished(self, finished: &pb::Finished) {
        let end = SystemTime::now();
        let timings = finished.timings.unwrap_or_default();
        let usage = finished.usage.unwrap_or_default();
        let us = Duration::from_micros;
        let secs = |micros: u64| us(micros).as_secs_f64();
        let arrival = end.checked_sub(us(timings.total_us)).unwrap_or(end);
        let queue_end = arrival + us(timings.queue_us);
        self.phase("queue", arrival, queue_end);
        let span = self.cx.span();
        let mut attributes = vec![
            KeyValue::new(attr::USAGE_PROMPT_TOKENS, i64::from(usage.prompt_tokens)),
            KeyValue::new(attr::USAGE_COMPLETION_TOKENS, i64::from(usage.completion_tokens)),
            KeyValue::new("gen_ai.usage.cached_tokens", i64::from(usage.cached_tokens)),
            KeyValue::new(attr::LATENCY_TIME_IN_QUEUE, secs(timings.queue_us)),
            KeyValue::new(attr::LATENCY_E2E, secs(timings.total_us)),
        ];
        // No token (an embedding, or a request that ended before its first): no prefill/decode.
        if timings.first_token_us > 0 {
            let first = arrival + us(timings.first_token_us);
            self.phase("prefill", queue_end, first);
            self.phase("decode", first, end);
            attributes.extend([
                KeyValue::new(attr::LATENCY_TIME_TO_FIRST_TOKEN, secs(timings.first_token_us)),
                KeyValue::new(
                    attr::LATENCY_TIME_IN_MODEL_PREFILL,
                    secs(timings.first_token_us.saturating_sub(timings.queue_us)),
                ),
                KeyValue::new(
                    attr::LATENCY_TIME_IN_MODEL_DECODE,
                    secs(timings.total_us.saturating_sub(timings.first_token_us)),
                ),
            ]);
        }
        span.set_attributes(attributes);
        span.end_with_timestamp(end);
    }

    /// Ends the span as failed (`message`: why).
    pub fn failed(self, message: &str) {
        let span = self.cx.span();
        span.set_status(Status::error(message.to_string()));
        span.end();
    }

    /// A child span over `[start, end]`.
    fn phase(&self, name: &'static str, start: SystemTime, end: SystemTime) {
        let Some(tracer) = otel::tracer() else { return };
        let mut span = tracer.span_builder(name).with_start_time(start).start_with_context(tracer, &self.cx);
        span.end_with_timestamp(end.max(start));
    }
}
