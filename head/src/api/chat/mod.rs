//! `POST /v1/chat/completions`, as vLLM serves it.
//!
//! Messages go to the replica as JSON (it applies the model's chat template); content-part arrays
//! are flattened to their text parts joined by newlines, and any other part type is refused.
//! With a reasoning parser configured for the model, the output is split into
//! `reasoning_content` and `content` ([`reasoning`], a chat concern: the Responses API and tool
//! calling read the chat output); with tools, tool calls are read in the answer
//! ([`crate::api::tools`]).

pub mod reasoning;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use crate::api::completions;
use crate::api::edge::errors::ApiError;
use crate::api::edge::keys::Caller;
use crate::api::edge::metrics::labelled;
use crate::api::edge::trace::Trace;
use crate::api::generate::dispatch::{self, Collected, Meta, Step, Usage, finish_reason, stop_reason_json};
use crate::api::generate::stream::{self, ChunkWriter};
use crate::api::generate::{logprobs, sse};
use crate::api::request::body::{JsonObject, typed};
use crate::api::request::fields;
use crate::api::request::params::{CommonParams, Generation, RouteDefaults, int_in, logprob_count};
use crate::api::request::structured;
use crate::api::tools::output::{self, AnswerFormat, AnswerReader};
use crate::api::tools::request::ToolRequest;
use crate::api::{ApiState, request_id};
use crate::backend::Runner;

/// The fields only chat accepts.
#[derive(Debug, Default, Deserialize)]
struct ChatFields {
    messages: Option<Vec<Map<String, Value>>>,
    max_completion_tokens: Option<i64>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    add_generation_prompt: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
}

/// The handler.
pub async fn handle(
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
    let mut common: CommonParams = typed(&body)?;
    common.priority = caller.priority(common.priority);
    let fields: ChatFields = typed(&body)?;
    fields::check_chat(&body)?;
    let card = state.resolve_for(common.model.as_deref(), Runner::Generate, "Chat Completions API")?;
    let messages = fields.messages.as_ref().ok_or_else(|| ApiError::param("messages", "messages is required"))?;
    // Tools: checked for this model; `required` and a named choice constrain decoding below.
    let tools = ToolRequest::from_body(&body, state.tool_settings(&card.id))?;
    let kwargs = tools.template_kwargs(fields.chat_template_kwargs.as_ref());
    let prompt = chat_prompt(messages, fields.add_generation_prompt.unwrap_or(true), kwargs.as_ref())?;
    if let Some(v) = fields.max_completion_tokens {
        common.max_tokens = Some(int_in("max_completion_tokens", v, 1, u32::MAX as i64)?);
    }
    let top = match fields.top_logprobs {
        Some(k) => logprob_count("top_logprobs", k)?,
        None => 0,
    };
    let want_logprobs = fields.logprobs.unwrap_or(false);
    if top > 0 && !want_logprobs {
        return Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs to be true"));
    }
    let generation = common.validate(RouteDefaults { max_tokens: 0, logprobs: want_logprobs.then_some(top) })?;
    // vLLM's `prompt_logprobs` (top-level in the answer); a stream may ask for 0 and shows none.
    let prompt_k = fields::prompt_logprobs(&body)?.filter(|_| !generation.stream);
    let max_tokens_param = if fields.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    generation.check_context(max_tokens_param, card.max_model_len, None)?;
    let structured_output = constraint(&state, &card.id, &body, &tools)?;
    let reasoning = state.reasoning_parser(&card.id);
    let id = request_id("chatcmpl");
    let span = tracing::info_span!("chat_completion", request_id = %id, model = %card.id);
    let mut request = generate_request(&id, prompt, &generation, &tools, structured_output);
    request.prompt_logprobs = prompt_k;
    let mut requests = vec![request];
    let entry = state.enter(&caller, &card, &mut requests)?;
    let launch =
        stream::launch(&state, card.id.clone(), requests, generation.n, entry, trace).instrument(span.clone()).await?;
    let meta = |object| Meta { id: id.clone(), object, created: crate::clock::unix_s(), model: card.id.clone() };
    let format = AnswerFormat { reasoning, tools: tools.reading(), parallel: tools.parallel };
    if generation.stream {
        let writer = ChatChunks::new(meta("chat.completion.chunk"), generation.n as usize, &format);
        return Ok(stream::respond(launch, writer, generation.include_usage, &state, span));
    }
    let collected = async { dispatch::collect(launch.running().await?).await }.instrument(span).await?;
    let prompt_logprobs = match (prompt_k, collected.prompt_logprobs.first().and_then(Option::as_ref)) {
        (Some(k), Some(p)) => Some(logprobs::prompt_logprobs(p, k)),
        (Some(_), None) => return Err(completions::missing_prompt_logprobs()),
        (None, _) => None,
    };
    let mut body = completion_body(&meta("chat.completion"), collected, &format, want_logprobs);
    if let Some(p) = prompt_logprobs {
        body["prompt_logprobs"] = p;
    }
    Ok(Json(body).into_response())
}

