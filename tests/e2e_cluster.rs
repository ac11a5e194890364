//! A multi-process cluster end to end: one `lumen head`, several `lumen worker` processes, the
//! real SmolLM2 model. Requests spread over the replicas; a worker killed with SIGKILL while
//! requests stream costs only the requests it was streaming (each ends with an error event),
//! requests not yet started on it are retried elsewhere, and its replica is placed again on a
//! worker that joins afterwards.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lumen_proto::v1 as pb;
use serde_json::{Value, json};
use support::{Lumen, head_flags, model_path, until, worker_flags};

/// The head's heartbeat interval: a silent worker is declared dead after three of them, time
/// enough for the fourth worker (started right after the kill) to register first.
const HEARTBEAT_MS: &str = "1000";

/// The serve config: one deployment of the real model, light enough for several workers on two
/// cores.
fn serve_config(replicas: u32) -> String {
    format!(
        "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        num_replicas: {replicas}\n        \
         model:\n          source: {}\n          served_model_name: smol\n          threads: 1\n          \
         max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
        model_path()
    )
}

fn start_head(config: &Path) -> Lumen {
    let mut args = vec!["head".to_string(), "--config".into(), config.display().to_string()];
    let mut flags = head_flags();
    let at = flags.iter().position(|f| f == "--heartbeat-interval-ms").expect("head_flags sets the interval");
    flags[at + 1] = HEARTBEAT_MS.into();
    args.extend(flags);
    Lumen::start(&args)
}

fn start_worker(head_grpc: &str, id: &str) -> Lumen {
    Lumen::start(&worker_flags(head_grpc, id))
}

/// The head's view (`GET /api/cluster`): live worker id -> its RUNNING replicas.
async fn running_by_worker(http: &reqwest::Client, head: &Lumen) -> BTreeMap<String, Vec<String>> {
    let Ok(response) = http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await else {
        return BTreeMap::new();
    };
    let view: Value = response.json().await.unwrap_or_default();
    let workers = view["workers"].as_array().cloned().unwrap_or_default();
    workers
        .iter()
        .filter(|w| w["alive"] == true)
        .map(|w| {
            let replicas = w["replicas"].as_array().cloned().unwrap_or_default();
            let running = replicas
                .iter()
                .filter(|r| r["state"] == "RUNNING")
                .filter_map(|r| r["replica_id"].as_str().map(String::from))
                .collect();
            (w["id"].as_str().unwrap_or_default().to_string(), running)
        })
        .collect()
}

/// What a worker's own gRPC `Stats` says: (requests finished, requests running or waiting).
async fn worker_stats(worker: &Lumen) -> (u64, u32) {
    let mut client = pb::worker_client::WorkerClient::connect(worker.url("grpc")).await.expect("worker gRPC");
    let stats = client.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
    let finished = stats.replicas.iter().map(|r| r.requests_finished_stop + r.requests_finished_length).sum();
    (finished, stats.replicas.iter().map(|r| r.running + r.waiting).sum())
}

/// How a streamed chat completion ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Every token, `finish_reason`, `[DONE]`.
    Completed,
    /// It had started streaming, then an error event and `[DONE]`.
    FailedMidStream,
    /// Anything else (an error status, a stream cut short without an error event, ...).
    Broken(String),
}

async fn stream_chat(http: reqwest::Client, api: String, prompt: String, max_tokens: u32) -> Outcome {
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true});
    let request = async {
        let response = http.post(format!("{api}/v1/chat/completions")).json(&body).send().await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.text().await?))
    };
    match tokio::time::timeout(Duration::from_secs(60), request).await {
        Err(_) => Outcome::Broken("no answer within 60 s".into()),
        Ok(Err(e)) => Outcome::Broken(format!("transport error: {e}")),
        Ok(Ok((status, body))) if status != 200 => Outcome::Broken(format!("status {status}: {body}")),
        Ok(Ok((_, body))) => classify(&body),
    }
}

