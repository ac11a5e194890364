//! Faults under load, end to end with real processes and the real SmolLM2 model.
//!
//! - `lumen bench soak` (short schedule): a head and two workers under steady load while a
//!   worker is SIGKILLed and replaced, another is replaced by a rolling replacement (SIGTERM after
//!   its replacement registered) and the head is SIGKILLed and restarted on its state directory.
//!   No request is lost, the rolling replacement fails none, every process ends as planned, and
//!   the program's exit code says so.
//!   After the head restart no request gets a 503: requests wait for the workers to register
//!   again.
//! - A worker given SIGTERM while it streams finishes the stream, exits 0, and the head stops
//!   routing to it while requests keep completing on the other worker.
//! - A rolling replacement of the worker hosting a deployment's only replica, under steady load,
//!   fails no request: the head shows the old worker `DRAINING`, places the replacement at once
//!   and requests wait for it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use support::{Lumen, head_args, model_path, until, worker_flags};

#[test]
fn soak_loses_no_request_across_a_worker_kill_a_rolling_replacement_and_a_head_restart() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let work = dir.path().join("work");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args(["bench", "soak", "--model", &model_path(), "--workers", "2", "--concurrency", "3"])
        .args(["--duration-s", "60", "--faults", "kill,roll,head", "--max-tokens", "12"])
        .args(["--heartbeat-interval-ms", "300", "--request-timeout-s", "45"])
        .arg("--work-dir")
        .arg(&work)
        .arg("--json")
        .arg(&report_path)
        .output()
        .expect("running lumen bench soak");
    let table = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the soak failed:\n{table}\n{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let totals = &report["totals"];
    assert_eq!(totals["lost"], 0, "{table}\n{stderr}");
    assert!(totals["completed"].as_u64().unwrap() > 20, "{table}");
    assert_eq!(report["rolling_not_completed"], 0, "{table}\n{stderr}");
    assert_eq!(report["ok"], true, "{table}");

    let faults = report["faults"].as_array().unwrap();
    let kinds: Vec<&str> = faults.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["worker_kill", "rolling_replacement", "head_restart"]);
    for fault in faults {
        assert!(fault["recovered_after_s"].is_number(), "{} did not recover:\n{table}", fault["kind"]);
    }
    // The load was running through the SIGTERM, and what was in flight then completed.
    let rolling = &faults[1]["in_flight_at_signal"];
    assert!(rolling["sent"].as_u64().unwrap() > 0, "no request in flight at the rolling SIGTERM:\n{table}");
    assert_eq!(rolling["completed"], rolling["sent"], "{table}");
    // The restored head waits for its workers to register again instead of answering 503.
    let head_phase = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("head_restart")));
    let head_phase = head_phase.expect("a head_restart phase");
    assert_eq!(head_phase["tally"]["failed_by_kind"].get("http_503"), None, "{table}");

    // Two heads and four workers; the SIGTERMed ones exited 0, memory was read for each.
    let processes = report["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 6, "{table}");
    let end_of =
        |name: &str| processes.iter().find(|p| p["name"] == name).unwrap()["end"].as_str().unwrap().to_string();
    assert!(end_of("w1").starts_with("SIGKILL"), "{table}");
    assert_eq!(end_of("w2"), "SIGTERM (rolling replacement): exit 0");
    assert!(end_of("head-1").starts_with("SIGKILL"), "{table}");
    for name in ["w3", "w4", "head-2"] {
        assert_eq!(end_of(name), "SIGTERM (end of the run): exit 0");
    }
    assert!(processes.iter().all(|p| p["rss_start_kib"].as_u64().unwrap() > 0), "{table}");
    assert!(table.contains("result: ok"), "{table}");
}

/// The head's view: `(worker id, alive, head-side in-flight requests on its replicas, RUNNING
/// replicas)` per worker.
async fn workers(http: &reqwest::Client, head: &Lumen) -> Vec<(String, bool, u64, usize)> {
    let Ok(response) = http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await else {
        return Vec::new();
    };
    let view: Value = response.json().await.unwrap_or_default();
    view["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| {
            let replicas = w["replicas"].as_array().cloned().unwrap_or_default();
            let in_flight = replicas.iter().filter_map(|r| r["in_flight"].as_u64()).sum();
            let running = replicas.iter().filter(|r| r["state"] == "RUNNING").count();
            (w["id"].as_str().unwrap_or_default().to_string(), w["alive"] == true, in_flight, running)
        })
        .collect()
}

