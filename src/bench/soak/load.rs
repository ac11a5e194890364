//! The soak's load: `concurrency` loops, each sending one request after the other to the head's
//! OpenAI API until told to stop, and the classification of every answer.
//!
//! Request kinds cycle through streamed and non-streamed `/v1/chat/completions` and
//! `/v1/completions` (small `max_tokens`, `ignore_eos`, greedy). Each request ends as exactly one
//! [`Outcome`]:
//! - `Completed`: a 200 whose JSON has choices with a `finish_reason`, or a stream of chunks with
//!   a `finish_reason`, no error event, ended by `[DONE]`.
//! - `Failed`: a proper error: a 4xx/5xx with OpenAI's error body, or an SSE error event
//!   followed by `[DONE]`.
//! - `Refused`: the connection was refused while the head was down (killed, not yet back).
//! - `Cut`: the connection broke (or the body ended early) while the head was down or killed
//!   during the request: a SIGKILLed process cannot send an error event, and the client sees a
//!   transport error, not a silent truncation.
//! - `Lost`: anything else, e.g. a stream that ends without `[DONE]` or an error event while the
//!   head lived, a body that does not parse, an error status without OpenAI's body, a refusal
//!   while the head was up, or no answer within the deadline.
//!
//! The head's liveness comes from [`HeadWatch`], which the fault schedule updates *before* it
//! kills the head and after the new one is ready.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::bench::serve::error_chain;
use crate::bench::sse::{SseDecoder, clip};

/// What the client can tell of the head: is it up, and how many times it was killed.
#[derive(Default)]
pub struct HeadWatch {
    up: AtomicBool,
    kills: AtomicU32,
}

impl HeadWatch {
    /// Called right before the head is killed.
    pub fn killing(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.kills.fetch_add(1, Ordering::SeqCst);
    }

    /// Called once a head printed its ready line.
    pub fn ready(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn snapshot(&self) -> (bool, u32) {
        (self.up.load(Ordering::SeqCst), self.kills.load(Ordering::SeqCst))
    }
}

/// How one request ended (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed,
    /// The kind: `http_503`, `stream_error`, ...; and the error's message.
    Failed {
        kind: String,
        message: String,
    },
    Refused,
    Cut(String),
    Lost(String),
}

/// One request: when it was sent and ended (seconds after the soak began), in which phase it
/// ended, and how.
#[derive(Clone, Debug)]
pub struct Record {
    pub kind: &'static str,
    pub phase: usize,
    pub sent_s: f64,
    pub ended_s: f64,
    pub outcome: Outcome,
}

/// Shared by the load loops and the fault schedule.
pub struct Load {
    pub client: reqwest::Client,
    pub api: String,
    pub model: String,
    pub max_tokens: u32,
    pub deadline: Duration,
    pub head: HeadWatch,
    /// Index of the phase new requests belong to.
    pub phase: AtomicUsize,
    pub began: Instant,
    stop: AtomicBool,
    sequence: AtomicUsize,
    records: Mutex<Vec<Record>>,
}

const KINDS: [&str; 4] = ["chat_stream", "chat", "completion_stream", "completion"];

impl Load {
    pub fn new(
        api: String,
        model: String,
        max_tokens: u32,
        deadline: Duration,
        began: Instant,
    ) -> anyhow::Result<Load> {
        // A fresh connection per request: a pooled one could belong to a head killed since.
        let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build()?;
        Ok(Load {
            client,
            api,
            model,
            max_tokens,
            deadline,
            head: HeadWatch::default(),
            phase: AtomicUsize::new(0),
            began,
            stop: AtomicBool::new(false),
            sequence: AtomicUsize::new(0),
            records: Mutex::new(Vec::new()),
        })
    }

    /// Starts `concurrency` loops; they end after [`Self::stop`], each once its request ended.
    pub fn spawn(self: &Arc<Self>, concurrency: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..concurrency)
            .map(|_| {
                let load = Arc::clone(self);
                tokio::spawn(async move {
                    while !load.stop.load(Ordering::SeqCst) {
                        load.one().await;
                    }
                })
            })
            .collect()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn now_s(&self) -> f64 {
        self.began.elapsed().as_secs_f64()
    }