fn classify(sse: &str) -> Outcome {
    let (mut chunks, mut finished, mut failed, mut done) = (0, false, false, false);
    for data in sse.lines().filter_map(|line| line.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else { return Outcome::Broken(sse.into()) };
        if event.get("error").is_some() {
            failed = true;
        } else {
            chunks += 1;
            finished |= event["choices"][0]["finish_reason"] == "length";
        }
    }
    match (finished, failed, done) {
        (true, false, true) => Outcome::Completed,
        (false, true, true) if chunks > 0 => Outcome::FailedMidStream,
        _ => Outcome::Broken(sse.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_the_load_and_survive_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.yaml");
    // One replica at start: the head places replicas as soon as a worker registers, and CPU
    // workers may host several, so the deployment is scaled to three once all three are in.
    std::fs::write(&config, serve_config(1)).unwrap();
    let head = start_head(&config);
    let http = reqwest::Client::new();
    let grpc = head.url("grpc");
    let mut workers: BTreeMap<&str, Lumen> = ["w1", "w2", "w3"].map(|id| (id, start_worker(&grpc, id))).into();
    let (http, head) = (&http, &head);
    until("three workers are registered", Duration::from_secs(30), || async move {
        running_by_worker(http, head).await.len() == 3
    })
    .await;
    let put = http
        .put(format!("{}/api/serve/applications/", head.url("dashboard")))
        .header("content-type", "application/yaml")
        .body(serve_config(3))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap_or_default());
    until("one replica runs on each worker", Duration::from_secs(60), || async move {
        let running = running_by_worker(http, head).await;
        running.len() == 3 && running.values().all(|r| r.len() == 1)
    })
    .await;

    // Concurrent requests spread over the three replicas (each worker's own counters say so).
    let api = head.url("api");
    let spread = (0..12).map(|i| tokio::spawn(stream_chat(http.clone(), api.clone(), format!("Spread {i}"), 8)));
    for outcome in futures::future::join_all(spread).await {
        assert_eq!(outcome.expect("task"), Outcome::Completed);
    }
    for (id, worker) in &workers {
        assert!(worker_stats(worker).await.0 > 0, "worker {id} served none of the requests");
    }

    // The router weighs the load workers last reported: let the heartbeats catch up with the
    // finished spread, so no worker looks busy and the batch reaches all three.
    until("the head sees every worker idle", Duration::from_secs(30), || async move {
        let Ok(response) = http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await else {
            return false;
        };
        let view: Value = response.json().await.unwrap_or_default();
        let workers = view["workers"].as_array().cloned().unwrap_or_default();
        workers.iter().all(|w| w["running"] == 0 && w["waiting"] == 0)
    })
    .await;

    // A batch in flight; SIGKILL w2 while it streams some of it.
    let before: Vec<_> = (0..9)
        .map(|i| tokio::spawn(stream_chat(http.clone(), api.clone(), format!("Before the kill {i}"), 48)))
        .collect();
    let mut victim = workers.remove("w2").expect("w2");
    let streaming = &victim;
    until("w2 is streaming requests of the batch", Duration::from_secs(30), || async move {
        worker_stats(streaming).await.1 > 0
    })
    .await;
    victim.child.kill().expect("SIGKILL w2");
    victim.child.wait().expect("w2 exits");
    // Sent while the head still believes w2 alive: those routed to it fail to connect before
    // their first event and must be retried on another replica.
    let after: Vec<_> = (0..9)
        .map(|i| tokio::spawn(stream_chat(http.clone(), api.clone(), format!("After the kill {i}"), 16)))
        .collect();
    let grpc_for_w4 = grpc.clone();
    let w4 = tokio::task::spawn_blocking(move || start_worker(&grpc_for_w4, "w4")).await.expect("w4 starts");
    workers.insert("w4", w4);

    let mut failed_mid_stream = 0;
    for outcome in futures::future::join_all(before).await {
        match outcome.expect("task") {
            Outcome::Completed => {}
            Outcome::FailedMidStream => failed_mid_stream += 1,
            broken => panic!("a request in flight during the kill ended badly: {broken:?}"),
        }
    }
    for outcome in futures::future::join_all(after).await {
        assert_eq!(outcome.expect("task"), Outcome::Completed, "a request sent after the kill failed");
    }
    assert!(failed_mid_stream < 9, "the requests on the surviving workers completed");

    // w2's replica is placed again, on the worker that joined: one replica per live worker.
    until("the lost replica runs on w4", Duration::from_secs(60), || async move {
        let running = running_by_worker(http, head).await;
        running.keys().map(String::as_str).eq(["w1", "w3", "w4"]) && running.values().all(|r| r.len() == 1)
    })
    .await;
    let outcome = stream_chat(http.clone(), api.clone(), "After the replacement".into(), 8).await;
    assert_eq!(outcome, Outcome::Completed);
}
