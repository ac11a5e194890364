//! OpenTelemetry traces exported over OTLP, gRPC ([`crate::otel_grpc`]; vLLM's default) or HTTP
//! protobuf as `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` says, to vLLM's `--otlp-traces-endpoint`, and
//! the W3C `traceparent` header that carries a trace from a client to the head and from the head
//! to a worker (gRPC request metadata).
//!
//! Invariants:
//! - Off unless [`init`] was given an endpoint: then [`tracer`] is `None`, nothing builds a span,
//!   and [`extract`] / [`inject`] do nothing (no work per request).
//! - [`init`] runs at most once per process (`lumen serve`'s head and in-process worker share
//!   one exporter); spans are batched on the SDK's own thread, never on the async runtime, and
//!   [`shutdown`] flushes what is pending (call it once the servers stopped).
//! - Only the trace context crosses processes: `traceparent` (and `tracestate`), nothing else.
//! - Span attributes follow vLLM's names ([`attr`]); no API key or prompt text is ever put in a span.

use std::sync::OnceLock;

use opentelemetry::Context;
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// vLLM's span attribute names (`vllm/tracing.py`, after the OpenTelemetry GenAI conventions).
/// Latencies are in seconds.
pub mod attr {
    pub const REQUEST_ID: &str = "gen_ai.request.id";
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
    pub const REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
    pub const REQUEST_TOP_P: &str = "gen_ai.request.top_p";
    pub const REQUEST_N: &str = "gen_ai.request.n";
    pub const USAGE_PROMPT_TOKENS: &str = "gen_ai.usage.prompt_tokens";
    pub const USAGE_COMPLETION_TOKENS: &str = "gen_ai.usage.completion_tokens";
    pub const LATENCY_TIME_IN_QUEUE: &str = "gen_ai.latency.time_in_queue";
    pub const LATENCY_TIME_TO_FIRST_TOKEN: &str = "gen_ai.latency.time_to_first_token";
    pub const LATENCY_E2E: &str = "gen_ai.latency.e2e";
    pub const LATENCY_TIME_IN_MODEL_PREFILL: &str = "gen_ai.latency.time_in_model_prefill";
    pub const LATENCY_TIME_IN_MODEL_DECODE: &str = "gen_ai.latency.time_in_model_decode";
}

/// The name of a request's span, at the head and at the worker (vLLM's).
pub const REQUEST_SPAN: &str = "llm_request";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static TRACER: OnceLock<BoxedTracer> = OnceLock::new();

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("--otlp-traces-endpoint `{endpoint}`: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("{variable}={protocol}: Lumen exports traces over OTLP `grpc` (the default) or `http/protobuf`")]
    Protocol { variable: &'static str, protocol: String },
}

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (a collector's port 4317): vLLM's default.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// The OpenTelemetry variables that choose the OTLP protocol, most specific first.
const PROTOCOL_VARIABLES: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"];

/// The protocol `variable` asks for (unset or empty: gRPC, as vLLM); `http/json` and anything
/// else is refused (a silent mismatch would lose every span).
fn check_protocol(variable: &'static str, protocol: Option<&str>) -> Result<Protocol, OtelError> {
    match protocol.map(str::trim) {
        None | Some("" | "grpc") => Ok(Protocol::Grpc),
        Some("http/protobuf") => Ok(Protocol::HttpProtobuf),
        Some(other) => Err(OtelError::Protocol { variable, protocol: other.to_string() }),
    }
}

/// The URL spans are posted to: `endpoint` as given, or with `/v1/traces` (OTLP/HTTP's path)
/// when it names no path.
pub fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') { trimmed.to_string() } else { format!("{trimmed}/v1/traces") }
}

/// Starts exporting spans to `endpoint` as service `service` (`None`: tracing stays off). A
/// second call keeps the first exporter.
pub fn init(endpoint: Option<&str>, service: &'static str) -> Result<(), OtelError> {
    let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) else { return Ok(()) };
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let variable = PROTOCOL_VARIABLES.into_iter().find(|v| std::env::var_os(v).is_some());
    let protocol = match variable {
        Some(variable) => check_protocol(variable, std::env::var(variable).ok().as_deref())?,
        None => Protocol::Grpc,
    };
    let refused = |reason: String| OtelError::Exporter { endpoint: endpoint.to_string(), reason };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let (provider, url) = match protocol {
        Protocol::Grpc => {
            let exporter = crate::otel_grpc::GrpcSpanExporter::new(endpoint).map_err(refused)?;
            let builder = SdkTracerProvider::builder().with_batch_exporter(exporter);
            (builder.with_resource(resource).build(), endpoint.to_string())
        }
        Protocol::HttpProtobuf => {
            let url = traces_url(endpoint);
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url.clone())
                .build()
                .map_err(|e| refused(e.to_string()))?;
            let builder = SdkTracerProvider::builder().with_batch_exporter(exporter);
            (builder.with_resource(resource).build(), url)
        }
    };
    let tracer = BoxedTracer::new(Box::new(provider.tracer("lumen")));
    if PROVIDER.set(provider).is_ok() {
        let _ = TRACER.set(tracer);
        tracing::info!(%url, ?protocol, "exporting OpenTelemetry traces over OTLP");
    }
    Ok(())
}

