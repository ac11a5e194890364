//! A request's life over HTTP: a client that goes away aborts its backend stream, a queued
//! stream keeps the connection alive and runs when a slot frees.

mod api_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use api_support::*;
use lumen_head::api::ApiConfig;
use lumen_head::api::generate::admission::AdmissionLimits;
use serde_json::json;

/// Reads body chunks for `window`, returning what arrived.
async fn read_for(response: &mut reqwest::Response, window: Duration) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, response.chunk()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

/// Reads until `needle` arrives (or 5 s pass).
async fn read_until(response: &mut reqwest::Response, needle: &str) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !text.contains(needle) {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    text
}

fn one_slot(keep_alive_ms: u64) -> ApiConfig {
    ApiConfig {
        admission: AdmissionLimits { max_in_flight: 1, max_queued: 8 },
        keep_alive: Duration::from_millis(keep_alive_ms),
        ..ApiConfig::default()
    }
}

#[tokio::test]
async fn a_disconnected_stream_drops_the_backend_stream_and_frees_its_slot() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(1), delta(0, "tick"), Item::Hang]));
    let server = serve(backend.clone(), one_slot(15_000)).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true});
    let mut response = server.post("/v1/chat/completions", body.clone()).await;
    let seen = read_until(&mut response, "tick").await;
    assert!(seen.contains("tick"), "{seen}");
    assert_eq!(backend.dropped(), 0, "the stream is alive while the client reads");
    drop(response);
    assert!(backend.wait_dropped(1).await, "dropping the client connection must drop the backend stream");

    // The slot is free again: the next request is sent to the backend at once.
    backend.script(hello_world);
    let (status, sse) = stream(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    assert_eq!(joined(&sse.chunks, 0, "/delta/content"), "Hello world");
}

#[tokio::test]
async fn a_disconnected_non_streaming_request_drops_the_backend_stream() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(1), Item::Hang]));
    let server = serve(backend.clone(), ApiConfig::default()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let sent = client.post(server.at("/v1/completions")).json(&json!({"model": "m", "prompt": "x"})).send().await;
    assert!(sent.is_err(), "the backend never finishes, so the client times out");
    assert!(backend.wait_dropped(1).await, "the abandoned request must drop its backend stream");
}

#[tokio::test]
async fn a_queued_stream_sends_keep_alives_then_runs_when_the_slot_frees() {
    let backend = FakeBackend::new(&["m"]);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    backend.script(move |request| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => Ok(vec![started(1), delta(0, "first"), Item::Hang]),
        _ => hello_world(request),
    });
    let server = serve(backend.clone(), one_slot(50)).await;
    let body = json!({"model": "m", "prompt": "x", "stream": true});
    let mut first = server.post("/v1/completions", body.clone()).await;
    assert!(read_until(&mut first, "first").await.contains("first"));

    let mut second = server.post("/v1/completions", body).await;
    assert_eq!(second.status(), 200);
    let waiting = read_for(&mut second, Duration::from_millis(400)).await;
    let sse = parse_sse(&waiting);
    assert!(sse.keep_alives >= 2, "keep-alives while queued: {waiting:?}");
    assert!(sse.chunks.is_empty() && !sse.done, "nothing generated while queued: {waiting:?}");
    assert_eq!(backend.requests().len(), 1, "the queued request waits before the backend");

    drop(first);
    let rest = read_until(&mut second, "[DONE]").await;
    let sse = parse_sse(&rest);
    assert_eq!(joined(&sse.chunks, 0, "/text"), "Hello world");
    assert!(sse.done);
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_never_reaches_the_backend() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(1), delta(0, "first"), Item::Hang]));
    let server = serve(backend.clone(), one_slot(50)).await;
    let body = json!({"model": "m", "prompt": "x", "stream": true});
    let mut first = server.post("/v1/completions", body.clone()).await;
    assert!(read_until(&mut first, "first").await.contains("first"));
    let mut second = server.post("/v1/completions", body).await;
    read_for(&mut second, Duration::from_millis(120)).await;
    drop(second);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(first);
    assert!(backend.wait_dropped(1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.requests().len(), 1, "the abandoned queued request was never sent");
}
