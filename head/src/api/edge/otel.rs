//! One OpenTelemetry span per OpenAI request at the head (vLLM's `llm_request`), owned by the
//! request's [`Trace`](super::trace::Trace), which is the only caller: the span starts when the
//! request arrives (a child of the client's `traceparent` if it sent one), gets events as the
//! request is queued, admitted, routed and sends its first token, and ends exactly once with
//! [`RequestSpan::end`] when the trace records the request.
//!
//! Invariants: no span exists unless `--otlp-traces-endpoint` is set ([`RequestSpan::start`]
//! answers `None`); attributes carry ids, model names, sampling parameters, token counts and
//! latencies (seconds) under vLLM's `gen_ai.*` names, never an API key or prompt text. The
//! span's context is what the head sends on to the worker as `traceparent`.

use std::time::Duration;

use lumen_proto::otel::{self, attr};
use lumen_proto::v1 as pb;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use crate::backend::Routed;
use crate::observe::request_log::Route;

/// A request's span (its context, which holds it).
pub struct RequestSpan {
    cx: Context,
}

/// What the span's end reports.
pub struct SpanEnd<'a> {
    pub id: &'a str,
    pub model: Option<&'a str>,
    pub status: u16,
    pub error: Option<&'a str>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_in_queue: Option<Duration>,
    pub ttft: Option<Duration>,
    pub e2e: Duration,
    pub finish_reason: Option<&'static str>,
    pub routed: Option<Routed>,
    pub migrations: u32,
}

impl RequestSpan {
    /// A span for a request on `route` that arrived with `headers`; `None` when tracing is off.
    pub fn start(headers: &axum::http::HeaderMap, route: Route) -> Option<RequestSpan> {
        let tracer = otel::tracer()?;
        let parent = otel::extract_http(headers);
        let span = tracer
            .span_builder(otel::REQUEST_SPAN)
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("lumen.route", route_name(route))])
            .start_with_context(tracer, &parent);
        Some(RequestSpan { cx: parent.with_span(span) })
    }

    /// The context to send on to the worker.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The request goes to `model`; `first` is its first backend request (its sampling
    /// parameters are every prompt's).
    pub fn launched(&self, id: &str, model: &str, first: Option<&pb::GenerateRequest>, prompts: usize) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(attr::REQUEST_ID, id.to_string()));
        span.set_attribute(KeyValue::new(attr::REQUEST_MODEL, model.to_string()));
        span.set_attribute(KeyValue::new("lumen.prompts", prompts as i64));
        let Some(first) = first else { return };
        span.set_attribute(KeyValue::new(attr::REQUEST_N, i64::from(first.n.max(1))));
        if let Some(stop) = &first.stop
            && stop.max_tokens > 0
        {
            span.set_attribute(KeyValue::new(attr::REQUEST_MAX_TOKENS, i64::from(stop.max_tokens)));
        }
        if let Some(sampling) = &first.sampling {
            span.set_attribute(KeyValue::new(attr::REQUEST_TEMPERATURE, f64::from(sampling.temperature)));
            span.set_attribute(KeyValue::new(attr::REQUEST_TOP_P, f64::from(sampling.top_p)));
        }
    }

    /// A moment of the request's life (`queued`, `admitted`, `first_token`, ...).
    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    /// The request is on a replica.
    pub fn routed(&self, routed: &Routed) {
        self.event(
            "routed",
            vec![
                KeyValue::new("lumen.deployment", routed.deployment.clone()),
                KeyValue::new("lumen.replica_id", routed.replica_id.clone()),
            ],
        );
    }

    /// Sets the outcome and ends the span.
    pub fn end(&self, end: SpanEnd<'_>) {
        let span = self.cx.span();
        let secs = |d: Duration| d.as_secs_f64();
        let mut attributes = vec![
            KeyValue::new(attr::REQUEST_ID, end.id.to_string()),
            KeyValue::new(attr::USAGE_PROMPT_TOKENS, i64::from(end.prompt_tokens)),
            KeyValue::new(attr::USAGE_COMPLETION_TOKENS, i64::from(end.completion_tokens)),
            KeyValue::new(attr::LATENCY_E2E, secs(end.e2e)),
            KeyValue::new("http.response.status_code", i64::from(end.status)),
            KeyValue::new("lumen.migrations", i64::from(end.migrations)),
        ];
        if let Some(model) = end.model {
            attributes.push(KeyValue::new(attr::RESPONSE_MODEL, model.to_string()));
        }
        if let Some(queue) = end.time_in_queue {
            attributes.push(KeyValue::new(attr::LATENCY_TIME_IN_QUEUE, secs(queue)));
        }
        if let Some(ttft) = end.ttft {
            attributes.push(KeyValue::new(attr::LATENCY_TIME_TO_FIRST_TOKEN, secs(ttft)));
        }
        if let Some(reason) = end.finish_reason {
            attributes.push(KeyValue::new("gen_ai.response.finish_reasons", reason));
        }
        if let Some(routed) = end.routed {
            attributes.push(KeyValue::new("lumen.deployment", routed.deployment));
            attributes.push(KeyValue::new("lumen.replica_id", routed.replica_id));
        }
        span.set_attributes(attributes);
        if let Some(error) = end.error {
            span.set_status(Status::error(error.to_string()));
        }
        span.end();
    }
}

fn route_name(route: Route) -> &'static str {
    match route {
        Route::Chat => "/v1/chat/completions",
        Route::Completions => "/v1/completions",
        Route::Responses => "/v1/responses",
        Route::Embeddings => "/v1/embeddings",
    }
}
