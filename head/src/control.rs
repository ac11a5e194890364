//! The control server on port 8265. Today: the probes KubeRay uses and the metrics; the Ray-shaped
//! REST API (`/api/serve/applications/`) and the dashboard come with the cluster and
//! observability work.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;

use crate::cluster::Cluster;

/// What the control handlers share.
#[derive(Clone)]
pub struct ControlState {
    pub cluster: Cluster,
    /// The same registry the API's `/metrics` serves.
    pub registry: prometheus::Registry,
}

pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/gcs_healthz", get(|| async { "success" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><title>Lumen</title><h1>Lumen</h1><p>The dashboard is not built yet; the OpenAI API is on port 8000.</p>",
    )
}

async fn metrics(State(state): State<ControlState>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&state.registry.gather(), &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
