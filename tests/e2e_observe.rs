//! The dashboard's data from a real `lumen serve` and the real model: `/api/requests` records
//! what was served (tokens equal to the usage the client got, errors with their status, the
//! deployment and replica), `/api/timeseries` samples the cluster, prompt text only with
//! `--log-requests`, and the OpenAI API answers on the dashboard port too.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Lumen, read_sse, serve_flags};

fn serve(extra: &[&str]) -> Lumen {
    Lumen::start(&serve_flags(extra))
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(&url).send().await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.expect("JSON")
}

/// The record with `id` in the dashboard's request log (waits up to 5 s).
async fn record(http: &reqwest::Client, dashboard: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = get(http, format!("{dashboard}/api/requests?limit=1000")).await;
        if let Some(found) = log["requests"].as_array().and_then(|r| r.iter().find(|r| r["id"] == id)) {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "{id} never appeared in {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_tokens_match(record: &Value, usage: &Value) {
    assert_eq!(record["prompt_tokens"], usage["prompt_tokens"], "{record} vs {usage}");
    assert_eq!(record["completion_tokens"], usage["completion_tokens"], "{record} vs {usage}");
}

const PROMPT: &str = "Name three colours of the rainbow.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_and_history_follow_what_was_served() {
    let lumen = serve(&[]);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let (api, dashboard) = (lumen.url("api"), lumen.url("dashboard"));
    let chat = json!({"model": "smol", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                      "temperature": 0});

    // A chat request through the dashboard port: the playground's path.
    let response = http.post(format!("{dashboard}/v1/chat/completions")).json(&chat).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(!answer["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{answer}");
    let models = get(&http, format!("{dashboard}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "smol");

    // A streamed completion on the API port, with its usage.
    let body = json!({"model": "smol", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let (chunks, done) = read_sse(http.post(format!("{api}/v1/completions")).json(&body).send().await.unwrap()).await;
    assert!(done);
    let streamed = chunks.last().cloned().unwrap();

    // Refusals: a context overflow (400) and an unknown model (404).
    let too_long = json!({"model": "smol", "prompt": "hi", "max_tokens": 100_000});
    let refused = http.post(format!("{api}/v1/completions")).json(&too_long).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let unknown = json!({"model": "nope", "prompt": "hi"});
    assert_eq!(http.post(format!("{api}/v1/completions")).json(&unknown).send().await.unwrap().status(), 404);

    let chat_record = record(&http, &dashboard, answer["id"].as_str().unwrap()).await;
    assert_tokens_match(&chat_record, &answer["usage"]);
    assert_eq!(chat_record["route"], "chat");
    assert_eq!(chat_record["model"], "smol");
    assert_eq!(chat_record["deployment"], "default");
    assert_eq!(chat_record["status"], 200);
    assert_eq!(chat_record["finish_reason"], answer["choices"][0]["finish_reason"]);
    assert!(chat_record["ttft_ms"].as_f64().unwrap() > 0.0);
    let replica = chat_record["replica_id"].as_str().expect("the replica that served it").to_string();

    let stream_record = record(&http, &dashboard, streamed["id"].as_str().unwrap()).await;
    assert_tokens_match(&stream_record, &streamed["usage"]);
    assert_eq!(stream_record["completion_tokens"], 6);
    assert_eq!(
        (stream_record["stream"].clone(), stream_record["finish_reason"].clone()),
        (json!(true), json!("length"))
    );
    assert!(stream_record["itl_ms"].as_f64().unwrap() > 0.0);

    let log = get(&http, format!("{dashboard}/api/requests")).await;
    assert_eq!(log["log_requests"], false);
    assert!(!log.to_string().contains("rainbow"), "no prompt text without --log-requests: {log}");
    let statuses: Vec<u64> =
        log["requests"].as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [404, 400, 200, 200], "newest first");
    let overflow = &log["requests"][1];
    assert!(!overflow["error"].as_str().expect("the refusal's message").is_empty(), "{overflow}");
    assert_eq!(log["requests"][0]["model"], "nope");

    // The sampler saw the deployment and its replica, and the latencies of the requests above.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let series = get(&http, format!("{dashboard}/api/timeseries?seconds=60")).await;
        assert_eq!(series["interval_s"], 2.0);
        if let Some(sample) = series["samples"].as_array().and_then(|s| s.last())
            && !sample["total"]["ttft_ms"].is_null()
        {
            assert_eq!(sample["replicas"][&replica]["deployment"], "default", "{sample}");
            assert!(sample["deployments"]["default"]["kv_cache_usage"].as_f64().is_some(), "{sample}");
            let p50 = sample["deployments"]["default"]["ttft_ms"]["p50"].as_f64().expect("deployment latencies");
            assert!(p50 > 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no sample with latencies: {series}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_are_recorded_with_log_requests() {
    let lumen = serve(&["--log-requests"]);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let chat = json!({"model": "smol", "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": PROMPT}], "max_tokens": 2});
    let response = http.post(format!("{}/v1/chat/completions", lumen.url("api"))).json(&chat).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let dashboard = lumen.url("dashboard");
    let found = record(&http, &dashboard, answer["id"].as_str().unwrap()).await;
    assert_eq!(found["prompt"], PROMPT, "the last user message");
    assert_eq!(get(&http, format!("{dashboard}/api/requests")).await["log_requests"], true);
}
