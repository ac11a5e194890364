//! `POST /v1/responses` (OpenAI's Responses API, as vLLM serves it), `GET`/`DELETE
//! /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`, built on the chat path: the request
//! is translated into a chat request ([`request`]), its `input` into chat messages ([`items`]),
//! and it runs through chat's checks, constraint, dispatch and answer reader; only the output's
//! shape is its own ([`output`], streamed as typed events by [`events`]).
//!
//! Conversation state: with `store` (default true) a finished response is kept in the bounded
//! [`store::ResponseStore`] with its whole conversation; `previous_response_id` starts the next
//! turn from that conversation (the new `instructions`, if any, first as a system message; the
//! earlier turns' instructions are not carried over, as OpenAI documents). An id not in the
//! store is a 404, as vLLM answers it. A streamed response is stored when its stream ends; one
//! that fails or whose client goes away is not stored.
//!
//! Lumen runs nothing in the background, so `cancel` on a stored response answers vLLM's 400.

pub mod events;
pub mod items;
pub mod output;
pub mod request;
pub mod store;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use self::output::{Header, Status};
use self::request::ResponsesRequest;
use self::store::Stored;
use crate::api::edge::errors::ApiError;
use crate::api::edge::keys::Caller;
use crate::api::edge::metrics::labelled;
use crate::api::edge::trace::Trace;
use crate::api::generate::{dispatch, stream};
use crate::api::request::body::{JsonObject, typed};
use crate::api::request::params::{CommonParams, RouteDefaults};
use crate::api::tools::output::AnswerFormat;
use crate::api::tools::request::ToolRequest;
use crate::api::{ApiState, chat};
use crate::backend::Runner;

/// `POST /v1/responses`.
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
    let request = ResponsesRequest::parse(&body)?;
    let card =
        state.resolve_for(request.chat.get("model").and_then(Value::as_str), Runner::Generate, "Responses API")?;
    let mut history = match &request.previous_response_id {
        Some(previous) => state
            .responses
            .get(previous)
            .ok_or_else(|| ApiError::ResponseNotFound {
                id: previous.clone(),
                param: Some("previous_response_id".into()),
            })?
            .messages
            .clone(),
        None => Vec::new(),
    };
    history.extend(items::messages(&request.input)?);
    let instructions = request.instructions.iter().map(|text| json!({"role": "system", "content": text}));
    let messages: Vec<Map<String, Value>> =
        instructions.chain(history.iter().cloned()).filter_map(|m| m.as_object().cloned()).collect();

    let tools = ToolRequest::from_body(&request.chat, state.tool_settings(&card.id))?;
    let kwargs = tools.template_kwargs(None);
    let prompt = chat::chat_prompt(&messages, true, kwargs.as_ref())?;
    let mut common: CommonParams = typed(&request.chat)?;
    common.priority = caller.priority(common.priority);
    let generation = common.validate(RouteDefaults { max_tokens: 0, logprobs: None })?;
    generation.check_context("max_output_tokens", card.max_model_len, None)?;
    let mut structured_output =
        chat::constraint(&state, &card.id, &request.chat, &tools).map_err(request::rename_format_param)?;
    if let Some(constraint) = structured_output.as_mut().filter(|c| c.param == "response_format") {
        // The replica names this in errors about the schema.
        constraint.param = "text.format".into();
    }

    let id = format!("resp_{:032x}", rand::random::<u128>());
    let span = tracing::info_span!("response", request_id = %id, model = %card.id);
    let generate = chat::generate_request(&id, prompt, &generation, &tools, structured_output);
    let mut requests = vec![generate];
    let entry = state.enter(&caller, &card, &mut requests)?;
    let launch = stream::launch(&state, card.id.clone(), requests, 1, entry, trace).instrument(span.clone()).await?;
    let header =
        Header { id: id.clone(), created_at: crate::clock::unix_s(), model: card.id.clone(), echo: request.echo };
    let format =
        AnswerFormat { reasoning: state.reasoning_parser(&card.id), tools: tools.reading(), parallel: tools.parallel };
    let store = request.store.then(|| (state.responses.clone(), history));
    if request.stream {
        let writer = events::ResponseEvents::new(header, &format, store);
        return Ok(stream::respond(launch, writer, false, &state, span));
    }
    let collected = async { dispatch::collect(launch.running().await?).await }.instrument(span).await?;
    let choice = collected.choices.into_iter().next().unwrap_or_default();
    let (items, answer) = output::items(&format, &choice.text);
    let response = header.response(Status::of(choice.finish_reason), items, Some(collected.usage));
    if let Some((store, mut messages)) = store {
        messages.push(answer);
        store.insert(&id, Stored { response: response.clone(), messages });
    }
    Ok(Json(response).into_response())
}

fn not_found(id: String) -> ApiError {
    ApiError::ResponseNotFound { id, param: None }
}

/// `GET /v1/responses/{id}`: a stored response.
pub async fn retrieve(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let stored = state.responses.get(&id).ok_or_else(|| not_found(id))?;
    Ok(Json(stored.response.clone()).into_response())
}

/// `DELETE /v1/responses/{id}`: forgets a stored response (OpenAI's answer shape).
pub async fn delete(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !state.responses.remove(&id) {
        return Err(not_found(id));
    }
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

/// `POST /v1/responses/{id}/cancel`: nothing runs in the background, so a stored response cannot
/// be cancelled (vLLM's 400) and an unknown one is a 404.
pub async fn cancel(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    state.responses.get(&id).ok_or_else(|| not_found(id))?;
    Err(ApiError::NotCancellable)
}
