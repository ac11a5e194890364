//! A multi-process cluster for end-to-end tests: one `lumen head` serving a config file, several
//! `lumen worker` processes, the deployment scaled to one replica per worker.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lumen_proto::v1 as pb;
use serde_json::Value;

use super::{Lumen, head_flags, model_path, until, worker_flags};

/// The head's heartbeat interval: a silent worker is declared dead after three of them.
pub const HEARTBEAT_MS: &str = "1000";

/// What a test adds to the cluster's defaults.
#[derive(Clone, Copy, Default)]
pub struct Extra<'a> {
    /// Flags of `lumen head`.
    pub head: &'a [&'a str],
    /// Flags of every `lumen worker`.
    pub worker: &'a [&'a str],
    /// Lines of the deployment's `model:` section, such as `migration_limit: 2`.
    pub model: &'a [&'a str],
}

/// The serve config: one deployment of the real model, light enough for several workers on two
/// cores, its `model:` section with the `model` lines added.
pub fn serve_config(replicas: u32, model: &[&str]) -> String {
    let extra: String = model.iter().map(|line| format!("          {line}\n")).collect();
    format!(
        "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        num_replicas: {replicas}\n        \
         model:\n          source: {}\n          served_model_name: smol\n          threads: 1\n          \
         max_model_len: 1024\n          kv_cache_memory: 64MiB\n{extra}",
        model_path()
    )
}

/// `lumen head --config CONFIG` on ephemeral ports with [`HEARTBEAT_MS`] and `extra` flags.
pub fn start_head(config: &Path, extra: &[&str]) -> Lumen {
    let mut args = vec!["head".to_string(), "--config".into(), config.display().to_string()];
    let mut flags = head_flags();
    let at = flags.iter().position(|f| f == "--heartbeat-interval-ms").expect("head_flags sets the interval");
    flags[at + 1] = HEARTBEAT_MS.into();
    args.extend(flags);
    args.extend(extra.iter().map(|s| s.to_string()));
    Lumen::start(&args)
}

/// `lumen worker` registering with `head_grpc` as `id`, with `extra` flags.
pub fn start_worker(head_grpc: &str, id: &str, extra: &[&str]) -> Lumen {
    let mut args = worker_flags(head_grpc, id);
    args.extend(extra.iter().map(|s| s.to_string()));
    Lumen::start(&args)
}

/// The head's view (`GET /api/cluster`): live worker id -> its RUNNING replicas.
pub async fn running_by_worker(http: &reqwest::Client, head: &Lumen) -> BTreeMap<String, Vec<String>> {
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

/// What a worker's own gRPC `Stats` says: (requests finished, requests running or waiting,
/// tokens generated).
pub async fn worker_stats(worker: &Lumen) -> (u64, u32, u64) {
    let mut client = pb::worker_client::WorkerClient::connect(worker.url("grpc")).await.expect("worker gRPC");
    let stats = client.stats(pb::StatsRequest {}).await.expect("stats").into_inner();
    let finished = stats.replicas.iter().map(|r| r.requests_finished_stop + r.requests_finished_length).sum();
    let generated = stats.replicas.iter().map(|r| r.generation_tokens_total).sum();
    (finished, stats.replicas.iter().map(|r| r.running + r.waiting).sum(), generated)
}

/// A head and workers `ids`, the deployment scaled to one replica on each.
pub async fn start_cluster(
    dir: &Path,
    ids: &[&'static str],
    extra: Extra<'_>,
) -> (Lumen, BTreeMap<&'static str, Lumen>) {
    let config = dir.join("serve.yaml");
    // One replica at start: the head places replicas as soon as a worker registers, and CPU
    // workers may host several, so the deployment is scaled once all workers are in.
    std::fs::write(&config, serve_config(1, extra.model)).unwrap();
    let head = start_head(&config, extra.head);
    let http = reqwest::Client::new();
    let grpc = head.url("grpc");
    let workers: BTreeMap<&str, Lumen> = ids.iter().map(|&id| (id, start_worker(&grpc, id, extra.worker))).collect();
    let (http, head_ref, count) = (&http, &head, ids.len());
    until("every worker is registered", Duration::from_secs(30), || async move {
        running_by_worker(http, head_ref).await.len() == count
    })
    .await;
    let put = http
        .put(format!("{}/api/serve/applications/", head.url("dashboard")))
        .header("content-type", "application/yaml")
        .body(serve_config(count as u32, extra.model))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap_or_default());
    until("one replica runs on each worker", Duration::from_secs(60), || async move {
        let running = running_by_worker(http, head_ref).await;
        running.len() == count && running.values().all(|r| r.len() == 1)
    })
    .await;
    (head, workers)
}
