//! `POST /v1/embeddings`, as vLLM serves it for a model run with `--runner pooling`.
//!
//! Owns the endpoint: the body is read and checked ([`request`]), the model must be served for
//! pooling (a generation model answers vLLM's 400 "The model does not support Embeddings API";
//! the generation endpoints answer the same way for a pooling model, see
//! [`ApiState::resolve_for`]), each input becomes its own backend request (a `GenerateRequest`
//! with `pooling` set), all sent at once after one admission, so the worker batches them with
//! everything else, and the vectors come back in input order ([`response`]).
//!
//! Invariants: `data[i]` is input `i`; `usage.prompt_tokens` counts every input's tokens (after
//! truncation) and `total_tokens` equals it; an input whose replica finished without a vector is
//! an error, never a missing entry. Refusals by the worker that name the prompt are reported
//! under `input`. Requests are metered by the API's metrics middleware and recorded in the
//! request log like chat and completions.

pub mod request;
pub mod response;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use lumen_proto::v1 as pb;
use serde_json::{Map, Value};
use tracing::Instrument;

use self::request::EmbeddingRequest;
use crate::api::edge::errors::ApiError;
use crate::api::edge::keys::Caller;
use crate::api::edge::metrics::labelled;
use crate::api::edge::trace::Trace;
use crate::api::generate::{dispatch, stream};
use crate::api::request::body::JsonObject;
use crate::api::{ApiState, request_id};
use crate::backend::Runner;

/// The handler.
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    trace: Trace,
    JsonObject(body): JsonObject,
) -> Response {
    let requested = body.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
    trace.requested_model(&requested);
    labelled(&requested, run(state, caller, body, trace).await)
}

async fn run(state: ApiState, caller: Caller, body: Map<String, Value>, trace: Trace) -> Result<Response, ApiError> {
    let req = EmbeddingRequest::parse(&body)?;
    let card = state.resolve_for(req.model.as_deref(), Runner::Pooling, "Embeddings API")?;
    let pooling = req.pooling(&card)?;
    let id = request_id("embd");
    let span = tracing::info_span!("embedding", request_id = %id, model = %card.id, inputs = req.inputs.len());
    let mut requests: Vec<pb::GenerateRequest> = req
        .inputs
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| pb::GenerateRequest {
            request_id: if i == 0 { id.clone() } else { format!("{id}-{i}") },
            prompt: Some(prompt),
            n: 1,
            pooling: Some(pooling),
            priority: caller.priority(None).unwrap_or(0),
            cache_salt: None,
            ..Default::default()
        })
        .collect();
    let entry = state.enter(&caller, &card, &mut requests)?;
    let collected = async {
        let launch = stream::launch(&state, card.id.clone(), requests, 1, entry, trace).await?;
        dispatch::collect(launch.running().await?).await
    }
    .instrument(span)
    .await
    .map_err(input_param)?;
    let vectors: Vec<Vec<f32>> = collected.embeddings.into_iter().collect::<Option<_>>().ok_or_else(|| {
        ApiError::Internal(
            "the replica finished an input without its embedding (is the worker older than the head?)".into(),
        )
    })?;
    let body =
        response::body(&id, crate::clock::unix_s(), &card.id, &vectors, collected.usage.prompt_tokens, req.encoding);
    Ok(Json(body).into_response())
}

/// The worker names text and token prompts `prompt`; this endpoint calls them `input`.
fn input_param(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidParam { param, message } if param == "prompt" => {
            ApiError::InvalidParam { param: "input".into(), message }
        }
        other => other,
    }
}
