//! The worker's own `/metrics` (pod-level scraping, like Ray's per-node metrics export port):
//! vLLM's series of every replica this worker hosts, labelled `model_name` and `replica`, built
//! by the same conversion the head uses (`lumen_proto::metrics`). A replica still loading has no
//! model yet and is left out. `GET /` answers a one-line pointer, anything else 404.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use lumen_proto::metrics::{EncodeError, Families, TEXT_CONTENT_TYPE, WORKER_LABELS, encode_text};
use lumen_proto::tls::ServerTls;
use lumen_proto::v1 as pb;
use tokio::net::TcpListener;

use super::node::WorkerNode;

/// The metrics router over `node`.
pub fn metrics_router(node: WorkerNode) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/", get(index)).with_state(node)
}

/// Serves [`metrics_router`] in plain HTTP on an already-bound listener until `shutdown`
/// resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    node: WorkerNode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_metrics_tls(listener, node, None, shutdown).await
}

/// [`serve_metrics`], over HTTPS with `tls`.
pub async fn serve_metrics_tls(
    listener: TcpListener,
    node: WorkerNode,
    tls: Option<&ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%address, https = tls.is_some(), "worker metrics listening");
    lumen_proto::tls::serve_http(listener, metrics_router(node), tls, shutdown).await
}

/// The text exposition of `replicas` (those with a model name).
pub fn exposition(replicas: &[pb::ReplicaStats]) -> Result<String, EncodeError> {
    let mut families = Families::new();
    for stats in replicas.iter().filter(|s| !s.model_name.is_empty()) {
        let [model, replica] = WORKER_LABELS;
        families.add_replica(stats, &[(model, &stats.model_name), (replica, &stats.replica_id)]);
    }
    encode_text(&families.into_vec())
}

async fn metrics(State(node): State<WorkerNode>) -> Response {
    match exposition(&node.stats().await) {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response(),
    }
}

async fn index() -> &'static str {
    "lumen worker: metrics at /metrics\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_replicas_are_left_out_and_running_ones_are_labelled() {
        let running = pb::ReplicaStats {
            replica_id: "llm-1".into(),
            model_name: "smol".into(),
            running: 3,
            ..Default::default()
        };
        let loading = pb::ReplicaStats { replica_id: "llm-2".into(), ..Default::default() };
        let text = exposition(&[running, loading]).expect("encodes");
        assert!(
            text.lines().any(|l| l == r#"vllm:num_requests_running{model_name="smol",replica="llm-1"} 3"#),
            "{text}"
        );
        assert!(!text.contains("llm-2"), "{text}");
    }
}
