//! `lumen serve` end to end: a real process on ephemeral ports, the real SmolLM2 model, spoken to
//! over HTTP the way OpenAI clients do.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use lumen_proto::v1 as pb;
use serde_json::{Value, json};
use support::{Lumen, model_path, read_sse, serve_flags, worker_flags};

async fn worker_running(lumen: &Lumen) -> u32 {
    let mut client = pb::worker_client::WorkerClient::connect(lumen.url("worker")).await.expect("worker gRPC");
    let stats = client.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
    stats.replicas.iter().map(|r| r.running + r.waiting).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_get_completions_streams_and_errors_in_openais_shape() {
    let lumen = Lumen::start(&serve_flags(&["--api-key", "sekret"]));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let api = lumen.url("api");
    let auth = |rb: reqwest::RequestBuilder| rb.bearer_auth("sekret");

    // Models.
    let models: Value = auth(http.get(format!("{api}/v1/models"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(models["data"][0]["max_model_len"], 1024);

    // A chat completion.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8,
                      "ignore_eos": true});
    let r: Value =
        auth(http.post(format!("{api}/v1/chat/completions")).json(&body)).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["usage"]["completion_tokens"], 8);
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // Streaming chat with usage: role first, [DONE] last, usage matches the content chunks.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Count to five"}], "max_tokens": 12,
                      "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let resp = auth(http.post(format!("{api}/v1/chat/completions")).json(&body)).send().await.unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (events, done) = read_sse(resp).await;
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = events.last().unwrap()["usage"].clone();
    assert_eq!(usage["completion_tokens"], 12);
    assert!(events.iter().any(|e| e["choices"][0]["finish_reason"] == "length"));

    // Completions from token ids, n = 2, with logprobs.
    let body = json!({"model": "smol", "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 4, "n": 2, "logprobs": 2, "temperature": 0.8, "seed": 1});
    let r: Value =
        auth(http.post(format!("{api}/v1/completions")).json(&body)).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert_eq!(r["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(r["usage"]["prompt_tokens"], 5);

    // Errors: OpenAI's body and the right status.
    let bad = auth(
        http.post(format!("{api}/v1/chat/completions"))
            .json(&json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "temperature": -1})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let err: Value = bad.json().await.unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert_eq!(err["error"]["param"], "temperature");
    let unknown = auth(
        http.post(format!("{api}/v1/chat/completions"))
            .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let too_long = auth(
        http.post(format!("{api}/v1/completions")).json(&json!({"model": "smol", "prompt": "hi", "max_tokens": 5000})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(too_long.status(), 400);
    let no_key = http
        .post(format!("{api}/v1/chat/completions"))
        .json(&json!({"model": "smol", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let not_json =
        auth(http.post(format!("{api}/v1/completions")).header("content-type", "application/json").body("{nope"))
            .send()
            .await
            .unwrap();
    assert_eq!(not_json.status(), 400);

    // Probes and metrics.
    assert_eq!(http.get(format!("{api}/-/healthz")).send().await.unwrap().text().await.unwrap(), "success");
    let dashboard = lumen.url("dashboard");
    assert_eq!(http.get(format!("{dashboard}/api/gcs_healthz")).send().await.unwrap().text().await.unwrap(), "success");
    let metrics = http.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("lumen_serve_num_router_requests_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_aborts_its_request_on_the_worker() {
    let lumen = Lumen::start(&serve_flags(&[]));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let body =
        json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": true, "stream": true});
    let resp = http.post(format!("{}/v1/completions", lumen.url("api"))).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let chunk = stream.next().await.expect("stream open").expect("chunk");
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    assert_eq!(worker_running(&lumen).await, 1, "the request is running");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(3);
    while worker_running(&lumen).await != 0 {
        assert!(Instant::now() < deadline, "the worker kept generating for a gone client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut lumen = Lumen::start(&serve_flags(&[]));
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let body =
        json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": true, "stream": true});
    let resp = http.post(format!("{}/v1/completions", lumen.url("api"))).json(&body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.expect("first chunk").expect("chunk");
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    lumen.terminate();
    let mut rest = String::new();
    while let Some(chunk) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.expect("the stream ends cleanly")));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "the in-flight request completes: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    assert_eq!(lumen.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_and_a_separate_worker_process_serve_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        max_ongoing_requests: 8\n        model:\n          source: {}\n          served_model_name: smol\n          threads: 2\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
            model_path()
        ),
    )
    .unwrap();
    let mut head_args =
        vec!["head".to_string(), "--config".into(), config.display().to_string(), "--join-token".into(), "t0k".into()];
    head_args.extend(support::head_flags());
    let head = Lumen::start(&head_args);
    let http = reqwest::Client::new();
    // No worker yet: the model is known but not servable.
    let r = http
        .post(format!("{}/v1/completions", head.url("api")))
        .json(&json!({"model": "smol", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let mut worker_args = worker_flags(&head.url("grpc"), "w1");
    worker_args.extend(["--join-token".to_string(), "t0k".into()]);
    let worker = Lumen::start(&worker_args);
    head.wait_healthy(&http).await;
    let r: Value = http
        .post(format!("{}/v1/completions", head.url("api")))
        .json(&json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 3, "ignore_eos": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 3);
    // The worker goes away: after missed heartbeats the model has no live replica.
    drop(worker);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = http.get(format!("{}/health", head.url("api"))).send().await.unwrap().status();
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "the head kept routing to a dead worker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_line_comes_once_the_model_serves() {
    let lumen = Lumen::start(&serve_flags(&[]));
    let http = reqwest::Client::new();
    // No readiness polling: a client that starts on the ready line is served at once.
    let health = http.get(format!("{}/health", lumen.url("api"))).send().await.unwrap();
    assert_eq!(health.status(), 200, "/health right after the ready line");
    let body = json!({"model": "smol", "prompt": "Hello", "max_tokens": 2, "ignore_eos": true});
    let r = http.post(format!("{}/v1/completions", lumen.url("api"))).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}
