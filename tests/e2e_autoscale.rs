//! Two applications declared through Ray's REST API on a real head and worker: both serve; the
//! autoscaled one starts at zero replicas, comes up when a request waits for it (the request is
//! served, not refused), scales up under load and back down while requests keep flowing (none
//! fails while a replica drains), returns to zero when idle, and a declarative PUT without it
//! deletes it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Lumen, head_flags, model_path, until, worker_flags};

fn model(served_name: &str) -> Value {
    json!({"source": model_path(), "served_model_name": served_name, "threads": 1,
           "max_model_len": 1024, "kv_cache_memory": "64MiB"})
}

/// `chat` always runs one replica; `burst`, when given its autoscaling config, scales from zero.
fn serve_config(burst: Option<Value>) -> Value {
    let mut applications = vec![json!({"name": "chat", "route_prefix": "/chat",
        "deployments": [{"name": "llm", "num_replicas": 1, "model": model("smol")}]})];
    if let Some(autoscaling) = burst {
        applications.push(json!({"name": "burst", "route_prefix": "/burst",
            "deployments": [{"name": "llm-burst", "model": model("smol-burst"), "autoscaling_config": autoscaling}]}));
    }
    json!({"applications": applications})
}

fn autoscaling(max_replicas: u32, upscale_delay_s: f64) -> Value {
    json!({"min_replicas": 0, "max_replicas": max_replicas, "target_ongoing_requests": 1,
           "upscale_delay_s": upscale_delay_s, "downscale_delay_s": 2})
}

/// Clients sending `smol-burst` requests back to back until told to stop; every outcome counted.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(http: &reqwest::Client, head: &Lumen, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/v1/completions", head.url("api"));
        let clients = (0..clients)
            .map(|_| {
                let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({"model": "smol-burst", "prompt": "Count: 1 2 3", "max_tokens": 24,
                                          "ignore_eos": true});
                        match http.post(&url).json(&body).send().await {
                            Ok(r) if r.status() == 200 => {}
                            Ok(r) => failures.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    failures
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients and returns every failed request.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for client in self.clients {
            failures.extend(client.await.expect("load client"));
        }
        failures
    }
}

async fn status(http: &reqwest::Client, head: &Lumen) -> Value {
    let url = format!("{}/api/serve/applications/", head.url("dashboard"));
    http.get(url).send().await.expect("GET applications").json().await.expect("status JSON")
}

/// The RUNNING replicas of `deployment` in application `app`.
async fn running_replicas(http: &reqwest::Client, head: &Lumen, app: &str, deployment: &str) -> u64 {
    let doc = status(http, head).await;
    doc["applications"][app]["deployments"][deployment]["replica_states"]["RUNNING"].as_u64().unwrap_or(0)
}

async fn put(http: &reqwest::Client, head: &Lumen, config: &Value) {
    let url = format!("{}/api/serve/applications/", head.url("dashboard"));
    let response = http.put(url).json(config).send().await.expect("PUT applications");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
}

async fn complete(http: &reqwest::Client, head: &Lumen, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": true});
    let response =
        http.post(format!("{}/v1/completions", head.url("api"))).json(&body).send().await.expect("completion");
    (response.status().as_u16(), response.json().await.expect("completion JSON"))
}

async fn model_ids(http: &reqwest::Client, head: &Lumen) -> Vec<String> {
    let models: Value =
        http.get(format!("{}/v1/models", head.url("api"))).send().await.expect("models").json().await.expect("JSON");
    let mut ids: Vec<String> =
        models["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str().map(String::from)).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_applications_serve_and_one_scales_from_zero_up_under_load_and_back() {
    let mut args = vec!["head".to_string()];
    args.extend(head_flags());
    let head = Lumen::start(&args);
    let _worker = Lumen::start(&worker_flags(&head.url("grpc"), "w1"));
    let http = reqwest::Client::new();
    let (http, head) = (&http, &head);

    put(http, head, &serve_config(Some(autoscaling(1, 30.0)))).await;
    until("`chat` runs", Duration::from_secs(60), || async move {
        status(http, head).await["applications"]["chat"]["status"] == "RUNNING"
    })
    .await;
    let doc = status(http, head).await;
    let burst = &doc["applications"]["burst"];
    assert_eq!(burst["deployments"]["llm-burst"]["target_num_replicas"], 0, "min_replicas 0 starts at zero: {doc:#}");
    assert_eq!(running_replicas(http, head, "burst", "llm-burst").await, 0);
    let replica = &doc["applications"]["chat"]["deployments"]["llm"]["replicas"][0];
    assert!(replica["start_time_s"].as_f64().is_some_and(|t| t > 1.7e9), "Ray's start_time_s: {replica}");
    assert_eq!(model_ids(http, head).await, ["smol", "smol-burst"]);

    let (code, body) = complete(http, head, "smol").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);

    // Nothing serves `smol-burst`: the request waits at the head, which counts it as load, and
    // the autoscaler brings a replica up without the 30 s upscale delay.
    let started = Instant::now();
    let (code, body) = complete(http, head, "smol-burst").await;
    assert_eq!(code, 200, "a request to a deployment at zero is served once it scales up: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert!(started.elapsed() < Duration::from_secs(30), "scaled up without the upscale delay");
    assert_eq!(running_replicas(http, head, "burst", "llm-burst").await, 1);

    // Under load (four clients back to back, target one ongoing request per replica) a second
    // replica comes up after the 1 s upscale delay; with one client left the deployment drains
    // back to one replica while requests keep flowing, and none of them fails.
    put(http, head, &serve_config(Some(autoscaling(2, 1.0)))).await;
    let heavy = Load::start(http, head, 4);
    until("`llm-burst` scaled up to two under load", Duration::from_secs(60), || async move {
        running_replicas(http, head, "burst", "llm-burst").await == 2
    })
    .await;
    let mut failures = heavy.finish().await;
    let light = Load::start(http, head, 1);
    until("`llm-burst` drained back to one replica", Duration::from_secs(60), || async move {
        let doc = status(http, head).await;
        let d = &doc["applications"]["burst"]["deployments"]["llm-burst"];
        d["target_num_replicas"] == 1 && d["replicas"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    failures.extend(light.finish().await);
    assert!(failures.is_empty(), "requests failed while scaling: {failures:#?}");

    // Idle for the 2 s downscale delay: back to zero, while `chat` keeps its replica.
    until("`llm-burst` scaled back to zero", Duration::from_secs(30), || async move {
        let doc = status(http, head).await;
        let d = &doc["applications"]["burst"]["deployments"]["llm-burst"];
        d["target_num_replicas"] == 0 && d["replicas"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(running_replicas(http, head, "chat", "llm").await, 1);

    // Declarative: a config without `burst` deletes it; `chat` is untouched.
    put(http, head, &serve_config(None)).await;
    until("`burst` is deleted", Duration::from_secs(30), || async move {
        status(http, head).await["applications"].get("burst").is_none()
    })
    .await;
    assert_eq!(model_ids(http, head).await, ["smol"]);
    let (code, body) = complete(http, head, "smol-burst").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    let (code, _) = complete(http, head, "smol").await;
    assert_eq!(code, 200);
}
