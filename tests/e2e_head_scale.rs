//! The head with a hundred workers, stood for by one `lumen worker --simulate --simulated-workers
//! 100` process (each its own gRPC port, registration and heartbeats, over the simulated engine):
//! placement puts one replica on every worker, the router spreads requests over all of them, and
//! a SIGTERM drains all hundred: the streams in flight finish, the process exits 0, and the head
//! routes nothing to them any more. `lumen bench head` measures the same setup under load.

mod support;

use std::time::Duration;

use futures::StreamExt;
use lumen_proto::v1 as pb;
use serde_json::{Value, json};
use support::cluster::{running_by_worker, start_head};
use support::{Lumen, model_path, until, worker_flags};

const WORKERS: usize = 100;

fn serve_config() -> String {
    format!(
        "applications:\n  - name: scale\n    deployments:\n      - name: sim\n        num_replicas: {WORKERS}\n        \
         max_replicas_per_node: 1\n        model:\n          source: {}\n          served_model_name: sim\n          \
         max_model_len: 1024\n",
        model_path()
    )
}

/// Requests finished by each simulated worker, read from its own gRPC `Stats`.
async fn finished_per_worker(fleet: &Lumen) -> Vec<u64> {
    let mut counts = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let name = if i == 0 { "grpc".to_string() } else { format!("grpc-{i}") };
        let mut client = pb::worker_client::WorkerClient::connect(fleet.url(&name)).await.expect("worker gRPC");
        let stats = client.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
        counts.push(stats.replicas.iter().map(|r| r.requests_finished_stop + r.requests_finished_length).sum());
    }
    counts
}

/// A completion of `max_tokens` for a prompt of token ids starting with `first` (distinct first
/// tokens: the router's prefix affinity has nothing to hold on to).
fn completion(first: u32, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "sim", "prompt": [first, 7, 8, 9], "max_tokens": max_tokens, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_simulated_workers_get_one_replica_each_share_the_requests_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.yaml");
    std::fs::write(&config, serve_config()).unwrap();
    let head = start_head(&config, &["--replica-wait-timeout-s", "2"]);
    let mut args = worker_flags(&head.url("grpc"), "sim");
    args.extend(["--simulate", "2", "--simulated-workers", &WORKERS.to_string()].map(String::from));
    let mut fleet = Lumen::start(&args);
    let http = reqwest::Client::new();
    let (http, head_ref) = (&http, &head);

    // Placement: a hundred workers, one running replica each.
    until("one replica runs on each of the hundred workers", Duration::from_secs(90), || async move {
        let running = running_by_worker(http, head_ref).await;
        running.len() == WORKERS && running.values().all(|r| r.len() == 1)
    })
    .await;

    // Routing: 400 requests, 50 at a time, reach (nearly) every replica and pile up on none.
    let api = head.url("api");
    let url = format!("{api}/v1/completions");
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..400u32)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.post(url).json(&completion(100 + i, 4, false)).send().await.expect("sent");
                (response.status().as_u16(), response.json().await.unwrap_or_default())
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    }
    let counts = finished_per_worker(&fleet).await;
    assert_eq!(counts.iter().sum::<u64>(), 400, "{counts:?}");
    let served = counts.iter().filter(|&&c| c > 0).count();
    let busiest = counts.iter().max().copied().unwrap_or(0);
    assert!(served >= 75 && busiest <= 16, "requests per worker: {counts:?}");

    // Drain: streams in flight when the fleet gets SIGTERM all finish; the process exits 0.
    let (begun, mut begun_rx) = tokio::sync::mpsc::channel(20);
    let streams: Vec<_> = (0..20u32)
        .map(|i| {
            let (http, url, begun) = (http.clone(), url.clone(), begun.clone());
            tokio::spawn(async move {
                let response = http.post(url).json(&completion(1000 + i, 1000, true)).send().await.expect("sent");
                assert_eq!(response.status(), 200);
                let mut body = response.bytes_stream();
                let (mut text, mut signalled) = (String::new(), false);
                while let Some(piece) = body.next().await {
                    text += &String::from_utf8_lossy(&piece.expect("the stream goes on"));
                    if !signalled && text.contains("<t") {
                        signalled = true;
                        begun.send(()).await.expect("the test waits");
                    }
                }
                text
            })
        })
        .collect();
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(30), begun_rx.recv()).await.expect("every stream begins");
    }
    fleet.terminate();
    for stream in streams {
        let text = stream.await.expect("task");
        assert!(text.contains("\"finish_reason\":\"length\"") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    assert_eq!(fleet.wait_exit(Duration::from_secs(60)), Some(0), "the fleet exits 0 after draining");
    until("no worker is routable", Duration::from_secs(30), || async move {
        running_by_worker(http, head_ref).await.is_empty()
    })
    .await;
    let after = http.post(&url).json(&completion(5, 4, false)).send().await.expect("sent");
    assert_eq!(after.status(), 503, "{}", after.text().await.unwrap_or_default());
}
