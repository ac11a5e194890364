//! OpenTelemetry traces (`--otlp-traces-endpoint`) from a real `lumen serve` to an OTLP/HTTP
//! receiver this test runs (an axum route decoding `ExportTraceServiceRequest`, with
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`): a chat request
//! sent with a client's `traceparent` yields the head's `llm_request` span as the client span's
//! child, the worker's `llm_request` span as the head span's child (the context crossed gRPC),
//! and the worker's `queue` / `prefill` / `decode` spans under it, all in the client's trace,
//! with vLLM's `gen_ai.*` attributes equal to what the response reported; no prompt text and no
//! API key in any span. The spans arrive by the time the server exits on SIGTERM (it flushes).
//! With `lumen head` and `lumen worker` as separate processes, exporting over OTLP/gRPC (the
//! default protocol, as vLLM's) to a tonic `TraceService` this test runs, each exports its own
//! spans (its own service name) and a streamed request without `traceparent` is a root span at
//! the head with the worker's span under it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use support::cluster::{Extra, start_cluster};
use support::{Lumen, read_sse, serve_flags};

/// The spans received so far, with their resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

async fn export(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    record(&received, request);
    ExportTraceServiceResponse::default().encode_to_vec()
}

/// Keeps the spans of one export request.
fn record(received: &Received, request: ExportTraceServiceRequest) {
    let mut received = received.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.clone()? {
                Any::StringValue(name) => Some(name),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            received.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
        }
    }
}

/// An OTLP/gRPC collector's trace service.
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on 127.0.0.1: its URL and what it received.
async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(GrpcCollector(received.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (url, received)
}

/// An OTLP/HTTP receiver on 127.0.0.1: its base URL (no path) and what it received.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new().route("/v1/traces", post(export)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

fn attribute(span: &Span, key: &str) -> Option<Any> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Any::IntValue(v)) => v,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn float(span: &Span, key: &str) -> f64 {
    match attribute(span, key) {
        Some(Any::DoubleValue(v)) => v,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn string(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(Any::StringValue(v)) => v,
        other => panic!("{key} of {}: {other:?}", span.name),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_request_is_one_trace_from_the_client_through_the_head_to_the_worker() {
    let (endpoint, received) = receiver().await;
    let flags = serve_flags(&["--otlp-traces-endpoint", &endpoint, "--api-key", "sekret-otlp"]);
    let http_protobuf = [("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")];
    let mut lumen = Lumen::start_with(&flags, std::process::Stdio::inherit(), &http_protobuf);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;

    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let prompt = "Name three colours of the rainbow, zebra-otlp.";
    let response: serde_json::Value = http
        .post(format!("{}/v1/chat/completions", lumen.url("api")))
        .bearer_auth("sekret-otlp")
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(&json!({"model": "smol", "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": 8, "temperature": 0.5, "top_p": 0.75}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let usage = &response["usage"];

    // The server flushes its spans on the way out.
    lumen.terminate();
    assert_eq!(lumen.wait_exit(Duration::from_secs(60)), Some(0), "lumen serve exits cleanly");
    let spans = received.lock().unwrap().clone();
    let everything = format!("{spans:?}");
    assert!(!everything.contains("zebra-otlp"), "no prompt text in spans");
    assert!(!everything.contains("sekret-otlp"), "no API key in spans");

    let in_trace: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| hex(&s.trace_id) == client_trace).collect();
    let requests: Vec<&Span> = in_trace.iter().copied().filter(|s| s.name == "llm_request").collect();
    let head = requests
        .iter()
        .find(|s| hex(&s.parent_span_id) == client_span)
        .unwrap_or_else(|| panic!("a head span under the client's span in {in_trace:#?}"));
    assert_eq!(string(head, "gen_ai.request.model"), "smol");
    assert_eq!(string(head, "gen_ai.response.model"), "smol");
    assert_eq!(string(head, "gen_ai.request.id"), response["id"].as_str().unwrap());
    assert_eq!(int(head, "gen_ai.request.max_tokens"), 8);
    assert_eq!(float(head, "gen_ai.request.temperature"), 0.5);
    assert_eq!(float(head, "gen_ai.request.top_p"), 0.75);
    assert_eq!(int(head, "gen_ai.usage.prompt_tokens"), usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(int(head, "gen_ai.usage.completion_tokens"), usage["completion_tokens"].as_i64().unwrap());
    let (ttft, e2e) = (float(head, "gen_ai.latency.time_to_first_token"), float(head, "gen_ai.latency.e2e"));
    assert!(0.0 < ttft && ttft <= e2e, "ttft {ttft} within e2e {e2e}");
    assert!(float(head, "gen_ai.latency.time_in_queue") <= ttft);
    let events: Vec<&str> = head.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(events, ["admitted", "routed", "first_token"]);

    let worker = requests
        .iter()
        .find(|s| s.parent_span_id == head.span_id)
        .unwrap_or_else(|| panic!("a worker span under the head's in {in_trace:#?}"));
    assert_eq!(string(worker, "gen_ai.request.id"), response["id"].as_str().unwrap());
    assert_eq!(int(worker, "gen_ai.usage.prompt_tokens"), usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(int(worker, "gen_ai.usage.completion_tokens"), usage["completion_tokens"].as_i64().unwrap());
    assert!(float(worker, "gen_ai.latency.e2e") <= e2e);
    let mut phases: Vec<&str> =
        in_trace.iter().filter(|s| s.parent_span_id == worker.span_id).map(|s| s.name.as_str()).collect();
    phases.sort_unstable();
    assert_eq!(phases, ["decode", "prefill", "queue"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_head_and_worker_processes_export_one_trace_of_a_streamed_request() {
    let (endpoint, received) = grpc_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let otlp = ["--otlp-traces-endpoint", endpoint.as_str()];
    let (mut head, mut workers) =
        start_cluster(dir.path(), &["w1"], Extra { head: &otlp, worker: &otlp, model: &[] }).await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", head.url("api")))
        .json(&json!({"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
                      "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (events, done) = read_sse(response).await;
    assert!(done);
    let usage =
        events.iter().rev().find_map(|e| e.get("usage").filter(|u| !u.is_null())).expect("a usage chunk").clone();
    let id = events[0]["id"].as_str().unwrap().to_string();

    head.terminate();
    assert_eq!(head.wait_exit(Duration::from_secs(60)), Some(0), "the head exits cleanly");
    let worker = workers.get_mut("w1").unwrap();
    worker.terminate();
    assert_eq!(worker.wait_exit(Duration::from_secs(60)), Some(0), "the worker exits cleanly");

    let spans = received.lock().unwrap().clone();
    let find = |service: &str| {
        spans
            .iter()
            .find(|(s, span)| s == service && span.name == "llm_request" && string(span, "gen_ai.request.id") == id)
            .map(|(_, span)| span.clone())
            .unwrap_or_else(|| panic!("a {service} span of {id} in {spans:#?}"))
    };
    let (head_span, worker_span) = (find("lumen-head"), find("lumen-worker"));
    assert!(head_span.parent_span_id.is_empty(), "no traceparent: the head's span is a root");
    assert_eq!(worker_span.trace_id, head_span.trace_id);
    assert_eq!(worker_span.parent_span_id, head_span.span_id);
    for span in [&head_span, &worker_span] {
        assert_eq!(int(span, "gen_ai.usage.prompt_tokens"), usage["prompt_tokens"].as_i64().unwrap());
        assert_eq!(int(span, "gen_ai.usage.completion_tokens"), usage["completion_tokens"].as_i64().unwrap());
    }
    assert_eq!(int(&head_span, "gen_ai.request.max_tokens"), 6);
}
