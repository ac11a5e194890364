//! A `POST /v1/responses` body, checked and translated into the chat request it amounts to, so
//! the chat path's checks (sampling, tools, structured outputs) run on it unchanged.
//!
//! Translation: `max_output_tokens` -> `max_tokens`; `temperature`, `top_p`, `stream`,
//! `parallel_tool_calls`, `user` as they are; function `tools` (`{"type": "function", "name",
//! "description", "parameters", "strict"}`) -> chat's `{"type": "function", "function": {...}}`
//! (same order, so errors name the same `tools[i]`); `tool_choice` `{"type": "function",
//! "name"}` -> chat's named choice; `text.format` -> `response_format` (errors about it name
//! `text.format`).
//!
//! Refused with a 400 naming the field: built-in tools (`web_search`, `file_search`, `mcp`, ...),
//! `background: true`, any `include` value (Lumen produces none of them), `conversation`,
//! `prompt` (stored prompt templates), and the vLLM extras that would change the answer
//! ([`RESPONSES`]). Informational fields (`metadata`, `user`, `service_tier`, `reasoning`, ...)
//! are type-checked and echoed or ignored.

use serde_json::{Map, Value, json};

use crate::api::edge::errors::ApiError;
use crate::api::request::fields::{self, Expect, Field, Inert, field};
use crate::api::request::params::int_in;

/// The fields of a Responses request that Lumen checks and refuses unless inert.
pub const RESPONSES: &[Field] = &[
    field("background", Expect::Bool, true, Inert::False),
    field("include", Expect::StrList, true, Inert::Empty),
    field("conversation", Expect::Any, true, Inert::Null),
    field("prompt", Expect::Object, true, Inert::Null),
    field("previous_input_messages", Expect::ObjectList, true, Inert::Null),
    field("enable_response_messages", Expect::Bool, false, Inert::False),
    field("max_tool_calls", Expect::IntAtLeast(1), true, Inert::Any),
    field("service_tier", Expect::OneOf(&["auto", "default", "flex", "scale", "priority"]), true, Inert::Any),
    field("truncation", Expect::OneOf(&["auto", "disabled"]), true, Inert::Any),
    field("top_logprobs", Expect::IntAtLeast(0), true, Inert::Any),
    field("reasoning", Expect::Object, true, Inert::Any),
    field("prompt_cache_key", Expect::Str, true, Inert::Any),
    field("safety_identifier", Expect::Str, true, Inert::Any),
    field("stream_options", Expect::Object, true, Inert::Any),
    field("user", Expect::Str, true, Inert::Any),
    field("metadata", Expect::Object, true, Inert::Any),
    field("instructions", Expect::Str, true, Inert::Any),
    field("previous_response_id", Expect::Str, true, Inert::Any),
    field("store", Expect::Bool, true, Inert::Any),
    field("stream", Expect::Bool, true, Inert::Any),
    field("parallel_tool_calls", Expect::Bool, true, Inert::Any),
    field("request_id", Expect::Str, false, Inert::Any),
    field("priority", Expect::Int, false, Inert::Zero),
    field("cache_salt", Expect::StrLen(1, 1024), true, Inert::Null),
    field("mm_processor_kwargs", Expect::Object, true, Inert::Any),
];

/// A checked Responses request.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesRequest {
    /// The chat request it amounts to, without `messages` (see the module docs).
    pub chat: Map<String, Value>,
    /// `input`, as given.
    pub input: Value,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    /// `store` (default true).
    pub store: bool,
    pub stream: bool,
    /// The request's parameters as the response object repeats them.
    pub echo: Map<String, Value>,
}

impl ResponsesRequest {
    pub fn parse(body: &Map<String, Value>) -> Result<Self, ApiError> {
        fields::check(body, RESPONSES)?;
        let input = body.get("input").cloned().unwrap_or(Value::Null);
        let str_of = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
        let mut chat = Map::new();
        for key in ["model", "temperature", "top_p", "stream", "parallel_tool_calls", "user"] {
            if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
                chat.insert(key.into(), v.clone());
            }
        }
        let max_output_tokens = match body.get("max_output_tokens") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) => Some(int_in("max_output_tokens", n, 1, u32::MAX as i64)?),
                None => {
                    return Err(ApiError::param(
                        "max_output_tokens",
                        format!("max_output_tokens must be an integer, got {v}"),
                    ));
                }
            },
        };
        if let Some(n) = max_output_tokens {
            chat.insert("max_tokens".into(), n.into());
        }
        let tools = match body.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => {
                tools.iter().enumerate().map(|(i, t)| chat_tool(i, t)).collect::<Result<_, _>>()?
            }
            Some(other) => return Err(ApiError::param("tools", format!("tools must be a list of tools, got {other}"))),
        };
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
        }
        if let Some(choice) = body.get("tool_choice").filter(|v| !v.is_null()) {
            chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
        }
        let format = text_format(body.get("text"))?;
        if let Some(format) = &format {
            chat.insert("response_format".into(), format.clone());
        }
        let echo = echo(body, max_output_tokens);
        Ok(ResponsesRequest {
            chat,
            input,
            instructions: str_of("instructions"),
            previous_response_id: str_of("previous_response_id"),
            store: body.get("store").and_then(Value::as_bool).unwrap_or(true),
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            echo,
        })
    }
}