/// The tracer, when tracing is on.
pub fn tracer() -> Option<&'static BoxedTracer> {
    TRACER.get()
}

/// Exports the spans still pending and stops the exporter (no-op when tracing is off).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "flushing the last OpenTelemetry spans failed");
    }
}

/// Reads a W3C trace context out of headers (`get` returns a header's value); the empty context
/// when tracing is off or there is none.
pub fn extract(get: impl Fn(&str) -> Option<String>) -> Context {
    /// `traceparent` and `tracestate`, the only headers the propagator reads.
    struct Found([(&'static str, Option<String>); 2]);
    impl Extractor for Found {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| v.as_deref())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }
    if tracer().is_none() {
        return Context::new();
    }
    let found = Found([("traceparent", get("traceparent")), ("tracestate", get("tracestate"))]);
    TraceContextPropagator::new().extract(&found)
}

/// The trace context sent by an HTTP client.
pub fn extract_http(headers: &axum::http::HeaderMap) -> Context {
    extract(|key| headers.get(key).and_then(|v| v.to_str().ok()).map(str::to_string))
}

/// The trace context the head sent with a gRPC request.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    extract(|key| metadata.get(key).and_then(|v| v.to_str().ok()).map(str::to_string))
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`) into gRPC request metadata; nothing
/// when tracing is off or `cx` has no valid span.
pub fn inject(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    struct Put<'a>(&'a mut tonic::metadata::MetadataMap);
    impl Injector for Put<'_> {
        fn set(&mut self, key: &str, value: String) {
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
            if let (Ok(key), Ok(value)) = (key, value.parse()) {
                self.0.insert(key, value);
            }
        }
    }
    if tracer().is_none() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut Put(metadata));
}

#[cfg(test)]
mod tests {
    use super::{Protocol, check_protocol, traces_url};

    #[test]
    fn grpc_is_the_default_and_http_protobuf_the_other_protocol() {
        let variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
        assert_eq!(check_protocol(variable, None).unwrap(), Protocol::Grpc);
        assert_eq!(check_protocol(variable, Some("")).unwrap(), Protocol::Grpc);
        assert_eq!(check_protocol(variable, Some("grpc")).unwrap(), Protocol::Grpc);
        assert_eq!(check_protocol(variable, Some("http/protobuf")).unwrap(), Protocol::HttpProtobuf);
        let error = check_protocol(variable, Some("http/json")).unwrap_err().to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json"), "{error}");
        assert!(check_protocol(variable, Some("thrift")).is_err());
    }

    #[test]
    fn an_endpoint_without_a_path_gets_otlps_traces_path() {
        assert_eq!(traces_url("http://collector:4318"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/v1/traces"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("https://otel.example/custom/path"), "https://otel.example/custom/path");
    }
}
