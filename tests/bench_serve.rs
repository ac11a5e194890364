//! `lumen bench serve` against a fake OpenAI-compatible server on 127.0.0.1 that streams scripted
//! SSE chunks with known delays: request and token counts, TTFT/ITL that reflect the delays,
//! failures reported with their status and body, and the concurrency limit as the server sees it.

// The root crate is a binary, so its bench modules are compiled into this test directly.
#![allow(dead_code)]
#[path = "../src/bench/datasets.rs"]
mod datasets;
#[path = "../src/bench/report.rs"]
mod report;
#[path = "../src/bench/serve.rs"]
mod serve;
#[path = "../src/bench/sse.rs"]
mod sse;
#[path = "../src/bench/structured.rs"]
mod structured;
#[path = "../src/bench/tenants.rs"]
mod tenants;
#[path = "../src/bench/workload.rs"]
mod workload;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};

/// What the fake server streams for each request.
#[derive(Clone, Default)]
struct Script {
    /// Delay before the first text chunk (an empty preamble chunk goes out at once).
    first: Duration,
    /// Delay before each further text chunk.
    gap: Duration,
    /// Send a final `usage` chunk.
    usage: bool,
    /// Send one text chunk fewer than `max_tokens` (two tokens in one chunk); usage still says all.
    merge_two: bool,
    /// Request indexes (in arrival order, from 0) answered with HTTP 503.
    fail: Vec<usize>,
    /// Request indexes whose stream stops after the text, with no finish_reason and no [DONE].
    cut: Vec<usize>,
}

#[derive(Default)]
struct Fake {
    script: Script,
    next: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    model_lists: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<Option<String>>>,
}

/// Counts a streaming request as in flight until its stream is finished or dropped.
struct InFlight(Arc<Fake>);

impl InFlight {
    fn enter(fake: &Arc<Fake>) -> InFlight {
        let now = fake.in_flight.fetch_add(1, SeqCst) + 1;
        fake.max_in_flight.fetch_max(now, SeqCst);
        InFlight(Arc::clone(fake))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

async fn start(script: Script) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake { script, ..Default::default() });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(complete))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fake)
}