/// A Responses function tool as chat's tool.
fn chat_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let at = format!("tools[{i}]");
    let Some(tool) = tool.as_object() else {
        return Err(ApiError::param(at, format!("a tool must be an object, got {tool}")));
    };
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(ApiError::param(
                format!("{at}.type"),
                format!("tools of type `{other}` are not supported by Lumen; only `function` tools are"),
            ));
        }
        None => return Err(ApiError::param(format!("{at}.type"), "every tool needs a `type`")),
    }
    let mut function = Map::new();
    for key in ["name", "description", "parameters", "strict"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            function.insert(key.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// A Responses `tool_choice` as chat's.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) => match (o.get("type").and_then(Value::as_str), o.get("name")) {
            (Some("function"), Some(Value::String(name))) => {
                Ok(json!({"type": "function", "function": {"name": name}}))
            }
            (Some("function"), _) => {
                Err(ApiError::param("tool_choice", "a function tool_choice needs a string `name`"))
            }
            (kind, _) => Err(ApiError::param(
                "tool_choice",
                format!(
                    "tool_choice {} is not supported by Lumen; only none, auto, required or a function",
                    kind.unwrap_or("without a type")
                ),
            )),
        },
        other => Err(ApiError::param("tool_choice", format!("tool_choice must be a string or an object, got {other}"))),
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn text_format(text: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let text = match text {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(text)) => text,
        Some(other) => return Err(ApiError::param("text", format!("text must be an object, got {other}"))),
    };
    let format = match text.get("format") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(format)) => format,
        Some(other) => {
            return Err(ApiError::param("text.format", format!("text.format must be an object, got {other}")));
        }
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = format.clone();
            schema.remove("type");
            if !schema.contains_key("schema") {
                return Err(ApiError::param("text.format.schema", "a json_schema format needs a `schema`"));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        other => Err(ApiError::param(
            "text.format.type",
            format!(
                "text.format.type must be one of text, json_schema, json_object, got {}",
                other.unwrap_or("nothing")
            ),
        )),
    }
}

/// Errors about the translated `response_format` name the field the client sent.
pub fn rename_format_param(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidParam { param, message } if param.starts_with("response_format") => {
            let rest = param.trim_start_matches("response_format").trim_start_matches(".json_schema");
            ApiError::InvalidParam { param: format!("text.format{rest}"), message }
        }
        other => other,
    }
}

/// The request fields the response object repeats (with the defaults the SDK expects).
fn echo(body: &Map<String, Value>, max_output_tokens: Option<i64>) -> Map<String, Value> {
    let get = |key: &str| body.get(key).cloned().unwrap_or(Value::Null);
    let or = |key: &str, default: Value| body.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default);
    let text = match body.get("text").and_then(|t| t.get("format")) {
        Some(format) if !format.is_null() => json!({"format": format}),
        _ => json!({"format": {"type": "text"}}),
    };
    let pairs = [
        ("instructions", get("instructions")),
        ("max_output_tokens", max_output_tokens.map(Value::from).unwrap_or(Value::Null)),
        ("metadata", get("metadata")),
        ("parallel_tool_calls", or("parallel_tool_calls", Value::Bool(true))),
        ("previous_response_id", get("previous_response_id")),
        ("temperature", or("temperature", json!(1.0))),
        ("top_p", or("top_p", json!(1.0))),
        ("tool_choice", or("tool_choice", json!("auto"))),
        ("tools", or("tools", json!([]))),
        ("text", text),
        ("user", get("user")),
        ("store", or("store", Value::Bool(true))),
        ("background", Value::Bool(false)),
        ("reasoning", get("reasoning")),
        ("service_tier", or("service_tier", json!("auto"))),
        ("truncation", or("truncation", json!("disabled"))),
        ("top_logprobs", get("top_logprobs")),
        ("max_tool_calls", get("max_tool_calls")),
        ("error", Value::Null),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<ResponsesRequest, ApiError> {
        ResponsesRequest::parse(body.as_object().unwrap())
    }

    #[test]
    fn translates_into_the_chat_request() {
        let r = parse(json!({
            "model": "m", "input": "hi", "max_output_tokens": 7, "temperature": 0.5,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}},
        }))
        .unwrap();
        assert_eq!(r.chat["max_tokens"], 7);
        assert_eq!(
            r.chat["tools"],
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(r.chat["tool_choice"], json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(
            r.chat["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}})
        );
        assert!(r.store && !r.stream);
        assert_eq!(r.echo["max_output_tokens"], 7);
        assert_eq!(r.echo["text"]["format"]["type"], "json_schema");
    }

    #[test]
    fn unsupported_fields_are_refused_naming_them() {
        for (body, param) in [
            (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({"tools": [{"type": "file_search", "vector_store_ids": []}]}), "tools[0].type"),
            (json!({"background": true}), "background"),
            (json!({"include": ["reasoning.encrypted_content"]}), "include"),
            (json!({"conversation": "conv_1"}), "conversation"),
            (json!({"prompt": {"id": "p"}}), "prompt"),
            (json!({"text": {"format": {"type": "grammar"}}}), "text.format.type"),
            (json!({"tool_choice": {"type": "web_search_preview"}}), "tool_choice"),
            (json!({"max_output_tokens": 0}), "max_output_tokens"),
            (json!({"store": "yes"}), "store"),
        ] {
            match parse(body.clone()) {
                Err(ApiError::InvalidParam { param: got, .. }) => assert_eq!(got, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn format_errors_name_text_format() {
        let e = rename_format_param(ApiError::param("response_format.json_schema.schema", "bad"));
        assert!(matches!(e, ApiError::InvalidParam { param, .. } if param == "text.format.schema"));
    }
}
