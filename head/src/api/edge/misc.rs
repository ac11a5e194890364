//! The small routes: `/v1/models`, `/health`, `/-/healthz`, `/version`, `/metrics`, `/tokenize`,
//! `/detokenize` and the fallback, in vLLM's (and KubeRay's) shapes.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::edge::errors::ApiError;
use crate::api::edge::keys::Caller;
use crate::api::edge::metrics::labelled;
use crate::api::request::body::{JsonObject, typed};
use crate::api::request::fields;
use crate::api::request::params;
use crate::api::{ApiState, chat};

/// `GET /v1/models`: the models the caller's key may use.
pub async fn models(State(state): State<ApiState>, caller: Caller) -> Json<Value> {
    let data: Vec<Value> = state
        .backend
        .models()
        .into_iter()
        .filter(|m| caller.may_use(&m.id))
        .map(|m| {
            json!({
                "id": m.id,
                "object": "model",
                "created": m.created,
                "owned_by": m.owned_by,
                "root": m.id,
                "parent": null,
                "max_model_len": m.max_model_len,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /health`: 200 with an empty body when a replica can take requests, else 503.
pub async fn health(State(state): State<ApiState>) -> StatusCode {
    if state.backend.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

/// `GET /-/healthz` (KubeRay's probe): `success` when ready, else 503.
pub async fn healthz(State(state): State<ApiState>) -> (StatusCode, &'static str) {
    if state.backend.ready() {
        (StatusCode::OK, "success")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no replica is ready")
    }
}

/// `GET /version`.
pub async fn version(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({"version": state.config.version}))
}

/// `GET /metrics`: the whole registry in Prometheus' text format.
pub async fn metrics(State(state): State<ApiState>) -> Response {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut text = Vec::new();
    match encoder.encode(&state.registry.gather(), &mut text) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => ApiError::Internal(format!("could not encode the metrics: {e}")).into_response(),
    }
}

/// Unknown routes answer OpenAI's 404 body.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::RouteNotFound { method: request.method().to_string(), path: request.uri().path().to_string() }
}

/// Known routes asked with another method answer OpenAI's 405 body (axum adds `Allow`).
pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed { method: request.method().to_string(), path: request.uri().path().to_string() }
}

#[derive(Deserialize)]
struct TokenizeFields {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Map<String, Value>>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    /// Passed to the chat template, as in chat requests.
    tools: Option<Value>,
    return_token_strs: Option<bool>,
}

/// `POST /tokenize`: `prompt` (text) or `messages` (chat template applied) -> token ids.
pub async fn tokenize(State(state): State<ApiState>, JsonObject(body): JsonObject) -> Response {
    let checked = typed::<TokenizeFields>(&body).and_then(|f| fields::check(&body, fields::TOKENIZE).map(|()| f));
    let fields = match checked {
        Ok(f) => f,
        Err(e) => return labelled("", Err(e)),
    };
    let model = fields.model.clone().unwrap_or_default();
    labelled(&model, run_tokenize(&state, fields).await)
}

async fn run_tokenize(state: &ApiState, fields: TokenizeFields) -> Result<Response, ApiError> {
    let card = state.resolve_model(fields.model.as_deref())?;
    let input = match (fields.prompt, fields.messages) {
        (Some(text), None) => pb::tokenize_request::Input::Text(pb::TextPrompt {
            text,
            add_special_tokens: fields.add_special_tokens.unwrap_or(true),
        }),
        (None, Some(messages)) => {
            let tools = crate::api::tools::request::check_tools(fields.tools.as_ref())?;
            let kwargs =
                crate::api::tools::request::template_kwargs(tools.as_deref(), fields.chat_template_kwargs.as_ref());
            let add_generation_prompt = fields.add_generation_prompt.unwrap_or(true);
            pb::tokenize_request::Input::Chat(chat::chat_prompt(&messages, add_generation_prompt, kwargs.as_ref())?)
        }
        (Some(_), Some(_)) => return Err(ApiError::param("prompt", "send either prompt or messages, not both")),
        (None, None) => return Err(ApiError::param("prompt", "prompt or messages is required")),
    };
    let return_token_strs = fields.return_token_strs.unwrap_or(false);
    let request = pb::TokenizeRequest { replica_id: String::new(), input: Some(input), return_token_strs };
    let reply = state.backend.tokenize(&card.id, request).await?;
    let token_strs = if return_token_strs { json!(reply.token_strs) } else { Value::Null };
    Ok(Json(json!({
        "count": reply.count,
        "max_model_len": reply.max_model_len,
        "tokens": reply.token_ids,
        "token_strs": token_strs,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct DetokenizeFields {
    model: Option<String>,
    tokens: Option<Vec<i64>>,
}

/// `POST /detokenize`: token ids -> `{"prompt": text}`.
pub async fn detokenize(State(state): State<ApiState>, JsonObject(body): JsonObject) -> Response {
    let fields: DetokenizeFields = match typed(&body) {
        Ok(f) => f,
        Err(e) => return labelled("", Err(e)),
    };
    let model = fields.model.clone().unwrap_or_default();
    labelled(&model, run_detokenize(&state, fields).await)
}

async fn run_detokenize(state: &ApiState, fields: DetokenizeFields) -> Result<Response, ApiError> {
    let card = state.resolve_model(fields.model.as_deref())?;
    let tokens = fields.tokens.ok_or_else(|| ApiError::param("tokens", "tokens is required"))?;
    let token_ids = params::token_ids("tokens", &tokens)?;
    let request = pb::DetokenizeRequest { replica_id: String::new(), token_ids };
    let reply = state.backend.detokenize(&card.id, request).await?;
    Ok(Json(json!({"prompt": reply.text})).into_response())
}
