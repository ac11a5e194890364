//! The web dashboard end to end, in a real browser: a `lumen head` (with `--log-requests`), two
//! `lumen worker` processes, the real SmolLM2 model deployed over them by a PUT of a serve config,
//! then `node dashboard/tests/dashboard.spec.mjs`, which drives headless Debian Chromium through every
//! view (workers listed, deployment healthy, charts moving under load, requests listed with their
//! prompts, the playground streaming and stopping, two tenants' usage after their requests, read
//! with the head's admin token) and saves screenshots to
//! `target/dashboard-screenshots/`. The dashboard's pure JavaScript logic is unit-tested under
//! Node first (`dashboard/tests/modules.test.mjs`).
//!
//! Needs `node` (>= 18), `/usr/bin/chromium` and playwright-core in `.cache/browser`: all
//! installed by `scripts/browser-env.sh` (which `scripts/test.sh` runs). Missing, the test fails
//! saying so; it does not skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Lumen, head_flags, model_path, worker_flags};

const WORKERS: [&str; 2] = ["dash-w1", "dash-w2"];
/// The head's `--admin-token`: the serve config's PUT and the usage view need it.
const ADMIN_TOKEN: &str = "dashboard-admin-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails, naming the fix, when the browser environment is not installed.
fn require_browser_env() {
    let missing: Vec<&str> = [
        ("node", std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success())),
        ("/usr/bin/chromium", Path::new("/usr/bin/chromium").exists()),
        (
            ".cache/browser/node_modules/playwright-core",
            root().join(".cache/browser/node_modules/playwright-core/package.json").is_file(),
        ),
    ]
    .into_iter()
    .filter_map(|(what, present)| (!present).then_some(what))
    .collect();
    assert!(missing.is_empty(), "the browser tests need {}: run scripts/browser-env.sh", missing.join(", "));
}

/// Runs `node ARGS` in the repository root; returns (success, stdout + stderr).
async fn node(args: &[String], timeout: Duration) -> (bool, String) {
    let child = tokio::process::Command::new("node")
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        }
        Ok(Err(e)) => (false, format!("node failed: {e}")),
        Err(_) => (false, format!("node {args:?} ran longer than {timeout:?}")),
    }
}

/// One deployment of the real model, autoscaled within [2, 2] (so the serve view has an
/// autoscaling config to show and the replica count stays put).
fn serve_config() -> String {
    format!(
        "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        \
         autoscaling_config: {{min_replicas: 2, max_replicas: 2, target_ongoing_requests: 8}}\n        \
         model:\n          source: {}\n          served_model_name: smol\n          threads: 1\n          \
         max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
        model_path()
    )
}

async fn cluster(http: &reqwest::Client, head: &Lumen) -> Value {
    match http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    }
}

/// Waits until `/api/cluster` lists every worker alive.
async fn wait_alive(http: &reqwest::Client, head: &Lumen) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = cluster(http, head).await;
        let workers = view["workers"].as_array().cloned().unwrap_or_default();
        if WORKERS.iter().all(|id| workers.iter().any(|w| w["id"] == *id && w["alive"] == true)) {
            return;
        }
        assert!(Instant::now() < deadline, "the workers never all registered: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `/api/cluster` shows every worker alive and both replicas RUNNING (wherever the
/// controller placed them: a CPU worker takes any number).
async fn wait_running(http: &reqwest::Client, head: &Lumen) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = cluster(http, head).await;
        let workers = view["workers"].as_array().cloned().unwrap_or_default();
        let alive = WORKERS.iter().all(|id| workers.iter().any(|w| w["id"] == *id && w["alive"] == true));
        let running = workers
            .iter()
            .flat_map(|w| w["replicas"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["state"] == "RUNNING")
            .count();
        let ready = alive && running == 2;
        if ready {
            // Each says what it runs on: the CPU kernels here (a GPU replica names its cuda:N).
            for r in workers.iter().flat_map(|w| w["replicas"].as_array().cloned().unwrap_or_default()) {
                let description = r["description"].as_str().unwrap_or_default();
                assert!(description.starts_with("cpu ("), "a running replica's description: {r}");
            }
            return;
        }
        assert!(Instant::now() < deadline, "the workers and replicas never all ran: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_views_work_in_headless_chromium_against_a_real_cluster() {
    require_browser_env();
    let (ok, out) = node(&["--test".into(), "dashboard/tests/modules.test.mjs".into()], Duration::from_secs(60)).await;
    assert!(ok, "the dashboard's module tests failed:\n{out}");

    let mut args = vec!["head".to_string(), "--log-requests".into(), "--admin-token".into(), ADMIN_TOKEN.into()];
    args.extend(head_flags());
    let head = Lumen::start(&args);
    let grpc = head.url("grpc");
    let _workers: Vec<Lumen> = WORKERS.iter().map(|id| Lumen::start(&worker_flags(&grpc, id))).collect();
    let http = reqwest::Client::new();
    // Deploy once both workers are in, so the replicas spread over them (one each).
    wait_alive(&http, &head).await;
    let put = http
        .put(format!("{}/api/serve/applications/", head.url("dashboard")))
        .header("content-type", "application/yaml")
        .bearer_auth(ADMIN_TOKEN)
        .body(serve_config())
        .send()
        .await
        .expect("PUT the serve config");
    assert!(put.status().is_success(), "PUT answered {}: {}", put.status(), put.text().await.unwrap_or_default());
    wait_running(&http, &head).await;
    head.wait_healthy(&http).await;

    let screenshots = root().join("target/dashboard-screenshots");
    let mut spec = vec![
        "dashboard/tests/dashboard.spec.mjs".to_string(),
        "--dashboard".into(),
        head.url("dashboard"),
        "--api".into(),
        head.url("api"),
        "--model".into(),
        "smol".into(),
        "--workers".into(),
        WORKERS.join(","),
        "--expect-prompts".into(),
        "yes".into(),
        "--expect-autoscaling".into(),
        "min 2 · max 2 · target ongoing 8".into(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
        "--out".into(),
        screenshots.display().to_string(),
    ];
    // LUMEN_DOCS_IMAGES=docs/images refreshes the screenshots docs/dashboard.md shows.
    if let Ok(docs) = std::env::var("LUMEN_DOCS_IMAGES") {
        spec.extend(["--docs-images".to_string(), docs]);
    }
    let (ok, out) = node(&spec, Duration::from_secs(300)).await;
    println!("{out}");
    assert!(ok, "the browser test failed (screenshots in {}):\n{out}", screenshots.display());
}
