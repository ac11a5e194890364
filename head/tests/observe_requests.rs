//! The dashboard's request log and time series over HTTP, with the scripted fake backend: every
//! chat and completion request is recorded when it ends (answered, refused, failed mid-stream or
//! abandoned), prompts only with `log_requests`, and the `/v1` routes mounted next to the data
//! (as on port 8265) share the API's key check and log.

mod api_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api_support::*;
use lumen_head::api::edge::errors::ApiError;
use lumen_head::api::{ApiConfig, ApiState, v1_router};
use lumen_head::backend::BackendError;
use lumen_head::control::observe_api::{self, ObserveState};
use lumen_head::observe::history::Metrics;
use lumen_head::observe::{History, Sample};
use serde_json::{Value, json};

/// The dashboard's data and the `/v1` routes of `state`, served as the control server mounts them.
async fn serve_dashboard(state: &ApiState, history: Arc<History>) -> String {
    let observe = ObserveState { requests: state.request_log(), history };
    let app = observe_api::router(observe).merge(v1_router(state.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    url
}

fn history() -> Arc<History> {
    Arc::new(History::new(Duration::from_secs(2), Duration::from_secs(600)))
}

async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// The log's records, newest first, once it holds `count` (waits up to 5 s: streams are recorded
/// when the server drops their body, just after the client read it).
async fn records(dashboard: &str, count: usize) -> Vec<Value> {
    for _ in 0..500 {
        let (status, body) = get_json(&format!("{dashboard}/api/requests?limit=1000")).await;
        assert_eq!(status, 200);
        let requests = body["requests"].as_array().cloned().expect("requests");
        if requests.len() >= count {
            return requests;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the log never held {count} records");
}

fn chat(content: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn answered_requests_are_recorded_newest_first_with_the_tokens_served() {
    let (_backend, server) = serve_default().await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let (status, body) = server.post_json("/v1/chat/completions", chat("hi")).await;
    assert_eq!(status, 200);
    let (status, sse) =
        stream(&server, "/v1/completions", json!({"model": "m", "prompt": ["a", "b"], "n": 2, "stream": true})).await;
    assert_eq!((status, sse.done), (200, true));

    let log = records(&dashboard, 2).await;
    let (completion, chat) = (&log[0], &log[1]);
    assert_eq!(chat["id"], body["id"], "the record carries the id the client saw");
    assert_eq!(chat["route"], "chat");
    assert_eq!(chat["model"], "m");
    assert_eq!(chat["stream"], false);
    assert_eq!(chat["status"], 200);
    assert_eq!((chat["prompt_tokens"].clone(), chat["completion_tokens"].clone()), (json!(5), json!(2)));
    assert_eq!(chat["finish_reason"], "stop");
    assert_eq!(chat["error"], Value::Null);
    assert_eq!(chat["prompt"], Value::Null, "no prompt text without log_requests");
    assert!(chat["ttft_ms"].as_f64().is_some() && chat["itl_ms"].as_f64().is_some(), "{chat}");
    assert!(chat["duration_ms"].as_f64().unwrap() >= chat["ttft_ms"].as_f64().unwrap());
    assert_eq!(chat["deployment"], Value::Null, "the fake backend routes nowhere");

    assert_eq!(completion["route"], "completions");
    assert_eq!(completion["stream"], true);
    assert!(completion["id"].as_str().unwrap().starts_with("cmpl-"));
    // Two prompts of 5 tokens, four choices of 2 tokens: one record, the sums.
    assert_eq!(completion["prompt_tokens"], 10);
    assert_eq!(completion["completion_tokens"], 8);
    let usage_id = sse.chunks[0]["id"].clone();
    assert_eq!(completion["id"], usage_id);
}

#[tokio::test]
async fn refused_requests_are_recorded_with_their_status_and_message() {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend, ApiConfig { max_body_bytes: 4096, ..ApiConfig::default() }).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let (status, _) = server.post_json("/v1/chat/completions", json!({"model": "nope", "messages": []})).await;
    assert_eq!(status, 404);
    let (status, _) = server.post_json("/v1/completions", json!({"model": "m", "prompt": "x", "n": "two"})).await;
    assert_eq!(status, 400);
    let response = server
        .client
        .post(server.at("/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let big = json!({"model": "m", "prompt": "x".repeat(8192)});
    assert_eq!(server.post("/v1/completions", big).await.status(), 413);

    let log = records(&dashboard, 4).await;
    let statuses: Vec<u64> = log.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [413, 400, 400, 404]);
    let not_found = &log[3];
    assert_eq!(not_found["model"], "nope", "the model the client asked for");
    assert!(not_found["error"].as_str().unwrap().contains("does not exist"), "{not_found}");
    assert!(log[2]["error"].as_str().unwrap().contains('n'), "{}", log[2]);
    assert!(log[1]["error"].as_str().unwrap().contains("JSON"), "{}", log[1]);
    assert!(log.iter().all(|r| r["completion_tokens"] == 0 && r["finish_reason"].is_null()));
}

#[tokio::test]
async fn a_stream_that_fails_midway_is_recorded_with_the_failure() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| {
        Ok(vec![started(3), delta(0, "part"), Item::Fail(BackendError::Unavailable("worker lost".into()))])
    });
    let server = serve(backend, ApiConfig::default()).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let mut body = chat("x");
    body["stream"] = json!(true);
    let (status, sse) = stream(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "the failure came after the 200");
    assert!(sse.raw.contains("worker lost"));

    let record = &records(&dashboard, 1).await[0];
    assert_eq!(record["status"], ApiError::Unavailable(String::new()).status().as_u16());
    assert!(record["error"].as_str().unwrap().contains("worker lost"), "{record}");
    assert_eq!(record["completion_tokens"], 1, "the token that was streamed");
    assert_eq!(record["prompt_tokens"], 3);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_recorded_as_aborted() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(2), delta(0, "tick"), Item::Hang]));
    let server = serve(backend.clone(), ApiConfig::default()).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let mut body = chat("x");
    body["stream"] = json!(true);
    let mut response = server.post("/v1/chat/completions", body).await;
    let mut seen = String::new();
    while !seen.contains("tick") {
        let chunk = response.chunk().await.expect("read").expect("more");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    assert!(backend.wait_dropped(1).await);

    let record = &records(&dashboard, 1).await[0];
    assert_eq!(record["finish_reason"], "abort");
    assert_eq!(record["error"], "client disconnected");
    assert_eq!(record["completion_tokens"], 1);
    assert_eq!(record["stream"], true);
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_recorded() {
    let backend = FakeBackend::new(&["m"]);
    backend.script(|_| Ok(vec![started(1), Item::Hang]));
    let server = serve(backend.clone(), ApiConfig::default()).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    assert!(
        client.post(server.at("/v1/completions")).json(&json!({"model": "m", "prompt": "x"})).send().await.is_err()
    );
    assert!(backend.wait_dropped(1).await);

    let record = &records(&dashboard, 1).await[0];
    assert_eq!(record["status"], 499);
    assert_eq!(record["finish_reason"], "abort");
    assert_eq!(record["error"], "client disconnected");
}

#[tokio::test]
async fn prompts_are_kept_only_with_log_requests() {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend, ApiConfig { log_requests: true, ..ApiConfig::default() }).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let body = json!({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the secret question"}]});
    assert_eq!(server.post_json("/v1/chat/completions", body).await.0, 200);
    let long = "y".repeat(5000);
    assert_eq!(server.post_json("/v1/completions", json!({"model": "m", "prompt": long})).await.0, 200);

    let (_, answer) = get_json(&format!("{dashboard}/api/requests")).await;
    assert_eq!(answer["log_requests"], true);
    let log = answer["requests"].as_array().unwrap();
    assert_eq!(log[1]["prompt"], "the secret question", "chat keeps the last user message");
    let kept = log[0]["prompt"].as_str().unwrap();
    assert!(kept.starts_with("yyy") && kept.chars().count() <= 2001, "truncated to ~2000 chars");

    let (_, off) = serve_default().await;
    let dashboard = serve_dashboard(&off.state, history()).await;
    assert_eq!(off.post_json("/v1/chat/completions", chat("the secret question")).await.0, 200);
    let (_, answer) = get_json(&format!("{dashboard}/api/requests")).await;
    assert_eq!(answer["log_requests"], false);
    assert!(!answer.to_string().contains("secret"), "{answer}");
}

#[tokio::test]
async fn limit_caps_the_answer_and_a_bad_limit_is_refused() {
    let (_backend, server) = serve_default().await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    for _ in 0..3 {
        assert_eq!(server.post_json("/v1/completions", json!({"model": "m", "prompt": "x"})).await.0, 200);
    }
    let (_, answer) = get_json(&format!("{dashboard}/api/requests?limit=2")).await;
    assert_eq!(answer["requests"].as_array().unwrap().len(), 2);
    let (status, answer) = get_json(&format!("{dashboard}/api/requests?limit=lots")).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("limit"));
}

#[tokio::test]
async fn the_v1_routes_beside_the_dashboard_data_share_the_key_check_and_the_log() {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend, ApiConfig { api_keys: vec!["k".into()], ..ApiConfig::default() }).await;
    let dashboard = serve_dashboard(&server.state, history()).await;
    let client = reqwest::Client::new();
    let url = format!("{dashboard}/v1/chat/completions");
    let refused = client.post(&url).json(&chat("x")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let answered = client.post(&url).bearer_auth("k").json(&chat("x")).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    let body: Value = answered.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello world");
    let models = client.get(format!("{dashboard}/v1/models")).bearer_auth("k").send().await.unwrap();
    assert_eq!(models.status(), 200);

    let log = records(&dashboard, 2).await;
    assert_eq!(log.len(), 2, "/v1/models is not a generation request: {log:?}");
    assert_eq!((log[0]["status"].clone(), log[1]["status"].clone()), (json!(200), json!(401)));
    assert_eq!(server.state.request_log().recent(10).len(), 2, "one log for both ports");
}

#[tokio::test]
async fn timeseries_answers_the_samples_oldest_first_and_filters_by_seconds() {
    let (_backend, server) = serve_default().await;
    let history = history();
    let now = lumen_head::clock::unix_ms();
    for age_s in [100, 1] {
        history.push(Sample {
            unix_ms: now - age_s * 1000,
            total: Metrics { running: age_s, ..Metrics::default() },
            deployments: BTreeMap::new(),
            replicas: BTreeMap::new(),
        });
    }
    let dashboard = serve_dashboard(&server.state, history).await;
    let (status, all) = get_json(&format!("{dashboard}/api/timeseries")).await;
    assert_eq!(status, 200);
    assert_eq!(all["interval_s"], 2.0);
    assert_eq!(all["window_s"], 600);
    let samples = all["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0]["total"]["running"], 100, "oldest first");
    for key in ["requests_per_s", "kv_cache_usage", "prefix_cache_hit_rate", "ttft_ms", "itl_ms"] {
        assert!(samples[0]["total"].get(key).is_some(), "{key} missing: {}", samples[0]);
    }
    let (_, recent) = get_json(&format!("{dashboard}/api/timeseries?seconds=10")).await;
    assert_eq!(recent["samples"].as_array().unwrap().len(), 1);
    assert_eq!(recent["samples"][0]["total"]["running"], 1);
}