async fn models(State(fake): State<Arc<Fake>>) -> Json<Value> {
    fake.model_lists.fetch_add(1, SeqCst);
    Json(json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
}

async fn complete(State(fake): State<Arc<Fake>>, uri: Uri, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let index = fake.next.fetch_add(1, SeqCst);
    fake.bodies.lock().unwrap().push(body.clone());
    let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_string());
    fake.auth.lock().unwrap().push(auth);
    if fake.script.fail.contains(&index) {
        return (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":{"message":"overloaded"}}"#).into_response();
    }
    let guard = InFlight::enter(&fake);
    let events = scripted_events(&fake.script, index, uri.path().contains("chat"), &body);
    let stream = futures::stream::unfold((events.into_iter(), guard), |(mut events, guard)| async move {
        let (delay, data) = events.next()?;
        tokio::time::sleep(delay).await;
        Some((Ok::<_, Infallible>(Bytes::from(format!("data: {data}\n\n"))), (events, guard)))
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

/// The (delay, data) events of one response.
fn scripted_events(script: &Script, index: usize, chat: bool, body: &Value) -> Vec<(Duration, String)> {
    let max_tokens = body["max_tokens"].as_u64().unwrap() as usize;
    let prompt_tokens = body["prompt"].as_array().map_or(7, Vec::len);
    let text = |t: &str| match chat {
        true => json!({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}),
        false => json!({"choices": [{"index": 0, "text": t, "finish_reason": null}]}),
    };
    let mut events = vec![(Duration::ZERO, text("").to_string())];
    let chunks = if script.merge_two { max_tokens - 1 } else { max_tokens };
    for i in 0..chunks {
        let delay = if i == 0 { script.first } else { script.gap };
        events.push((delay, text(&format!(" t{i}")).to_string()));
    }
    if script.cut.contains(&index) {
        return events;
    }
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                       "total_tokens": prompt_tokens + max_tokens});
    let mut last = text("");
    last["choices"][0]["finish_reason"] = json!("length");
    if script.usage && !chat {
        last["usage"] = usage.clone();
    }
    events.push((Duration::ZERO, last.to_string()));
    if script.usage && chat {
        events.push((Duration::ZERO, json!({"choices": [], "usage": usage}).to_string()));
    }
    events.push((Duration::ZERO, "[DONE]".to_string()));
    events
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: serve::ServeArgs,
}

fn args(base: &str, flags: &[&str]) -> serve::ServeArgs {
    Cli::parse_from(["bench", "--base-url", base].iter().chain(flags)).args
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test]
async fn reports_usage_token_counts_and_latencies_that_reflect_the_scripted_delays() {
    let script = Script {
        first: Duration::from_millis(80),
        gap: Duration::from_millis(30),
        usage: true,
        merge_two: true,
        ..Default::default()
    };
    let (base, fake) = start(script.clone()).await;
    let flags = [
        "--input-len",
        "32",
        "--output-len",
        "5",
        "--num-prompts",
        "6",
        "--concurrency",
        "2",
        "--api-key",
        "sekret",
        "--engine-label",
        "fake",
    ];
    let report = serve::run(args(&base, &flags)).await.unwrap();

    assert_eq!((report.engine.as_str(), report.num_prompts, report.failed), ("fake", 6, 0));
    // Usage says 5 tokens though only 4 chunks carried text.
    assert_eq!(report.total_output_tokens, 30);
    assert_eq!(report.total_prompt_tokens, 6 * 32);
    // TTFT counts from the send to the first chunk with text, not the empty preamble.
    let (first, gap) = (ms(script.first), ms(script.gap));
    assert!(report.ttft_ms.p50 >= first && report.ttft_ms.p99 < first + 500.0, "{:?}", report.ttft_ms);
    // Client-side gaps jitter around the server's (a late chunk shortens the next gap).
    assert!(report.itl_ms.p50 >= 0.7 * gap && report.itl_ms.p99 < gap + 300.0, "{:?}", report.itl_ms);
    // Three gaps between four text chunks spread over the remaining four tokens.
    assert!(report.tpot_ms.mean >= 0.7 * 3.0 * gap / 4.0, "{:?}", report.tpot_ms);

    let bodies = fake.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 7, "one warm-up request, then the run");
    assert_eq!(fake.model_lists.load(SeqCst), 1);
    let mut firsts = HashSet::new();
    for body in &bodies {
        assert_eq!(body["model"], "fake-model");
        assert_eq!((body["ignore_eos"].clone(), body["stream"].clone()), (json!(true), json!(true)));
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["temperature"], 0.0);
        let prompt = body["prompt"].as_array().unwrap();
        assert_eq!(prompt.len(), 32);
        assert!(prompt.iter().all(|t| (100..32000).contains(&t.as_u64().unwrap())));
        assert!(firsts.insert(prompt[0].as_u64().unwrap()), "two prompts share a first token");
    }
    assert!(bodies[1..].iter().all(|b| b["max_tokens"] == 5));
    assert!(fake.auth.lock().unwrap().iter().all(|a| a.as_deref() == Some("Bearer sekret")));
}

#[tokio::test]
async fn concurrency_limit_caps_requests_in_flight_at_the_server() {
    let script =
        Script { first: Duration::from_millis(40), gap: Duration::from_millis(10), usage: true, ..Default::default() };
    let (base, fake) = start(script.clone()).await;
    let flags = ["--output-len", "4", "--num-prompts", "9", "--concurrency", "3", "--warmup", "0"];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    assert_eq!((report.num_prompts, report.concurrency), (9, 3));
    assert_eq!(fake.max_in_flight.load(SeqCst), 3);

    // Without a limit and at an infinite rate every request is in flight at once.
    let (base, fake) = start(script).await;
    let flags = ["--output-len", "4", "--num-prompts", "5", "--warmup", "0"];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    assert_eq!((report.num_prompts, report.concurrency), (5, 5));
    assert_eq!(fake.max_in_flight.load(SeqCst), 5);
}

