//! A head-side stack for the control API's tests: the cluster (gRPC + controller) with fake
//! workers, the control router and the OpenAI router over HTTP on ephemeral ports, and a state
//! directory; plus builders of serve configs.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lumen_head::api::{ApiConfig, ApiState};
use lumen_head::control::{Applications, ControlState};
use lumen_head::state_store::StateStore;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::cluster_common::*;

/// A head-side stack: cluster, control API and OpenAI API on ephemeral ports.
pub struct Stack {
    pub head: TestHead,
    pub control: String,
    pub api: String,
    pub http: reqwest::Client,
    _stop_http: Vec<oneshot::Sender<()>>,
}

/// Starts a stack that restores what `state_dir` holds, as a head started without `--config`.
pub async fn start_stack(state_dir: &Path) -> Stack {
    start_guarded_stack(state_dir, None).await
}

/// [`start_stack`] with the control API guarded by `admin_token` (`--admin-token`).
pub async fn start_guarded_stack(state_dir: &Path, admin_token: Option<&str>) -> Stack {
    let head = start_head(settings(), vec![]).await;
    let registry = prometheus::Registry::new();
    let api = ApiState::new(Arc::new(head.cluster.clone()), ApiConfig::default(), registry.clone()).expect("api");
    let store = StateStore::open(state_dir).expect("state dir");
    let applications = Applications::new(head.cluster.clone(), api.clone(), Some(store));
    applications.initialize(None, Vec::new()).expect("restore");
    let (control, stop_control) = serve(lumen_head::control::router(ControlState {
        applications,
        registry,
        admin_token: admin_token.map(str::to_string),
    }))
    .await;
    let (api, stop_api) = serve(lumen_head::api::router(api)).await;
    Stack { head, control, api, http: reqwest::Client::new(), _stop_http: vec![stop_control, stop_api] }
}

pub async fn serve(router: axum::Router) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    (url, stop)
}

impl Stack {
    pub fn applications_url(&self) -> String {
        format!("{}/api/serve/applications/", self.control)
    }

    pub async fn put(&self, config: &Value) -> (StatusCode, String) {
        let r = self.http.put(self.applications_url()).json(config).send().await.expect("PUT");
        (r.status(), r.text().await.expect("body"))
    }

    pub async fn status(&self) -> Value {
        let r = self.http.get(self.applications_url()).send().await.expect("GET");
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.expect("status JSON")
    }

    /// Polls the status document until `condition` holds (10 s at most).
    pub async fn status_until(&self, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status().await;
            if condition(&status) {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}: {status:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn chat(&self, model: &str) -> (StatusCode, Value) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let r = self.http.post(format!("{}/v1/chat/completions", self.api)).json(&body).send().await.expect("chat");
        (r.status(), r.json().await.expect("chat JSON"))
    }
}

/// An application `name` with one deployment `llm` serving `model`; `model_fields` and
/// `deployment_fields` are added to its `model:` section and to the deployment.
pub fn app(name: &str, model: &str, replicas: u32, model_fields: Value, deployment_fields: Value) -> Value {
    let mut model_section =
        json!({"source": format!("{model}.gguf"), "served_model_name": model, "max_model_len": 2048});
    merge(&mut model_section, model_fields);
    let mut deployment = json!({"name": "llm", "num_replicas": replicas, "model": model_section});
    merge(&mut deployment, deployment_fields);
    json!({"name": name, "route_prefix": format!("/{name}"), "deployments": [deployment]})
}

pub fn merge(into: &mut Value, fields: Value) {
    if let (Some(into), Value::Object(fields)) = (into.as_object_mut(), fields) {
        into.extend(fields);
    }
}

pub fn config(apps: &[Value]) -> Value {
    json!({ "applications": apps })
}

pub fn all_running(status: &Value, apps: &[(&str, u64)]) -> bool {
    status["applications"].as_object().is_some_and(|a| a.len() == apps.len())
        && apps.iter().all(|(name, replicas)| {
            let app = &status["applications"][name];
            app["status"] == "RUNNING" && app["deployments"]["llm"]["replica_states"]["RUNNING"] == *replicas
        })
}

pub async fn workers(stack: &Stack, count: usize) -> Vec<FakeWorker> {
    let mut workers = Vec::new();
    for i in 0..count {
        let mut worker = FakeWorker::start(&format!("w{i}")).await;
        worker.join(&stack.head).await;
        workers.push(worker);
    }
    workers
}
