//! One choice's answer read for chat: the reasoning split first (`--reasoning-parser`), then
//! tool calls in what is left ([`Reading`]), as OpenAI's message or as streamed deltas.
//!
//! - Calls get ids `call_` + 24 hex digits; a streamed call's first delta carries `index`, `id`,
//!   `type` and `function.name` (with `arguments: ""`), later deltas `index` and
//!   `function.arguments` pieces. Without `parallel_tool_calls` only the first call is kept.
//! - Non-streaming, an answer whose calls are not all well formed is content, whole.
//! - `finish_reason` is `tool_calls` when calls were made and the model stopped by itself
//!   ([`finish_reason`]); a length-cut answer stays `length`.

use lumen_proto::v1 as pb;
use serde_json::{Map, Value, json};

use super::request::Reading;
use super::{ToolCallParser, ToolEvent};
use crate::api::chat::reasoning::{ReasoningParserKind, ReasoningSplitter, Split};
use crate::api::generate::dispatch::finish_reason_str;

/// How a model's answers are read (the same for every choice of a request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnswerFormat {
    pub reasoning: Option<ReasoningParserKind>,
    pub tools: Option<Reading>,
    /// `parallel_tool_calls`.
    pub parallel: bool,
}

/// A call's id, in OpenAI's shape.
fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// A piece of one call in one delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallPiece {
    pub index: usize,
    /// `(id, name)` on the call's first piece.
    pub begin: Option<(String, String)>,
    pub arguments: String,
}

/// One piece of an answer, read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<CallPiece>,
}

impl Piece {
    /// The delta's fields (`reasoning_content`, `content`, `tool_calls`), those that have
    /// something.
    pub fn delta(&self) -> Map<String, Value> {
        let mut out = Map::new();
        if !self.reasoning.is_empty() {
            out.insert("reasoning_content".into(), Value::String(self.reasoning.clone()));
        }
        if !self.content.is_empty() {
            out.insert("content".into(), Value::String(self.content.clone()));
        }
        if !self.calls.is_empty() {
            let calls = self.calls.iter().map(|c| match &c.begin {
                Some((id, name)) => json!({"index": c.index, "id": id, "type": "function",
                                           "function": {"name": name, "arguments": c.arguments}}),
                None => json!({"index": c.index, "function": {"arguments": c.arguments}}),
            });
            out.insert("tool_calls".into(), Value::Array(calls.collect()));
        }
        out
    }
}

/// Reads one choice's answer piece by piece.
pub struct AnswerReader {
    reasoning: Option<ReasoningSplitter>,
    tools: Option<Box<dyn ToolCallParser>>,
    parallel: bool,
    /// Calls begun so far.
    calls: usize,
}

impl AnswerReader {
    pub fn new(format: &AnswerFormat) -> Self {
        AnswerReader {
            reasoning: format.reasoning.map(ReasoningSplitter::new),
            tools: format.tools.as_ref().map(Reading::parser),
            parallel: format.parallel,
            calls: 0,
        }
    }

    /// Whether a call was made.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// Reads the next piece of output; `last` ends the answer (held-back text is decided).
    pub fn push(&mut self, text: &str, last: bool) -> Piece {
        let split = match &mut self.reasoning {
            None => Split { reasoning: String::new(), content: text.to_string() },
            Some(splitter) => {
                let mut split = splitter.push(text);
                if last {
                    let tail = splitter.finish();
                    split.reasoning.push_str(&tail.reasoning);
                    split.content.push_str(&tail.content);
                }
                split
            }
        };
        let mut piece = Piece { reasoning: split.reasoning, ..Piece::default() };
        let Some(parser) = &mut self.tools else {
            piece.content = split.content;
            return piece;
        };
        let mut events = Vec::new();
        parser.push(&split.content, &mut events);
        if last {
            parser.finish(&mut events);
        }
        for event in events {
            self.take(event, &mut piece);
        }
        piece
    }

    fn take(&mut self, event: ToolEvent, piece: &mut Piece) {
        let kept = |calls: usize| self.parallel || calls <= 1;
        match event {
            ToolEvent::Text(text) => piece.content.push_str(&text),
            ToolEvent::Begin { name } => {
                self.calls += 1;
                if kept(self.calls) {
                    let index = self.calls - 1;
                    piece.calls.push(CallPiece { index, begin: Some((call_id(), name)), arguments: String::new() });
                }
            }
            ToolEvent::Arguments(arguments) if self.calls > 0 && kept(self.calls) => {
                let index = self.calls - 1;
                match piece.calls.last_mut().filter(|c| c.index == index) {
                    Some(call) => call.arguments.push_str(&arguments),
                    None => piece.calls.push(CallPiece { index, begin: None, arguments }),
                }
            }
            ToolEvent::Arguments(_) => {}
        }
    }

    /// Whether every call was well formed (after the last piece).
    fn well_formed(&self) -> bool {
        self.tools.as_ref().is_none_or(|p| p.well_formed())
    }
}