#[tokio::test]
async fn http_errors_and_cut_streams_are_reported_as_failures() {
    let script = Script { usage: true, fail: vec![1, 3], cut: vec![4], ..Default::default() };
    let (base, _fake) = start(script).await;
    let flags = ["--output-len", "3", "--num-prompts", "6", "--concurrency", "1", "--warmup", "0"];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    assert_eq!((report.num_prompts, report.failed), (3, 3));
    assert_eq!(report.total_output_tokens, 9, "failed requests add no tokens");
    let http: Vec<_> = report.failures.iter().filter(|f| f.contains("HTTP 503") && f.contains("overloaded")).collect();
    assert_eq!(http.len(), 2, "{:?}", report.failures);
    assert!(report.failures.iter().any(|f| f.contains("without [DONE]")), "{:?}", report.failures);
}

#[tokio::test]
async fn chat_without_usage_counts_text_chunks_and_uses_the_given_model() {
    let script = Script { gap: Duration::from_millis(5), ..Default::default() };
    let (base, fake) = start(script).await;
    let flags = [
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        "m1",
        "--input-len",
        "20",
        "--output-len",
        "6",
        "--num-prompts",
        "3",
    ];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    assert_eq!((report.num_prompts, report.total_output_tokens), (3, 18));
    assert_eq!(report.total_prompt_tokens, 3 * 20, "without usage the intended length is reported");
    assert_eq!(report.engine, "m1");
    assert_eq!(fake.model_lists.load(SeqCst), 0);
    let bodies = fake.bodies.lock().unwrap().clone();
    assert!(bodies.iter().all(|b| b["model"] == "m1" && b.get("prompt").is_none()));
    let text = bodies[1]["messages"][0]["content"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 20);
}

#[tokio::test]
async fn failed_warm_up_aborts_the_run_naming_the_status() {
    let (base, _fake) = start(Script { fail: vec![0], ..Default::default() }).await;
    let err = serve::run(args(&base, &["--num-prompts", "2"])).await.unwrap_err();
    assert!(format!("{err:#}").contains("HTTP 503"), "{err:#}");
}

#[tokio::test]
async fn poisson_arrivals_take_at_least_the_scheduled_gaps() {
    let (base, _fake) = start(Script { usage: true, ..Default::default() }).await;
    let flags = ["--output-len", "2", "--num-prompts", "8", "--request-rate", "40", "--seed", "3", "--warmup", "0"];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    let mut arrivals = workload::Arrivals::new(40.0, 3);
    let scheduled: f64 = (1..8).map(|_| arrivals.next_gap().as_secs_f64()).sum();
    assert_eq!(report.request_rate, Some(40.0));
    assert!(report.duration_s >= scheduled, "{} < {scheduled}", report.duration_s);
}

#[tokio::test]
async fn unreachable_server_fails_model_discovery_with_the_cause() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = serve::run(args(&base, &["--num-prompts", "1"])).await.unwrap_err();
    assert!(format!("{err:#}").contains("/v1/models"), "{err:#}");
}

