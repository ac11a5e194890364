//! The response object and its output items, built from one answer read by chat's reader
//! ([`crate::api::tools::output`]): a `reasoning` item (the reasoning parser's text, as a
//! `reasoning_text` part), a `message` item (one `output_text` part) when there is answer text,
//! then one `function_call` item per call (`call_id` is the chat call id).
//!
//! `status` is `completed`, or `incomplete` with `incomplete_details.reason:
//! "max_output_tokens"` when the answer was cut at the token limit (vLLM's rule); `usage`
//! counts `input_tokens`, `output_tokens`, `total_tokens` with zeroed details (Lumen counts no
//! cached or reasoning tokens per request).

use lumen_proto::v1 as pb;
use serde_json::{Map, Value, json};

use crate::api::generate::dispatch::Usage;
use crate::api::tools::output::{self, AnswerFormat};

/// An output item id: `prefix` and 32 hex digits.
pub fn item_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

/// What every response object of one request repeats: its id, creation time, model and the
/// request's echoed parameters.
#[derive(Clone, Debug)]
pub struct Header {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub echo: Map<String, Value>,
}

impl Header {
    /// The response object with `status`, `output` and `usage` (`None`: not yet known).
    pub fn response(&self, status: Status, output: Vec<Value>, usage: Option<Usage>) -> Value {
        let mut object = self.echo.clone();
        object.insert("id".into(), self.id.clone().into());
        object.insert("object".into(), "response".into());
        object.insert("created_at".into(), self.created_at.into());
        object.insert("model".into(), self.model.clone().into());
        object.insert("status".into(), status.as_str().into());
        object.insert(
            "incomplete_details".into(),
            match status {
                Status::Incomplete => json!({"reason": "max_output_tokens"}),
                _ => Value::Null,
            },
        );
        object.insert("output".into(), Value::Array(output));
        object.insert("usage".into(), usage.map(usage_json).unwrap_or(Value::Null));
        Value::Object(object)
    }
}

/// A response's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    InProgress,
    Completed,
    Incomplete,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete => "incomplete",
        }
    }

    /// The status of an answer that ended for `reason`.
    pub fn of(reason: Option<pb::FinishReason>) -> Self {
        match reason {
            Some(pb::FinishReason::Length) => Status::Incomplete,
            _ => Status::Completed,
        }
    }
}

/// The Responses `usage` object.
pub fn usage_json(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens.saturating_add(usage.completion_tokens),
    })
}

/// A `reasoning` item.
pub fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "reasoning", "summary": [], "status": status,
           "content": [{"type": "reasoning_text", "text": text}]})
}

/// An `output_text` part.
pub fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A `message` item (no parts while it is only added).
pub fn message_item(id: &str, text: Option<&str>, status: &str) -> Value {
    let content: Vec<Value> = text.map(text_part).into_iter().collect();
    json!({"id": id, "type": "message", "role": "assistant", "status": status, "content": content})
}

/// A `function_call` item.
pub fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"id": id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
           "status": status})
}

/// The output items of a whole answer, and the answer as the assistant chat message that
/// continues the conversation (`previous_response_id`).
pub fn items(format: &AnswerFormat, text: &str) -> (Vec<Value>, Value) {
    let (message, _) = output::message(format, text);
    let mut items = Vec::new();
    if let Some(reasoning) = message.get("reasoning_content").and_then(Value::as_str) {
        items.push(reasoning_item(&item_id("rs"), reasoning, "completed"));
    }
    let content = message.get("content").and_then(Value::as_str).filter(|c| !c.is_empty());
    if let Some(content) = content {
        items.push(message_item(&item_id("msg"), Some(content), "completed"));
    }
    let calls = message.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
    for call in &calls {
        let text = |p: &str| call.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        items.push(call_item(
            &item_id("fc"),
            &text("/id"),
            &text("/function/name"),
            &text("/function/arguments"),
            "completed",
        ));
    }
    (items, history_message(content.unwrap_or_default(), calls))
}

/// The assistant message a turn adds to its conversation.
pub fn history_message(content: &str, calls: Vec<Value>) -> Value {
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::chat::reasoning::ReasoningParserKind;
    use crate::api::tools::ToolParserKind;
    use crate::api::tools::request::Reading;

    #[test]
    fn reasoning_message_and_calls_become_items_in_order() {
        let format = AnswerFormat {
            reasoning: Some(ReasoningParserKind::DeepseekR1),
            tools: Some(Reading::Auto(ToolParserKind::Hermes)),
            parallel: true,
        };
        let text = "<think>hmm</think>Sure.<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>";
        let (items, history) = items(&format, text);
        let kinds: Vec<&str> = items.iter().map(|i| i["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["reasoning", "message", "function_call"]);
        assert_eq!(items[0]["content"][0]["text"], "hmm");
        assert_eq!(items[1]["content"][0]["text"], "Sure.");
        assert_eq!(items[2]["name"], "f");
        assert_eq!(items[2]["arguments"], "{\"a\": 1}");
        assert!(items[2]["call_id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(history["content"], "Sure.");
        assert_eq!(history["tool_calls"][0]["id"], items[2]["call_id"]);
    }

    #[test]
    fn a_length_cut_answer_is_incomplete() {
        let header = Header { id: "resp_1".into(), created_at: 5, model: "m".into(), echo: Map::new() };
        let r = header.response(
            Status::of(Some(pb::FinishReason::Length)),
            vec![],
            Some(Usage { prompt_tokens: 2, completion_tokens: 3, ..Usage::default() }),
        );
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["usage"]["total_tokens"], 5);
        assert_eq!(r["object"], "response");
    }
}
