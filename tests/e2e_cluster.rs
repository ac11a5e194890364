//! A multi-process cluster end to end: one `lumen head`, several `lumen worker` processes, the
//! real SmolLM2 model. Requests spread over the replicas; a worker killed with SIGKILL while
//! requests stream costs none of them: those it was streaming move to the other replicas (their
//! output is checked token for token in `e2e_migration.rs`), requests not yet started on it are
//! retried elsewhere, and its replica is placed again on a worker that joins afterwards. The same
//! scenario runs on simulated workers (`lumen worker --simulate`: the real worker service over an
//! engine that computes nothing), which `lumen bench head` uses to stand for hundreds of workers.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::cluster::{Extra, running_by_worker, start_cluster, start_worker, worker_stats};
use support::until;

/// How a streamed chat completion ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Every token, `finish_reason`, `[DONE]`.
    Completed,
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
        (true, false, true) if chunks > 0 => Outcome::Completed,
        _ => Outcome::Broken(sse.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_the_load_and_survive_losing_one() {
    three_workers_lose_one(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_simulated_workers_share_the_load_and_survive_losing_one() {
    three_workers_lose_one(&["--simulate", "40"]).await;
}

/// The scenario, with `worker_flags` on every worker.
async fn three_workers_lose_one(worker_flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let extra = Extra { worker: worker_flags, ..Extra::default() };
    let (head, mut workers) = start_cluster(dir.path(), &["w1", "w2", "w3"], extra).await;
    let http = reqwest::Client::new();
    let grpc = head.url("grpc");
    let (http, head) = (&http, &head);

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
    let flags: Vec<String> = worker_flags.iter().map(|f| f.to_string()).collect();
    let w4 = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        start_worker(&grpc_for_w4, "w4", &flags)
    })
    .await
    .expect("w4 starts");
    workers.insert("w4", w4);

    for outcome in futures::future::join_all(before).await {
        assert_eq!(outcome.expect("task"), Outcome::Completed, "a request in flight during the kill failed");
    }
    for outcome in futures::future::join_all(after).await {
        assert_eq!(outcome.expect("task"), Outcome::Completed, "a request sent after the kill failed");
    }

    // w2's replica is placed again, on the worker that joined: one replica per live worker.
    until("the lost replica runs on w4", Duration::from_secs(60), || async move {
        let running = running_by_worker(http, head).await;
        running.keys().map(String::as_str).eq(["w1", "w3", "w4"]) && running.values().all(|r| r.len() == 1)
    })
    .await;
    let outcome = stream_chat(http.clone(), api.clone(), "After the replacement".into(), 8).await;
    assert_eq!(outcome, Outcome::Completed);
}