#[tokio::test]
async fn tenants_send_with_their_own_keys_in_proportion_to_their_rates() {
    let (base, fake) = start(Script { usage: true, ..Default::default() }).await;
    let flags = [
        "--output-len",
        "3",
        "--num-prompts",
        "22",
        "--tenant",
        "heavy:sk-heavy:200",
        "--tenant",
        "light:sk-li:ght:20",
    ];
    let report = serve::run(args(&base, &flags)).await.unwrap();
    let auth = fake.auth.lock().unwrap().clone();
    let with = |key: &str| auth.iter().filter(|a| a.as_deref() == Some(&format!("Bearer {key}"))).count();
    assert_eq!(auth.len(), 23, "one warm-up, then the run");
    assert_eq!(auth[0].as_deref(), Some("Bearer sk-heavy"), "the warm-up goes as the first tenant");
    assert_eq!((with("sk-heavy"), with("sk-li:ght")), (21, 2));
    assert_eq!(report.num_prompts, 22);
    assert_eq!(report.request_rate, Some(220.0));
    let tenants: Vec<(&str, usize, usize)> =
        report.tenants.iter().map(|t| (t.tenant.as_str(), t.num_requests, t.total_output_tokens)).collect();
    assert_eq!(tenants, [("heavy", 20, 60), ("light", 2, 6)]);
    assert!((report.tenants[0].throughput_share - 60.0 / 66.0).abs() < 1e-9);
    assert!(report.tenants.iter().all(|t| t.failed == 0 && t.ttft_ms.p99 > 0.0));
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"throughput_share\"") && !json.contains("sk-"), "{json}");
    assert!(report.table().contains("per tenant"));
}

#[tokio::test]
async fn a_run_without_tenants_keeps_its_json_shape() {
    let (base, _fake) = start(Script { usage: true, ..Default::default() }).await;
    let report = serve::run(args(&base, &["--output-len", "2", "--num-prompts", "2"])).await.unwrap();
    assert!(serde_json::to_value(&report).unwrap().get("tenants").is_none());
    let twice = ["--num-prompts", "4", "--tenant", "a:k1:1", "--tenant", "a:k2:1"];
    assert!(serve::run(args(&base, &twice)).await.unwrap_err().to_string().contains("twice"));
}

#[tokio::test]
async fn save_detailed_keeps_every_request_with_its_tenant_timings_or_error() {
    let script = Script { gap: Duration::from_millis(5), usage: true, fail: vec![3], ..Default::default() };
    let (base, _fake) = start(script).await;
    let flags = ["--output-len", "4", "--num-prompts", "11", "--tenant", "heavy:k1:200", "--tenant", "light:k2:20"];
    let plain = serve::run(args(&base, &flags)).await.unwrap();
    assert!(serde_json::to_value(&plain).unwrap().get("requests").is_none(), "only with --save-detailed");

    let (base, _fake) =
        start(Script { gap: Duration::from_millis(5), usage: true, fail: vec![3], ..Default::default() }).await;
    let detailed = [&flags[..], &["--save-detailed"]].concat();
    let report = serve::run(args(&base, &detailed)).await.unwrap();
    let requests = report.requests.as_ref().expect("--save-detailed keeps the requests");
    assert_eq!(requests.len(), 11, "every planned request, the failed one too");
    let failed: Vec<_> = requests.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error.as_deref().unwrap().contains("HTTP 503"), "{:?}", failed[0]);
    assert!(failed[0].ttft_ms.is_none() && failed[0].e2e_ms.is_none(), "no timings for a failure");
    let by = |name: &str| requests.iter().filter(|r| r.tenant.as_deref() == Some(name)).count();
    assert_eq!((by("heavy"), by("light")), (10, 1));
    for r in requests.iter().filter(|r| r.error.is_none()) {
        assert_eq!(r.output_tokens, 4);
        assert_eq!(r.itl_ms.len(), 3, "a gap between each two of the four chunks: {r:?}");
        let (ttft, e2e) = (r.ttft_ms.unwrap(), r.e2e_ms.unwrap());
        assert!(r.itl_ms.iter().all(|&g| g >= 0.0) && ttft > 0.0 && ttft <= e2e, "{r:?}");
    }
    // Every request, the failed one too, was sent within the run.
    let run_ms = report.duration_s * 1e3;
    assert!(requests.iter().all(|r| r.start_ms >= 0.0 && r.start_ms <= run_ms), "{requests:?}");
    assert!(failed[0].start_ms > 0.0, "the failure keeps its send time: {:?}", failed[0]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["requests"].as_array().unwrap().len(), 11);
}
