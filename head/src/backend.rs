//! The one seam between the HTTP layer and the cluster: the OpenAI API asks a [`Backend`] for
//! models and for a stream of generation events; the cluster implements it by routing to a
//! replica over gRPC, and tests can put a fake behind it.

use std::pin::Pin;

use futures::Stream;
use lumen_proto::v1 as pb;

/// Requests a model's admission gate, and the router for each replica, let run beyond
/// `max_ongoing_requests` for a tenant under its weighted share while another tenant holds every
/// slot (the fair queue policy's headroom, `api::generate::admission`): an eighth of the limit,
/// none below 8.
pub fn fair_headroom(max_ongoing_requests: usize) -> usize {
    max_ongoing_requests / 8
}

/// A model the head can route to.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCard {
    /// The name clients send in `model`.
    pub id: String,
    pub max_model_len: u32,
    /// Unix seconds when it became available.
    pub created: u64,
    pub owned_by: String,
    /// What the model is served for; its endpoints follow (vLLM's `--runner`).
    pub runner: Runner,
}

/// What a model is served for, as vLLM's `--runner`: generation (chat, completions, responses)
/// or pooling (embeddings). Each kind of endpoint answers 400 for a model of the other kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runner {
    #[default]
    Generate,
    Pooling,
}

impl Runner {
    /// The runner a deployment's `model:` options (as JSON) ask for: pooling with `runner:
    /// pooling` or `convert: embed` (the worker's rule), else generation.
    pub fn of_options_json(json: &str) -> Runner {
        let options: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
        let is = |key: &str, value: &str| options.get(key).and_then(serde_json::Value::as_str) == Some(value);
        if is("runner", "pooling") || is("convert", "embed") { Runner::Pooling } else { Runner::Generate }
    }
}

/// Why the backend could not serve a request; the HTTP layer maps each to a status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// 404: no deployment serves this model name.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// 503: the model exists but no replica is live.
    #[error("no live replica serves `{0}` right now")]
    NoReplica(String),
    /// 429: every replica's queue is full.
    #[error("the server is overloaded: {0}")]
    Overloaded(String),
    /// 400: the replica rejected the request; `param` names the offending parameter if known.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String> },
    /// 503: the replica failed or went away.
    #[error("the replica is unavailable: {0}")]
    Unavailable(String),
    /// 500: anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Generation events of one request; dropping the stream aborts the request on its replica.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, BackendError>> + Send>>;

/// What the OpenAI API needs from the cluster.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Every model currently deployed (served or not).
    fn models(&self) -> Vec<ModelCard>;

    /// Whether at least one replica can take requests (`/health`).
    fn ready(&self) -> bool;

    /// Routes `request` (its `replica_id` left empty) to a replica of `model` and streams its events.
    async fn generate(&self, model: &str, request: pb::GenerateRequest) -> Result<EventStream, BackendError>;

    /// [`Backend::generate`] on a replica not in `avoid` (replicas that failed this request
    /// already: a migrated request must not go back to them). By default `avoid` is ignored.
    async fn generate_avoiding(
        &self,
        model: &str,
        request: pb::GenerateRequest,
        avoid: &[String],
    ) -> Result<EventStream, BackendError> {
        let _ = avoid;
        self.generate(model, request).await
    }

    async fn tokenize(&self, model: &str, request: pb::TokenizeRequest) -> Result<pb::TokenizeReply, BackendError>;

    async fn detokenize(
        &self,
        model: &str,
        request: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeReply, BackendError>;
}

/// Where a backend sent a request (for the request log; see [`note_route`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    pub deployment: String,
    pub replica_id: String,
}

/// Where [`note_route`] writes, shared by the caller of [`with_route_slot`].
pub type RouteSlot = std::sync::Arc<std::sync::Mutex<Option<Routed>>>;

tokio::task_local! {
    static ROUTE_SLOT: RouteSlot;
}

/// Runs `future` so that the [`note_route`] calls a backend makes inside it write to `slot`.
pub async fn with_route_slot<F: std::future::Future>(slot: RouteSlot, future: F) -> F::Output {
    ROUTE_SLOT.scope(slot, future).await
}

/// Called by a backend once a request is on a replica; does nothing outside [`with_route_slot`].
pub fn note_route(deployment: &str, replica_id: &str) {
    let _ = ROUTE_SLOT.try_with(|slot| {
        let routed = Routed { deployment: deployment.to_string(), replica_id: replica_id.to_string() };
        *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(routed);
    });
}

#[cfg(test)]
mod tests {
    use super::Runner;

    #[test]
    fn the_runner_follows_the_deployments_options() {
        assert_eq!(Runner::of_options_json(""), Runner::Generate);
        assert_eq!(Runner::of_options_json(r#"{"runner": "auto", "convert": "auto"}"#), Runner::Generate);
        assert_eq!(Runner::of_options_json(r#"{"runner": "pooling"}"#), Runner::Pooling);
        assert_eq!(Runner::of_options_json(r#"{"runner": "auto", "convert": "embed"}"#), Runner::Pooling);
    }
}