/// The request's structured-output constraint: its own (`response_format`, ...), or the one
/// `tool_choice` "required" or a named function asks for, with the deployment's defaults; on a
/// reasoning model it starts once the reasoning has ended unless `enable_in_reasoning`.
pub(crate) fn constraint(
    state: &ApiState,
    model: &str,
    body: &Map<String, Value>,
    tools: &ToolRequest,
) -> Result<Option<pb::StructuredOutput>, ApiError> {
    let mut structured_output = structured::from_body(body)?;
    if let Some(schema) = tools.constrained_schema()? {
        structured_output = Some(structured::tool_call(structured_output.as_ref(), &schema)?);
    }
    let settings = state.structured_outputs(model);
    let mut structured_output = structured::with_defaults(structured_output, &settings);
    if let (Some(constraint), Some(parser)) = (structured_output.as_mut(), state.reasoning_parser(model))
        && !settings.enable_in_reasoning
    {
        // The constraint governs the answer: it starts once the reasoning has ended.
        let (start, end) = parser.markers();
        (constraint.reasoning_start, constraint.reasoning_end) = (start.into(), end.into());
    }
    Ok(structured_output)
}

/// The replica's request for a chat `prompt`.
pub(crate) fn generate_request(
    id: &str,
    prompt: pb::ChatPrompt,
    generation: &Generation,
    tools: &ToolRequest,
    structured_output: Option<pb::StructuredOutput>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        replica_id: String::new(),
        request_id: id.to_string(),
        prompt: Some(pb::generate_request::Prompt::Chat(prompt)),
        sampling: Some(generation.sampling.clone()),
        stop: Some(generation.stop.clone()),
        n: generation.n,
        skip_special_tokens: generation.skip_special_tokens && !tools.keeps_special_tokens(),
        return_prompt: false,
        structured_output,
        resume: None,
        return_prompt_token_ids: false,
        prompt_logprobs: None,
        pooling: None,
        priority: generation.priority,
        cache_salt: generation.cache_salt.clone(),
        tenant: String::new(), // set by `enter`
        tenant_weight: 0,
    }
}

/// The replica's chat prompt: messages with text-only content, as JSON.
pub fn chat_prompt(
    messages: &[Map<String, Value>],
    add_generation_prompt: bool,
    template_kwargs: Option<&Map<String, Value>>,
) -> Result<pb::ChatPrompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "messages must hold at least one message"));
    }
    let normalized =
        messages.iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect::<Result<Vec<_>, _>>()?;
    Ok(pb::ChatPrompt {
        messages_json: Value::Array(normalized).to_string(),
        add_generation_prompt,
        template_kwargs_json: template_kwargs.map(|k| Value::Object(k.clone()).to_string()).unwrap_or_default(),
    })
}

/// The roles OpenAI's chat API defines; templates know no others.
pub const ROLES: [&str; 6] = ["system", "developer", "user", "assistant", "tool", "function"];

fn normalize_message(i: usize, message: &Map<String, Value>) -> Result<Value, ApiError> {
    match message.get("role") {
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => {}
        Some(Value::String(role)) => {
            return Err(ApiError::param(
                format!("messages[{i}].role"),
                format!("unknown role {role:?}; expected one of {}", ROLES.join(", ")),
            ));
        }
        Some(_) => return Err(ApiError::param(format!("messages[{i}].role"), "role must be a string")),
        None => return Err(ApiError::param(format!("messages[{i}].role"), "every message needs a role")),
    }
    match message.get("name") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(other) => {
            return Err(ApiError::param(format!("messages[{i}].name"), format!("name must be a string, got {other}")));
        }
    }
    crate::api::tools::messages::check_message(i, message)?;
    let mut out = message.clone();
    let content = match message.get("content") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => Value::String(text_of_parts(i, parts)?),
        Some(_) => {
            return Err(ApiError::param(
                format!("messages[{i}].content"),
                "content must be a string or a list of content parts",
            ));
        }
    };
    out.insert("content".into(), content);
    Ok(Value::Object(out))
}

fn text_of_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        let kind = part.get("type").and_then(Value::as_str);
        match (kind, part.get("text")) {
            (Some("text"), Some(Value::String(text))) => texts.push(text.as_str()),
            (Some("text"), _) => return Err(ApiError::param(param, "a text part needs a string `text`")),
            (Some(other), _) => {
                return Err(ApiError::param(
                    param,
                    format!("content parts of type `{other}` are not supported; only `text` parts are"),
                ));
            }
            (None, _) => return Err(ApiError::param(param, "every content part needs a `type`")),
        }
    }
    Ok(texts.join("\n"))
}