    async fn one(&self) {
        let n = self.sequence.fetch_add(1, Ordering::SeqCst);
        let kind = KINDS[n % KINDS.len()];
        let sent_s = self.now_s();
        let (up_at_send, kills_at_send) = self.head.snapshot();
        let outcome = match tokio::time::timeout(self.deadline, self.send(kind, n)).await {
            Err(_) => Outcome::Lost(format!("no answer within {:?}", self.deadline)),
            Ok(Ok(outcome)) => outcome,
            Ok(Err(broken)) => {
                let (up_now, kills_now) = self.head.snapshot();
                let head_died = kills_now != kills_at_send;
                match broken {
                    Broken::Connect(_) if head_died || !up_at_send || !up_now => Outcome::Refused,
                    Broken::Connect(e) => Outcome::Lost(format!("connection refused while the head was up: {e}")),
                    Broken::Cut(e) if head_died || !up_at_send || !up_now => Outcome::Cut(e),
                    Broken::Cut(e) => Outcome::Lost(format!("response cut while the head lived: {e}")),
                }
            }
        };
        if outcome != Outcome::Completed {
            // As a client would back off: no spinning on refusals or fast 503s.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let phase = self.phase.load(Ordering::SeqCst);
        let record = Record { kind, phase, sent_s, ended_s: self.now_s(), outcome };
        self.records.lock().unwrap_or_else(PoisonError::into_inner).push(record);
    }

    fn body(&self, kind: &str, n: usize) -> (String, Value) {
        let stream = kind.ends_with("_stream");
        let text = format!("Soak request {n}: name a colour and a number.");
        let mut body = json!({"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0,
                              "ignore_eos": true, "stream": stream});
        if kind.starts_with("chat") {
            body["messages"] = json!([{"role": "user", "content": text}]);
            (format!("{}/v1/chat/completions", self.api), body)
        } else {
            body["prompt"] = json!(text);
            (format!("{}/v1/completions", self.api), body)
        }
    }

    async fn send(&self, kind: &str, n: usize) -> Result<Outcome, Broken> {
        let (url, body) = self.body(kind, n);
        let response = self.client.post(&url).json(&body).send().await.map_err(Broken::from_send)?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.map_err(|e| Broken::Cut(error_chain(&e)))?;
            return Ok(error_status(status.as_u16(), &text));
        }
        if body["stream"] == true {
            read_stream(response).await
        } else {
            let text = response.text().await.map_err(|e| Broken::Cut(error_chain(&e)))?;
            Ok(json_answer(&text))
        }
    }
}

/// A transport failure: before any response, or while reading one.
enum Broken {
    Connect(String),
    Cut(String),
}

impl Broken {
    fn from_send(e: reqwest::Error) -> Broken {
        if e.is_connect() { Broken::Connect(error_chain(&e)) } else { Broken::Cut(error_chain(&e)) }
    }
}

/// A non-2xx answer: failed with a proper error when the body is OpenAI's error object.
fn error_status(status: u16, text: &str) -> Outcome {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    match parsed.as_ref().and_then(|v| v["error"]["message"].as_str()) {
        Some(message) => Outcome::Failed { kind: format!("http_{status}"), message: clip(message, 300) },
        None => Outcome::Lost(format!("HTTP {status} without an OpenAI error body: {}", clip(text, 300))),
    }
}

/// A non-streamed 200: completed when every choice has a `finish_reason`.
fn json_answer(text: &str) -> Outcome {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Outcome::Lost(format!("200 with a body that is not JSON: {}", clip(text, 300)));
    };
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    if !choices.is_empty() && choices.iter().all(|c| c["finish_reason"].is_string()) {
        Outcome::Completed
    } else {
        Outcome::Lost(format!("200 without finished choices: {}", clip(text, 300)))
    }
}

