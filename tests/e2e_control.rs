//! The control API end to end with real processes: `lumen head --state-dir` and one
//! `lumen worker` serving the real SmolLM2 model, `lumen deploy` and `lumen status` as an operator
//! runs them, and a head stopped and restarted on the same state directory and gRPC port that
//! serves the model again without another deploy, with the API keys and the tenants' usage it
//! had.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Lumen, head_flags, model_path, worker_flags};

/// Runs a `lumen` client subcommand to completion.
fn lumen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lumen")).args(args).output().expect("running lumen")
}

fn head_args(state_dir: &Path, grpc_port: u16) -> Vec<String> {
    let mut args = vec!["head".to_string(), "--state-dir".into(), state_dir.display().to_string()];
    let mut flags = head_flags();
    let at = flags.iter().position(|f| f == "--grpc-port").expect("head flags set the gRPC port");
    flags[at + 1] = grpc_port.to_string();
    args.extend(flags);
    args
}

/// `lumen status --json` until the application is RUNNING (model loading included).
fn wait_running(control: &str, app: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = lumen(&["status", "--json", "--address", control]);
        assert!(out.status.success(), "lumen status failed: {}", String::from_utf8_lossy(&out.stderr));
        let doc: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        if doc["applications"][app]["status"] == "RUNNING" {
            return doc;
        }
        assert!(Instant::now() < deadline, "`{app}` never ran: {doc:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn completion(http: &reqwest::Client, api: &str, key: Option<&str>) -> Value {
    let body = json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 3, "ignore_eos": true});
    let mut request = http.post(format!("{api}/v1/completions")).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.expect("completion");
    assert_eq!(r.status(), 200);
    r.json().await.expect("completion JSON")
}

const TEAM_KEY: &str = "sk-e2e-control-team-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_status_and_a_restarted_head_restore_the_applications() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let config = dir.path().join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        num_replicas: 1\n        model:\n          source: {}\n          served_model_name: smol\n          threads: 2\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
            model_path()
        ),
    )
    .unwrap();
    let mut head = Lumen::start(&head_args(&state_dir, 0));
    let grpc_port = head.addr("grpc").port();
    let _worker = Lumen::start(&worker_flags(&head.url("grpc"), "w1"));
    let control = head.url("dashboard");
    let http = reqwest::Client::new();

    // A config the head's parser refuses is refused locally, naming the field.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "applications:\n  - name: a\n    deployments:\n      - name: d\n        num_replicas: many\n        model: {source: m.gguf}\n").unwrap();
    let out = lumen(&["deploy", &bad.display().to_string(), "--address", &control]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("num_replicas"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = lumen(&["deploy", &config.display().to_string(), "--address", &control]);
    assert!(out.status.success(), "lumen deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("chat"), "{}", String::from_utf8_lossy(&out.stdout));
    let before = wait_running(&control, "chat");
    assert_eq!(before["applications"]["chat"]["deployments"]["llm"]["replica_states"]["RUNNING"], 1);
    assert_eq!(completion(&http, &head.url("api"), None).await["usage"]["completion_tokens"], 3);
    // Named API keys set through the control API are kept in the state directory as hashes.
    let keys = json!({"api_keys": [{"tenant": "team", "key": TEAM_KEY, "requests_per_minute": 50, "weight": 3}]});
    let put = http.put(format!("{control}/api/lumen/keys")).json(&keys).send().await.expect("PUT keys");
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let saved = std::fs::read_to_string(state_dir.join("api-keys.json")).expect("the keys are persisted");
    assert!(saved.contains("key_sha256") && !saved.contains(TEAM_KEY), "{saved}");
    completion(&http, &head.url("api"), Some(TEAM_KEY)).await;
    let summary = lumen(&["status", "--address", &control]);
    let summary = String::from_utf8_lossy(&summary.stdout);
    assert!(
        summary.contains("chat:") && summary.contains("status: RUNNING") && summary.contains("RUNNING: 1"),
        "{summary}"
    );

    // The head stops; a new one on the same state directory and gRPC port restores the config,
    // the API keys and the tenants' usage, the worker re-registers with the replica it still
    // hosts, and the model serves again, to the key only.
    // (Stopped by SIGTERM: its last act saves the tenants' usage.)
    head.terminate();
    assert_eq!(head.wait_exit(Duration::from_secs(60)), Some(0), "the head exits cleanly");
    let head = Lumen::start(&head_args(&state_dir, grpc_port));
    let control = head.url("dashboard");
    let after = wait_running(&control, "chat");
    assert_eq!(
        after["applications"]["chat"]["last_deployed_time_s"],
        before["applications"]["chat"]["last_deployed_time_s"]
    );
    let open = http.post(format!("{}/v1/completions", head.url("api"))).json(&json!({"model": "smol", "prompt": "x"}));
    assert_eq!(open.send().await.expect("completion").status(), 401, "the restored keys are in force");
    assert_eq!(completion(&http, &head.url("api"), Some(TEAM_KEY)).await["usage"]["completion_tokens"], 3);
    let listed: Value = http.get(format!("{control}/api/lumen/keys")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["api_keys"][0]["tenant"], "team");
    assert_eq!(
        (&listed["api_keys"][0]["requests_per_minute"], &listed["api_keys"][0]["weight"]),
        (&json!(50), &json!(3))
    );
    // The tenant's usage from before the restart was saved and restored: two requests now.
    let usage: Value =
        http.get(format!("{control}/api/lumen/usage?tenant=team")).send().await.unwrap().json().await.unwrap();
    let rows = usage["usage"].as_array().expect("usage rows");
    let success: u64 = rows.iter().map(|r| r["requests"]["success"].as_u64().unwrap()).sum();
    let completion_tokens: u64 = rows.iter().map(|r| r["completion_tokens"].as_u64().unwrap()).sum();
    assert_eq!((success, completion_tokens), (2, 6), "{usage}");
}