/// A whole answer as OpenAI's message, and whether it calls tools.
pub fn message(format: &AnswerFormat, text: &str) -> (Value, bool) {
    let mut reader = AnswerReader::new(format);
    let piece = reader.push(text, true);
    let called = reader.called() && reader.well_formed();
    let (content, calls) = if called {
        let calls: Vec<Value> = piece
            .calls
            .into_iter()
            .filter_map(|c| {
                let (id, name) = c.begin?;
                Some(json!({"id": id, "type": "function", "function": {"name": name, "arguments": c.arguments}}))
            })
            .collect();
        (non_empty(piece.content), calls)
    } else {
        // Not (well-formed) calls: the answer after the reasoning is content, as written.
        let content = match format.reasoning {
            Some(kind) => non_empty(ReasoningSplitter::split_all(kind, text).content),
            None => Value::String(text.to_string()),
        };
        (content, Vec::new())
    };
    let mut message = json!({"role": "assistant", "content": content, "tool_calls": calls});
    if format.reasoning.is_some() {
        message["reasoning_content"] = non_empty(piece.reasoning);
    }
    (message, called)
}

fn non_empty(s: String) -> Value {
    if s.is_empty() { Value::Null } else { Value::String(s) }
}

/// OpenAI's `finish_reason` of a choice that ended for `reason` and did (not) call tools.
pub fn finish_reason(reason: pb::FinishReason, called: bool) -> &'static str {
    if called && reason == pb::FinishReason::Stop { "tool_calls" } else { finish_reason_str(reason) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tools::ToolParserKind;

    fn hermes(reasoning: bool, parallel: bool) -> AnswerFormat {
        AnswerFormat {
            reasoning: reasoning.then_some(ReasoningParserKind::DeepseekR1),
            tools: Some(Reading::Auto(ToolParserKind::Hermes)),
            parallel,
        }
    }

    const TWO_CALLS: &str = "Checking.<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";

    #[test]
    fn a_message_with_calls_has_openai_shape() {
        let (message, called) = message(&hermes(false, true), TWO_CALLS);
        assert!(called);
        assert_eq!(message["content"], "Checking.");
        let calls = message["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"], json!({"name": "a", "arguments": "{\"x\": 1}"}));
        let id = calls[0]["id"].as_str().unwrap();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_ne!(calls[0]["id"], calls[1]["id"]);
        assert!(message.get("reasoning_content").is_none());
    }

    #[test]
    fn without_parallel_calls_only_the_first_is_kept() {
        let (message, _) = message(&hermes(false, false), TWO_CALLS);
        assert_eq!(message["tool_calls"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_malformed_call_leaves_the_whole_answer_as_content() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": ";
        let (message, called) = message(&hermes(false, true), text);
        assert!(!called);
        assert_eq!((message["content"].as_str(), message["tool_calls"].clone()), (Some(text), json!([])));
    }

    #[test]
    fn reasoning_is_split_first_and_calls_are_read_only_in_the_answer() {
        let text = "<think>maybe <tool_call>{\"name\": \"no\", \"arguments\": {}}</tool_call></think>\
                    <tool_call>{\"name\": \"yes\", \"arguments\": {}}</tool_call>";
        let (message, called) = message(&hermes(true, true), text);
        assert!(called);
        assert_eq!(message["reasoning_content"], "maybe <tool_call>{\"name\": \"no\", \"arguments\": {}}</tool_call>");
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["tool_calls"][0]["function"]["name"], "yes");
    }

    #[test]
    fn streamed_deltas_carry_the_name_first_then_argument_pieces() {
        let mut reader = AnswerReader::new(&hermes(false, true));
        let mut deltas = Vec::new();
        let text = TWO_CALLS;
        let cuts = [0, 5, 12, 30, 44, 47, 60, 90, text.len()];
        for w in cuts.windows(2) {
            deltas.push(reader.push(&text[w[0]..w[1]], w[1] == text.len()).delta());
        }
        assert!(reader.called());
        let calls: Vec<&Value> =
            deltas.iter().filter_map(|d| d.get("tool_calls")).flat_map(|c| c.as_array().unwrap()).collect();
        assert_eq!(calls[0]["index"], 0);
        assert_eq!(calls[0]["function"]["name"], "a");
        assert!(calls[0]["id"].is_string() && calls[0]["type"] == "function");
        let args: String =
            calls.iter().filter(|c| c["index"] == 0).map(|c| c["function"]["arguments"].as_str().unwrap()).collect();
        assert_eq!(args, "{\"x\": 1}");
        assert!(calls.iter().filter(|c| c["index"] == 0).skip(1).all(|c| c.get("id").is_none()));
        let content: String = deltas.iter().filter_map(|d| d.get("content").and_then(Value::as_str)).collect();
        assert_eq!(content, "Checking.");
        assert_eq!(calls.iter().filter(|c| c.get("id").is_some()).count(), 2);
    }

    #[test]
    fn finish_reason_is_tool_calls_only_for_a_natural_stop() {
        assert_eq!(finish_reason(pb::FinishReason::Stop, true), "tool_calls");
        assert_eq!(finish_reason(pb::FinishReason::Length, true), "length");
        assert_eq!(finish_reason(pb::FinishReason::Stop, false), "stop");
    }
}