fn completion_body(meta: &Meta, collected: Collected, format: &AnswerFormat, logprobs: bool) -> Value {
    let choices: Vec<Value> = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| {
            let (message, called) = output::message(format, &choice.text);
            json!({
                "index": index,
                "message": message,
                "logprobs": if logprobs { logprobs::chat(&choice.logprobs) } else { Value::Null },
                "finish_reason": choice.finish_reason.map(|r| output::finish_reason(r, called)),
                "stop_reason": stop_reason_json(&choice.stop_reason),
            })
        })
        .collect();
    meta.object(Value::Array(choices), Some(collected.usage))
}

/// Writes `chat.completion.chunk`s.
struct ChatChunks {
    meta: Meta,
    choices: usize,
    /// Per choice: reasoning, content and tool calls of each delta.
    readers: Vec<AnswerReader>,
}

impl ChatChunks {
    fn new(meta: Meta, choices: usize, format: &AnswerFormat) -> Self {
        ChatChunks { meta, choices, readers: (0..choices).map(|_| AnswerReader::new(format)).collect() }
    }

    fn chunk(&self, choices: Value, usage: Option<Usage>) -> Bytes {
        sse::data(&self.meta.object(choices, usage))
    }
}

impl ChunkWriter for ChatChunks {
    fn started(&mut self) -> Vec<Bytes> {
        (0..self.choices)
            .map(|index| {
                self.chunk(
                    json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": null, "finish_reason": null}]),
                    None,
                )
            })
            .collect()
    }

    fn step(&mut self, step: Step) -> Vec<Bytes> {
        let Step::Delta { index, delta } = step else { return Vec::new() };
        let finish = finish_reason(&delta);
        let Some(reader) = self.readers.get_mut(index) else { return Vec::new() };
        let out = reader.push(&delta.text, finish.is_some()).delta();
        if out.is_empty() && delta.logprobs.is_empty() && finish.is_none() {
            return Vec::new();
        }
        let called = reader.called();
        let mut choice = json!({
            "index": index,
            "delta": out,
            "logprobs": if delta.logprobs.is_empty() { Value::Null } else { logprobs::chat(&delta.logprobs) },
            "finish_reason": finish.map(|r| output::finish_reason(r, called)),
        });
        if finish.is_some() {
            choice["stop_reason"] = stop_reason_json(&delta.stop_reason);
        }
        vec![self.chunk(json!([choice]), None)]
    }

    fn usage(&mut self, usage: Usage) -> Bytes {
        self.chunk(json!([]), Some(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(json: &str) -> Vec<Map<String, Value>> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn text_parts_are_joined_into_string_content() {
        let m = messages(r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#);
        let prompt = chat_prompt(&m, true, None).unwrap();
        let sent: Value = serde_json::from_str(&prompt.messages_json).unwrap();
        assert_eq!(sent, json!([{"role": "user", "content": "a\nb"}]));
        assert!(prompt.add_generation_prompt);
        assert_eq!(prompt.template_kwargs_json, "");
    }

    #[test]
    fn image_parts_are_refused_naming_the_part() {
        let m = messages(r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#);
        match chat_prompt(&m, true, None) {
            Err(ApiError::InvalidParam { param, message }) => {
                assert_eq!(param, "messages[0].content[0]");
                assert!(message.contains("image_url"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn messages_need_a_role_and_must_not_be_empty() {
        assert!(
            matches!(chat_prompt(&[], true, None), Err(ApiError::InvalidParam { param, .. }) if param == "messages")
        );
        let m = messages(r#"[{"content":"hi"}]"#);
        assert!(
            matches!(chat_prompt(&m, true, None), Err(ApiError::InvalidParam { param, .. }) if param == "messages[0].role")
        );
    }

    #[test]
    fn a_name_must_be_a_string() {
        let m = messages(r#"[{"role":"user","content":"hi","name":7}]"#);
        assert!(
            matches!(chat_prompt(&m, true, None), Err(ApiError::InvalidParam { param, .. }) if param == "messages[0].name")
        );
        assert!(chat_prompt(&messages(r#"[{"role":"user","content":"hi","name":"ann"}]"#), true, None).is_ok());
    }

    #[test]
    fn template_kwargs_travel_as_json() {
        let m = messages(r#"[{"role":"user","content":"hi"}]"#);
        let kwargs: Map<String, Value> = serde_json::from_str(r#"{"enable_thinking": false}"#).unwrap();
        let prompt = chat_prompt(&m, false, Some(&kwargs)).unwrap();
        assert_eq!(prompt.template_kwargs_json, r#"{"enable_thinking":false}"#);
        assert!(!prompt.add_generation_prompt);
    }
}
