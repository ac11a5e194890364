//! The streamed Responses API: typed SSE events (`event: <type>` then `data: {json}`), each with
//! a `sequence_number` counting from 0, as the `openai` SDK parses them.
//!
//! Order: `response.created`, `response.in_progress`; then per output item, in the order the
//! answer writes them: `response.output_item.added`, its deltas (`response.reasoning_text.delta`
//! for a reasoning item; `response.content_part.added` then `response.output_text.delta` for a
//! message; `response.function_call_arguments.delta` for a call), its closing events
//! (`...reasoning_text.done`; `...output_text.done`, `...content_part.done`;
//! `...function_call_arguments.done`) and `response.output_item.done`. At most one item is open;
//! a piece of another kind closes it. Last, `response.completed` with the whole response (its
//! `status` `incomplete` when the answer was cut at the token limit, as vLLM sends it), which is
//! also what the store keeps. No `[DONE]` follows (OpenAI sends none).

use axum::body::Bytes;
use serde_json::{Value, json};

use super::output::{self, Header, Status, item_id};
use super::store::{ResponseStore, Stored};
use crate::api::generate::dispatch::{Step, Usage, finish_reason};
use crate::api::generate::stream::ChunkWriter;
use crate::api::tools::output::{AnswerFormat, AnswerReader, Piece};
use std::sync::Arc;

/// The item being written.
enum Open {
    Reasoning { id: String, text: String },
    Message { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String },
}

/// Writes one response's events.
pub struct ResponseEvents {
    header: Header,
    reader: AnswerReader,
    sequence: u64,
    open: Option<Open>,
    done: Vec<Value>,
    finish: Option<lumen_proto::v1::FinishReason>,
    /// Where the finished response goes (`store: true`), with the conversation before it.
    store: Option<(Arc<ResponseStore>, Vec<Value>)>,
    /// The assistant message's text and calls, for the stored conversation.
    content: String,
    calls: Vec<Value>,
}

impl ResponseEvents {
    pub fn new(header: Header, format: &AnswerFormat, store: Option<(Arc<ResponseStore>, Vec<Value>)>) -> Self {
        ResponseEvents {
            header,
            reader: AnswerReader::new(format),
            sequence: 0,
            open: None,
            done: Vec::new(),
            finish: None,
            store,
            content: String::new(),
            calls: Vec::new(),
        }
    }

    fn event(&mut self, kind: &str, mut body: Value) -> Bytes {
        body["type"] = kind.into();
        body["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        Bytes::from(format!("event: {kind}\ndata: {body}\n\n"))
    }

    fn index(&self) -> usize {
        self.done.len()
    }

    /// Closes the open item, if any.
    fn close(&mut self, out: &mut Vec<Bytes>) {
        let index = self.index();
        let item = match self.open.take() {
            None => return,
            Some(Open::Reasoning { id, text }) => {
                let at = json!({"item_id": id, "output_index": index, "content_index": 0, "text": text});
                out.push(self.event("response.reasoning_text.done", at));
                output::reasoning_item(&id, &text, "completed")
            }
            Some(Open::Message { id, text }) => {
                let at =
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []});
                out.push(self.event("response.output_text.done", at));
                let part =
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": output::text_part(&text)});
                out.push(self.event("response.content_part.done", part));
                self.content.push_str(&text);
                output::message_item(&id, Some(&text), "completed")
            }
            Some(Open::Call { id, call_id, name, arguments }) => {
                let at = json!({"item_id": id, "output_index": index, "arguments": arguments, "name": name});
                out.push(self.event("response.function_call_arguments.done", at));
                self.calls.push(
                    json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}),
                );
                output::call_item(&id, &call_id, &name, &arguments, "completed")
            }
        };
        out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
        self.done.push(item);
    }

    fn added(&mut self, item: Value, out: &mut Vec<Bytes>) {
        let index = self.index();
        out.push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
    }

    fn reasoning(&mut self, delta: &str, out: &mut Vec<Bytes>) {
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close(out);
            let id = item_id("rs");
            self.added(
                json!({"id": id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}),
                out,
            );
            self.open = Some(Open::Reasoning { id, text: String::new() });
        }
        let index = self.index();
        let Some(Open::Reasoning { id, text }) = &mut self.open else { return };
        text.push_str(delta);
        let at = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta});
        out.push(self.event("response.reasoning_text.delta", at));
    }

    fn text(&mut self, delta: &str, out: &mut Vec<Bytes>) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close(out);
            let id = item_id("msg");
            let index = self.index();
            self.added(output::message_item(&id, None, "in_progress"), out);
            let part = json!({"item_id": id, "output_index": index, "content_index": 0, "part": output::text_part("")});
            out.push(self.event("response.content_part.added", part));
            self.open = Some(Open::Message { id, text: String::new() });
        }
        let index = self.index();
        let Some(Open::Message { id, text }) = &mut self.open else { return };
        text.push_str(delta);
        let at = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []});
        out.push(self.event("response.output_text.delta", at));
    }

    fn piece(&mut self, piece: Piece, out: &mut Vec<Bytes>) {
        if !piece.reasoning.is_empty() {
            self.reasoning(&piece.reasoning, out);
        }
        if !piece.content.is_empty() {
            self.text(&piece.content, out);
        }
        for call in piece.calls {
            if let Some((call_id, name)) = call.begin {
                self.close(out);
                let id = item_id("fc");
                self.added(output::call_item(&id, &call_id, &name, "", "in_progress"), out);
                self.open = Some(Open::Call { id, call_id, name, arguments: String::new() });
            }
            if call.arguments.is_empty() {
                continue;
            }
            let index = self.index();
            let Some(Open::Call { id, arguments, .. }) = &mut self.open else { continue };
            arguments.push_str(&call.arguments);
            let at = json!({"item_id": id, "output_index": index, "delta": call.arguments});
            out.push(self.event("response.function_call_arguments.delta", at));
        }
    }
}

impl ChunkWriter for ResponseEvents {
    fn started(&mut self) -> Vec<Bytes> {
        let response = self.header.response(Status::InProgress, Vec::new(), None);
        let created = self.event("response.created", json!({"response": response}));
        vec![created, self.event("response.in_progress", json!({"response": response}))]
    }

    fn step(&mut self, step: Step) -> Vec<Bytes> {
        let Step::Delta { index: 0, delta } = step else { return Vec::new() };
        let finish = finish_reason(&delta);
        if finish.is_some() {
            self.finish = finish;
        }
        let piece = self.reader.push(&delta.text, finish.is_some());
        let mut out = Vec::new();
        self.piece(piece, &mut out);
        out
    }

    fn usage(&mut self, _usage: Usage) -> Bytes {
        Bytes::new()
    }

    fn end(&mut self, usage: Usage, _include_usage: bool) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.close(&mut out);
        let response = self.header.response(Status::of(self.finish), self.done.clone(), Some(usage));
        if let Some((store, mut messages)) = self.store.take() {
            messages.push(output::history_message(&self.content, std::mem::take(&mut self.calls)));
            store.insert(&self.header.id, Stored { response: response.clone(), messages });
        }
        out.push(self.event("response.completed", json!({"response": response})));
        out
    }
}