async fn short_completion(http: &reqwest::Client, api: &str, i: usize) -> Value {
    let body = json!({"model": "smol", "prompt": format!("Request {i} during the drain:"), "max_tokens": 4,
                      "ignore_eos": true});
    let response = http.post(format!("{api}/v1/completions")).json(&body).send().await.expect("completion");
    assert_eq!(response.status(), 200, "request {i} during the drain failed");
    response.json().await.expect("completion JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_sigterm_finishes_its_stream_exits_zero_and_leaves_routing() {
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(dir.path(), 2);
    let head = Lumen::start(&head_args(&config));
    let mut pool: Vec<(&str, Lumen)> =
        ["w1", "w2"].map(|id| (id, Lumen::start(&worker_flags(&head.url("grpc"), id)))).into();
    let http = reqwest::Client::new();
    let (http, head_ref) = (&http, &head);
    until("both replicas run", Duration::from_secs(60), || async move {
        let view = workers(http, head_ref).await;
        view.len() == 2 && view.iter().all(|w| w.1 && w.3 == 1)
    })
    .await;

    // A long stream; once its first token arrived, SIGTERM the worker that serves it.
    let api = head.url("api");
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 160, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let response = http.post(format!("{api}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8_lossy(&stream.next().await.expect("a first chunk").unwrap()).into_owned();
    let serving = workers(http, head_ref).await.into_iter().find(|w| w.2 > 0).expect("a worker streams").0;
    let at = pool.iter().position(|(id, _)| *id == serving).expect("the serving worker is ours");
    let (_, mut victim) = pool.remove(at);
    victim.terminate();
    let signalled = Instant::now();

    // Requests during the drain complete (on the other worker).
    for i in 0..4 {
        let answer = short_completion(http, &api, i).await;
        assert_eq!(answer["usage"]["completion_tokens"], 4);
    }
    // The stream in flight completes in full.
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream broke")));
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.contains("\"completion_tokens\":160"), "{text}");
    assert_eq!(victim.wait_exit(Duration::from_secs(60)), Some(0), "the worker did not exit 0 after draining");
    assert!(signalled.elapsed() < Duration::from_secs(60));

    // The head stops routing to it: marked dead, and requests keep completing.
    let serving = serving.as_str();
    until("the head marks the drained worker dead", Duration::from_secs(10), || async move {
        workers(http, head_ref).await.iter().any(|w| w.0 == serving && !w.1)
    })
    .await;
    for i in 4..8 {
        short_completion(http, &api, i).await;
    }
}

fn serve_config(dir: &std::path::Path, replicas: u32) -> std::path::PathBuf {
    let config = dir.join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        num_replicas: {replicas}\n        \
             max_replicas_per_node: 1\n        model:\n          source: {}\n          served_model_name: smol\n          \
             threads: 1\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
            model_path()
        ),
    )
    .unwrap();
    config
}

/// `(worker id, state)` per worker as `/api/cluster` lists them (`ALIVE`, `DRAINING`, `DEAD`).
async fn worker_states(http: &reqwest::Client, head: &Lumen) -> Vec<(String, String)> {
    let Ok(response) = http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await else {
        return Vec::new();
    };
    let view: Value = response.json().await.unwrap_or_default();
    let workers = view["workers"].as_array().cloned().unwrap_or_default();
    workers
        .iter()
        .map(|w| {
            (w["id"].as_str().unwrap_or_default().to_string(), w["state"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// Sends short completions back to back until `stop`; returns how many completed and every failure.
async fn steady_load(http: reqwest::Client, api: String, client: usize, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let (mut completed, mut failures) = (0, Vec::new());
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = json!({"model": "smol", "prompt": format!("Client {client}, request {i}:"), "max_tokens": 4,
                          "ignore_eos": true});
        match http.post(format!("{api}/v1/completions")).json(&body).send().await {
            Ok(response) if response.status() == 200 => match response.json::<Value>().await {
                Ok(answer) if answer["usage"]["completion_tokens"] == 4 => completed += 1,
                Ok(answer) => failures.push(format!("request {i}: {answer}")),
                Err(e) => failures.push(format!("request {i}: {e}")),
            },
            Ok(response) => {
                let status = response.status();
                failures.push(format!("request {i}: {status} {}", response.text().await.unwrap_or_default()));
            }
            Err(e) => failures.push(format!("request {i}: {e}")),
        }
    }
    (completed, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_replacement_of_the_only_replica_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(dir.path(), 1);
    let head = Lumen::start(&head_args(&config));
    let mut old = Lumen::start(&worker_flags(&head.url("grpc"), "old"));
    let http = reqwest::Client::new();
    let (http, head_ref) = (&http, &head);
    until("the replica runs on the old worker", Duration::from_secs(60), || async move {
        workers(http, head_ref).await.iter().any(|w| w.0 == "old" && w.3 == 1)
    })
    .await;

    let api = head.url("api");
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2).map(|c| tokio::spawn(steady_load(http.clone(), api.clone(), c, stop.clone()))).collect();
    // A long stream keeps the old worker draining for a while.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 160, "ignore_eos": true, "stream": true});
    let response = http.post(format!("{api}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::from_utf8_lossy(&stream.next().await.expect("a first chunk").unwrap()).into_owned();

    // Rolling replacement: the new worker first, then SIGTERM the old one.
    let new = Lumen::start(&worker_flags(&head.url("grpc"), "new"));
    until("the new worker registers", Duration::from_secs(30), || async move {
        worker_states(http, head_ref).await.iter().any(|w| w.0 == "new" && w.1 == "ALIVE")
    })
    .await;
    old.terminate();
    until("the head shows the old worker draining", Duration::from_secs(10), || async move {
        worker_states(http, head_ref).await.iter().any(|w| w.0 == "old" && w.1 == "DRAINING")
    })
    .await;
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream broke")));
    }
    assert!(text.contains("data: [DONE]") && !text.contains("\"error\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert_eq!(old.wait_exit(Duration::from_secs(60)), Some(0), "the old worker did not exit 0 after draining");
    until("the replacement runs on the new worker", Duration::from_secs(60), || async move {
        workers(http, head_ref).await.iter().any(|w| w.0 == "new" && w.3 == 1)
    })
    .await;
    assert!(
        worker_states(http, head_ref).await.iter().any(|w| w.0 == "old" && w.1 == "DEAD"),
        "a drained worker is dead as soon as it left"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut completed, mut failures) = (0, Vec::new());
    for task in load {
        let (c, f) = task.await.unwrap();
        completed += c;
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:#?}", failures.len(), completed + failures.len());
    assert!(completed > 10, "only {completed} requests completed");
    drop(new);
}
