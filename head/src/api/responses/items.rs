//! `input` (a string, or a list of items) as the chat messages the worker's template renders.
//!
//! - A string is one user message.
//! - A `message` item (its `type` may be left out) has a role `user`, `system`, `developer` or
//!   `assistant` and content that is a string or a list of `input_text` / `output_text` parts
//!   (joined by newlines); other parts (images, files, audio) are refused, naming the part.
//! - A `function_call` item (`call_id`, `name`, `arguments`) becomes a call of an assistant
//!   message: of the message just before it when that is an assistant message, so a turn's
//!   parallel calls stay one message; a `function_call_output` (`call_id`, `output`) becomes a
//!   `tool` message.
//! - A `reasoning` item (a previous answer's thinking, sent back) is dropped, as chat templates
//!   drop earlier reasoning.
//! - Any other item type is refused with a 400 naming `input[i].type`.

use serde_json::{Map, Value, json};

use crate::api::edge::errors::ApiError;

/// The roles a message item may have.
const ROLES: [&str; 4] = ["user", "system", "developer", "assistant"];

/// The chat messages of `input`.
pub fn messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(vec![json!({"role": "user", "content": text})]),
        Value::Array(items) => items,
        Value::Null => return Err(ApiError::param("input", "input is required")),
        other => {
            return Err(ApiError::param("input", format!("input must be a string or a list of items, got {other}")));
        }
    };
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(item) = item.as_object() else {
            return Err(ApiError::param(at, format!("an input item must be an object, got {item}")));
        };
        let kind = match item.get("type") {
            None | Some(Value::Null) => "message",
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(ApiError::param(format!("{at}.type"), format!("type must be a string, got {other}")));
            }
        };
        match kind {
            "message" => out.push(message(&at, item)?),
            "function_call" => {
                let call = json!({"id": string(&at, item, "call_id")?, "type": "function", "function": {
                    "name": string(&at, item, "name")?, "arguments": string(&at, item, "arguments")?}});
                match out.last_mut().filter(|m| m["role"] == "assistant") {
                    Some(last) => match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => last["tool_calls"] = json!([call]),
                    },
                    None => out.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => text_of_parts(&format!("{at}.output"), parts)?,
                    _ => return Err(ApiError::param(format!("{at}.output"), "output must be a string")),
                };
                out.push(json!({"role": "tool", "tool_call_id": string(&at, item, "call_id")?, "content": output}));
            }
            "reasoning" => {}
            other => {
                return Err(ApiError::param(
                    format!("{at}.type"),
                    format!(
                        "input items of type `{other}` are not supported by Lumen; only `message`, `function_call`, `function_call_output` and `reasoning` are"
                    ),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::param("input", "input must hold at least one message"));
    }
    Ok(out)
}

fn string(at: &str, item: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    match item.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(ApiError::param(format!("{at}.{key}"), format!("{key} must be a string"))),
    }
}

fn message(at: &str, item: &Map<String, Value>) -> Result<Value, ApiError> {
    let role = match item.get("role") {
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.clone(),
        Some(other) => {
            return Err(ApiError::param(
                format!("{at}.role"),
                format!("role must be one of {}, got {other}", ROLES.join(", ")),
            ));
        }
        None => return Err(ApiError::param(format!("{at}.role"), "a message item needs a role")),
    };
    let content = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_of_parts(&format!("{at}.content"), parts)?,
        _ => {
            return Err(ApiError::param(
                format!("{at}.content"),
                "content must be a string or a list of content parts",
            ));
        }
    };
    Ok(json!({"role": role, "content": content}))
}

fn text_of_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let param = format!("{at}[{j}]");
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("input_text" | "output_text"), Some(Value::String(text))) => texts.push(text.as_str()),
            (Some("input_text" | "output_text"), _) => {
                return Err(ApiError::param(param, "a text part needs a string `text`"));
            }
            (Some(other), _) => {
                return Err(ApiError::param(
                    param,
                    format!(
                        "content parts of type `{other}` are not supported by Lumen; only `input_text` and `output_text` are"
                    ),
                ));
            }
            (None, _) => return Err(ApiError::param(param, "every content part needs a `type`")),
        }
    }
    Ok(texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_is_one_user_message() {
        assert_eq!(messages(&json!("hi")).unwrap(), vec![json!({"role": "user", "content": "hi"})]);
    }

    #[test]
    fn items_map_to_chat_messages_with_calls_merged_into_one_assistant_turn() {
        let input = json!([
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{\"x\":1}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "42"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
        ]);
        let got = messages(&input).unwrap();
        assert_eq!(got[0], json!({"role": "developer", "content": "be brief"}));
        assert_eq!(got[1], json!({"role": "user", "content": "a\nb"}));
        assert_eq!(got[2]["role"], "assistant");
        let calls = got[2]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[1],
            json!({"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{\"x\":1}"}})
        );
        assert_eq!(got[3], json!({"role": "tool", "tool_call_id": "call_1", "content": "42"}));
        assert_eq!(got[4], json!({"role": "assistant", "content": "done"}));
    }

    #[test]
    fn unsupported_items_and_parts_are_refused_naming_them() {
        for (input, param) in [
            (json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input[0].content[0]"),
            (json!([{"type": "web_search_call", "id": "x"}]), "input[0].type"),
            (json!([{"role": "tool", "content": "x"}]), "input[0].role"),
            (json!([{"type": "function_call", "name": "f", "arguments": "{}"}]), "input[0].call_id"),
            (json!(5), "input"),
            (json!([]), "input"),
        ] {
            match messages(&input) {
                Err(ApiError::InvalidParam { param: got, .. }) => assert_eq!(got, param, "{input}"),
                other => panic!("{input}: {other:?}"),
            }
        }
    }
}