/// What a stream carried so far.
#[derive(Default)]
struct StreamState {
    finished: bool,
    error: Option<String>,
    done: bool,
    after_done: bool,
}

impl StreamState {
    fn on_data(&mut self, data: &str) -> Result<(), String> {
        if self.done {
            self.after_done = true;
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("unparseable event ({e}): {}", clip(data, 200)))?;
        if let Some(error) = v.get("error") {
            self.error = Some(error["message"].as_str().map_or_else(|| error.to_string(), String::from));
        } else if v["choices"].as_array().is_some_and(|c| c.iter().any(|c| c["finish_reason"].is_string())) {
            self.finished = true;
        }
        Ok(())
    }

    fn outcome(self) -> Outcome {
        match (self.done, self.error, self.finished) {
            _ if self.after_done => Outcome::Lost("events after [DONE]".into()),
            (true, Some(message), _) => Outcome::Failed { kind: "stream_error".into(), message: clip(&message, 300) },
            (true, None, true) => Outcome::Completed,
            (true, None, false) => Outcome::Lost("[DONE] without a finish_reason or an error".into()),
            (false, error, _) => {
                Outcome::Lost(format!("stream ended without [DONE] (error event: {})", error.unwrap_or_default()))
            }
        }
    }
}

/// Reads a 200 event stream to its end.
async fn read_stream(response: reqwest::Response) -> Result<Outcome, Broken> {
    let mut bytes = response.bytes_stream();
    let (mut decoder, mut state) = (SseDecoder::default(), StreamState::default());
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| Broken::Cut(error_chain(&e)))?;
        for data in decoder.push(&chunk) {
            if let Err(e) = state.on_data(&data) {
                return Ok(Outcome::Lost(e));
            }
        }
    }
    if let Some(data) = decoder.finish()
        && let Err(e) = state.on_data(&data)
    {
        return Ok(Outcome::Lost(e));
    }
    Ok(state.outcome())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(events: &[&str]) -> Outcome {
        let mut state = StreamState::default();
        for e in events {
            if let Err(e) = state.on_data(e) {
                return Outcome::Lost(e);
            }
        }
        state.outcome()
    }

    const CHUNK: &str = r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#;
    const LAST: &str = r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#;
    const ERROR: &str = r#"{"error":{"message":"replica unavailable","type":"server_error"}}"#;

    #[test]
    fn a_stream_is_completed_only_with_a_finish_reason_and_done() {
        assert_eq!(stream(&[CHUNK, LAST, "[DONE]"]), Outcome::Completed);
        assert!(matches!(stream(&[CHUNK, LAST]), Outcome::Lost(_)));
        assert!(matches!(stream(&[CHUNK, "[DONE]"]), Outcome::Lost(_)));
        assert!(matches!(stream(&[CHUNK, "{not json"]), Outcome::Lost(_)));
    }

    #[test]
    fn an_error_event_then_done_is_a_proper_failure_and_without_done_is_lost() {
        let failed = stream(&[CHUNK, ERROR, "[DONE]"]);
        assert!(
            matches!(&failed, Outcome::Failed { kind, message } if kind == "stream_error" && message.contains("unavailable"))
        );
        assert!(matches!(stream(&[CHUNK, ERROR]), Outcome::Lost(_)));
    }

    #[test]
    fn error_statuses_need_openais_body_to_count_as_proper_failures() {
        let body = r#"{"error":{"message":"no replica","type":"server_error","param":null,"code":503}}"#;
        assert!(matches!(error_status(503, body), Outcome::Failed { kind, .. } if kind == "http_503"));
        assert!(matches!(error_status(502, "Bad Gateway"), Outcome::Lost(_)));
    }

    #[test]
    fn a_json_answer_needs_finished_choices() {
        assert_eq!(json_answer(r#"{"choices":[{"text":"a","finish_reason":"length"}]}"#), Outcome::Completed);
        assert!(matches!(json_answer(r#"{"choices":[]}"#), Outcome::Lost(_)));
        assert!(matches!(json_answer("{\"choi"), Outcome::Lost(_)));
    }
}
