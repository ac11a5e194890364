//! The tool fields of chat messages, checked before they reach the chat template: an
//! assistant's `tool_calls` (a list of `{"id", "type": "function", "function": {"name",
//! "arguments"}}`, `arguments` a JSON string as OpenAI sends it, or an object as some clients
//! do) and a `tool` message's `tool_call_id` (a string). Content may be null beside
//! `tool_calls`. The worker hands `arguments` to the template as an object, as vLLM does.

use serde_json::{Map, Value};

use crate::api::edge::errors::ApiError;

/// Checks message `i`'s `tool_calls` and `tool_call_id`.
pub fn check_message(i: usize, message: &Map<String, Value>) -> Result<(), ApiError> {
    let at = format!("messages[{i}]");
    match message.get("tool_call_id") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(other) => {
            return Err(ApiError::param(
                format!("{at}.tool_call_id"),
                format!("tool_call_id must be a string, got {other}"),
            ));
        }
    }
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(calls)) => calls,
        Some(other) => {
            return Err(ApiError::param(format!("{at}.tool_calls"), format!("tool_calls must be a list, got {other}")));
        }
    };
    for (j, call) in calls.iter().enumerate() {
        check_call(&format!("{at}.tool_calls[{j}]"), call)?;
    }
    Ok(())
}

fn check_call(at: &str, call: &Value) -> Result<(), ApiError> {
    let Some(call) = call.as_object() else {
        return Err(ApiError::param(at, format!("a tool call must be an object, got {call}")));
    };
    for key in ["id", "type"] {
        if let Some(value) = call.get(key).filter(|v| !v.is_null() && !v.is_string()) {
            return Err(ApiError::param(format!("{at}.{key}"), format!("{key} must be a string, got {value}")));
        }
    }
    let Some(function) = call.get("function").and_then(Value::as_object) else {
        return Err(ApiError::param(format!("{at}.function"), "a tool call needs a `function` object"));
    };
    if !function.get("name").is_some_and(Value::is_string) {
        return Err(ApiError::param(format!("{at}.function.name"), "a tool call's function needs a string `name`"));
    }
    match function.get("arguments") {
        None | Some(Value::Null | Value::String(_) | Value::Object(_)) => Ok(()),
        Some(other) => Err(ApiError::param(
            format!("{at}.function.arguments"),
            format!("arguments must be a JSON string, got {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(message: Value) -> Result<(), ApiError> {
        check_message(2, message.as_object().unwrap())
    }

    #[test]
    fn openai_tool_turns_pass() {
        check(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
            {"function": {"name": "g", "arguments": {"b": 2}}}]}))
        .unwrap();
        check(json!({"role": "tool", "tool_call_id": "call_1", "content": "22 C"})).unwrap();
    }

    #[test]
    fn malformed_tool_turns_name_the_field() {
        for (message, param) in [
            (json!({"role": "tool", "tool_call_id": 5}), "messages[2].tool_call_id"),
            (json!({"role": "assistant", "tool_calls": {}}), "messages[2].tool_calls"),
            (json!({"role": "assistant", "tool_calls": ["x"]}), "messages[2].tool_calls[0]"),
            (
                json!({"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]}),
                "messages[2].tool_calls[0].id",
            ),
            (json!({"role": "assistant", "tool_calls": [{"type": "function"}]}), "messages[2].tool_calls[0].function"),
            (
                json!({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}),
                "messages[2].tool_calls[0].function.name",
            ),
            (
                json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}),
                "messages[2].tool_calls[0].function.arguments",
            ),
        ] {
            match check(message.clone()) {
                Err(ApiError::InvalidParam { param: got, .. }) => assert_eq!(got, param, "{message}"),
                other => panic!("{message}: {other:?}"),
            }
        }
    }
}
