//! Following one OpenAI request from arrival to end, for the [`RequestLog`].
//!
//! [`record`] (a middleware on `/v1/chat/completions`, `/v1/completions`, `/v1/responses` and
//! `/v1/embeddings`) gives each request a
//! [`Trace`] (a request extension handlers extract) and an end guard. The API notes into the trace
//! what it learns: the model and prompts at launch ([`Trace::launched`]), each backend event
//! ([`Trace::observe`], from `dispatch::Running`), the end or a failure. The guard pushes the record
//! exactly once, when the response is done: at once for JSON answers, when the body ends or is
//! dropped for SSE, or when the request future itself is dropped (client gone before an answer).
//!
//! Timing is measured at the head, from the request's arrival at the API (so it includes
//! admission queueing and routing, which is what a client sees): `ttft_ms` to the first delta
//! carrying output, `duration_ms` to the end, `itl_ms` = (duration - ttft) / (completion tokens -
//! 1). The worker's `Timings` are not used.
//!
//! With `--otlp-traces-endpoint`, the trace also owns the request's OpenTelemetry span
//! ([`RequestSpan`]): the same notes become its events and attributes, and it ends when the
//! record is pushed, so every route is traced in this one place.
//!
//! Outcome rules: a stream that failed after its 200 records the failure's status and message; a
//! client gone mid-stream records its 200, finish reason `abort` and error "client disconnected";
//! a client gone before any answer records status 499 (nginx's "client closed request").

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use lumen_proto::v1 as pb;
use serde_json::Value;

use crate::api::ApiState;
use crate::api::edge::errors::ApiError;
use crate::api::edge::otel::{RequestSpan, SpanEnd};
use crate::api::edge::usage::Outcome;
use crate::api::generate::dispatch;
use crate::backend::RouteSlot;
use crate::observe::RequestLog;
use crate::observe::request_log::{RequestRecord, Route, truncate_prompt};

/// Status recorded for a request whose client left before any response.
pub const CLIENT_CLOSED: u16 = 499;
/// Largest error body read back to learn its message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

struct TraceData {
    log: Option<Arc<RequestLog>>,
    id: String,
    route: Route,
    model: Option<String>,
    stream: bool,
    start: Instant,
    route_slot: RouteSlot,
    prompt: Option<String>,
    started_prompt_tokens: u32,
    seen_tokens: u32,
    usage: Option<(u32, u32)>,
    first_output: Option<Instant>,
    finish: Option<pb::FinishReason>,
    error: Option<(u16, String)>,
    /// Times the request moved to another replica ([`crate::api::generate::migration`]).
    migrations: u32,
    /// When the request got its admission slot.
    admitted: Option<Instant>,
    /// The OpenTelemetry span, when tracing is on.
    span: Option<RequestSpan>,
    recorded: bool,
}

/// One request's notes; cheap to clone. A detached trace (no log) records nothing.
#[derive(Clone)]
pub struct Trace(Arc<Mutex<TraceData>>);

impl Trace {
    fn new(log: Option<Arc<RequestLog>>, route: Route, span: Option<RequestSpan>) -> Self {
        let prefix = match route {
            Route::Chat => "chatcmpl",
            Route::Completions => "cmpl",
            Route::Responses => "resp",
            Route::Embeddings => "embd",
        };
        Trace(Arc::new(Mutex::new(TraceData {
            log,
            id: crate::api::request_id(prefix),
            route,
            model: None,
            stream: false,
            start: Instant::now(),
            route_slot: RouteSlot::default(),
            prompt: None,
            started_prompt_tokens: 0,
            seen_tokens: 0,
            usage: None,
            first_output: None,
            finish: None,
            error: None,
            migrations: 0,
            admitted: None,
            span,
            recorded: false,
        })))
    }

    /// A trace that goes nowhere (a handler used without the [`record`] middleware).
    pub fn detached() -> Self {
        Trace::new(None, Route::Chat, None)
    }

    fn data(&self) -> MutexGuard<'_, TraceData> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The model the client named (until the launch names the served one).
    pub fn requested_model(&self, model: &str) {
        if !model.is_empty() {
            self.data().model = Some(model.to_string());
        }
    }

    /// The request is being sent to `model`: takes its id from the first request and, when
    /// prompts are logged, keeps the prompt text and logs it.
    pub fn launched(&self, model: &str, requests: &[pb::GenerateRequest]) {
        let mut data = self.data();
        data.model = Some(model.to_string());
        if let Some(first) = requests.first() {
            data.id = first.request_id.clone();
        }
        if let Some(span) = &data.span {
            span.launched(&data.id, model, requests.first(), requests.len());
        }
        if data.log.as_ref().is_some_and(|log| log.log_prompts()) {
            let prompt = truncate_prompt(&prompt_text(requests));
            // Inside the request's span, which names the request id and model.
            tracing::info!(prompt = ?prompt, "received request");
            data.prompt = Some(prompt);
        }
    }

    /// The request waits for an admission slot.
    pub fn queued(&self) {
        if let Some(span) = &self.data().span {
            span.event("queued", Vec::new());
        }
    }

    /// The request got its admission slot (at once or after queueing).
    pub fn admitted(&self) {
        let mut data = self.data();
        data.admitted = Some(Instant::now());
        if let Some(span) = &data.span {
            span.event("admitted", Vec::new());
        }
    }

    /// Every backend stream of the request is open (the route slot names the replica).
    pub fn routed(&self) {
        let data = self.data();
        let Some(span) = &data.span else { return };
        if let Some(routed) = data.route_slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            span.routed(routed);
        }
    }

    /// Runs `calls` (backend calls of this request) with the request's span current, when
    /// tracing is on: the replica client sends it on to the worker as `traceparent`.
    pub async fn in_span<F: std::future::Future>(&self, calls: F) -> F::Output {
        let cx = self.data().span.as_ref().map(|span| span.context().clone());
        match cx {
            Some(cx) => opentelemetry::context::FutureExt::with_context(calls, cx).await,
            None => calls.await,
        }
    }

    /// Where the backend notes the replica it routed to.
    pub fn route_slot(&self) -> RouteSlot {
        self.data().route_slot.clone()
    }

    /// One event of one of the request's backend streams.
    pub fn observe(&self, event: &pb::generate_event::Event) {
        let mut data = self.data();
        match event {
            pb::generate_event::Event::Started(started) => {
                data.started_prompt_tokens = data.started_prompt_tokens.saturating_add(started.prompt_tokens);
            }
            pb::generate_event::Event::Delta(delta) => {
                if data.first_output.is_none() && (!delta.token_ids.is_empty() || !delta.text.is_empty()) {
                    data.first_output = Some(Instant::now());
                    if let Some(span) = &data.span {
                        span.event("first_token", Vec::new());
                    }
                }
                let tokens = u32::try_from(delta.token_ids.len()).unwrap_or(u32::MAX);
                data.seen_tokens = data.seen_tokens.saturating_add(tokens);
                if let Some(reason) = dispatch::finish_reason(delta) {
                    data.finish = Some(worst(data.finish, reason));
                }
            }
            pb::generate_event::Event::Finished(_)
            | pb::generate_event::Event::PromptLogprobs(_)
            | pb::generate_event::Event::Embedding(_) => {}
        }
    }

    /// The request moved to another replica (`reason`: the migration metric's label); the route
    /// slot already names the new one.
    pub fn migrated(&self, reason: &str) {
        let mut data = self.data();
        data.migrations = data.migrations.saturating_add(1);
        if let Some(span) = &data.span {
            span.event("migrated", vec![opentelemetry::KeyValue::new("lumen.migration_reason", reason.to_string())]);
        }
        tracing::info!(request_id = %data.id, reason, migrations = data.migrations, "request migrated");
    }

    /// Every backend stream finished; `usage` is the request's total.
    pub fn completed(&self, prompt_tokens: u32, completion_tokens: u32) {
        self.data().usage = Some((prompt_tokens, completion_tokens));
    }

    /// How a streamed answer ended, for its tenant's usage: `error` if it failed, `success` if
    /// every backend stream finished, else `cancelled` (the client left first).
    pub fn stream_outcome(&self) -> Outcome {
        let data = self.data();
        match (&data.error, data.usage) {
            (Some(_), _) => Outcome::Error,
            (None, Some(_)) => Outcome::Success,
            (None, None) => Outcome::Cancelled,
        }
    }

    /// The request failed with `error` (the first failure is kept).
    pub fn failed(&self, error: &ApiError) {
        let mut data = self.data();
        if data.error.is_none() {
            data.error = Some((error.status().as_u16(), error.to_string()));
        }
    }

    /// Builds the record and pushes it, once. `status`: the HTTP status sent (`None`: nothing was
    /// sent); `message`: an error body's message.
    fn end(&self, status: Option<u16>, message: Option<String>) {
        let mut data = self.data();
        if data.recorded {
            return;
        }
        data.recorded = true;
        let duration = data.start.elapsed();
        let (prompt_tokens, completion_tokens) = data.usage.unwrap_or((data.started_prompt_tokens, data.seen_tokens));
        let ttft = data.first_output.map(|t| t.saturating_duration_since(data.start));
        let itl_ms = match ttft {
            Some(ttft) if completion_tokens > 1 => {
                Some(duration.saturating_sub(ttft).as_secs_f64() * 1000.0 / f64::from(completion_tokens - 1))
            }
            _ => None,
        };
        let mut finish = data.finish;
        let (status, error) = match (status, data.error.clone(), message) {
            (None, _, _) => (CLIENT_CLOSED, Some("client disconnected".to_string())),
            (Some(status), _, Some(message)) if status >= 400 => (status, Some(message)),
            (Some(status), Some((_, message)), _) if status >= 400 => (status, Some(message)),
            (Some(_), Some((failure, message)), _) => (failure, Some(message)),
            (Some(status), None, _) if data.stream && data.usage.is_none() => {
                finish = Some(pb::FinishReason::Abort);
                (status, Some("client disconnected".to_string()))
            }
            (Some(status), None, _) => (status, None),
        };
        if status == CLIENT_CLOSED {
            finish = Some(pb::FinishReason::Abort);
        }
        let routed = data.route_slot.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let finish_reason = finish.map(dispatch::finish_reason_str);
        if let Some(span) = &data.span {
            span.end(SpanEnd {
                id: &data.id,
                model: data.model.as_deref(),
                status,
                error: error.as_deref(),
                prompt_tokens,
                completion_tokens,
                time_in_queue: data.admitted.map(|t| t.saturating_duration_since(data.start)),
                ttft,
                e2e: duration,
                finish_reason,
                routed: routed.clone(),
                migrations: data.migrations,
            });
        }
        let Some(log) = data.log.clone() else { return };
        let (deployment, replica_id) = match routed {
            Some(routed) => (Some(routed.deployment), Some(routed.replica_id)),
            None => (None, None),
        };
        log.push(RequestRecord {
            id: data.id.clone(),
            unix_ms: crate::clock::unix_ms(),
            route: data.route,
            model: data.model.clone(),
            deployment,
            replica_id,
            stream: data.stream,
            status,
            prompt_tokens,
            completion_tokens,
            ttft_ms: ttft.map(|t| t.as_secs_f64() * 1000.0),
            duration_ms: duration.as_secs_f64() * 1000.0,
            itl_ms,
            finish_reason: finish_reason.map(str::to_string),
            error,
            prompt: data.prompt.take(),
            migrations: data.migrations,
        });
    }
}

/// The more telling of two finish reasons of one request's choices: abort, then length, then stop.
fn worst(current: Option<pb::FinishReason>, new: pb::FinishReason) -> pb::FinishReason {
    let rank = |r: pb::FinishReason| match r {
        pb::FinishReason::Abort => 3,
        pb::FinishReason::Length => 2,
        pb::FinishReason::Stop => 1,
        pb::FinishReason::Unspecified => 0,
    };
    match current {
        Some(c) if rank(c) >= rank(new) => c,
        _ => new,
    }
}

/// The prompt as text: for chat the last user message (else the messages as sent), for text
/// prompts the text, for token prompts the ids; several prompts one per line.
pub fn prompt_text(requests: &[pb::GenerateRequest]) -> String {
    let one = |request: &pb::GenerateRequest| match &request.prompt {
        Some(pb::generate_request::Prompt::Chat(chat)) => last_user_message(&chat.messages_json),
        Some(pb::generate_request::Prompt::Text(text)) => text.text.clone(),
        Some(pb::generate_request::Prompt::Tokens(tokens)) => format!("{:?}", tokens.token_ids),
        None => String::new(),
    };
    requests.iter().map(one).collect::<Vec<_>>().join("\n")
}

fn last_user_message(messages_json: &str) -> String {
    let messages: Vec<Value> = serde_json::from_str(messages_json).unwrap_or_default();
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .map_or_else(|| messages_json.to_string(), str::to_string)
}

impl<S: Send + Sync> FromRequestParts<S> for Trace {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Trace>().cloned().unwrap_or_else(Trace::detached))
    }
}

/// Records the request when dropped; `status` is set once a response exists.
struct EndGuard {
    trace: Trace,
    status: Option<u16>,
    message: Option<String>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.trace.end(self.status, self.message.take());
    }
}

/// Whether `response` is a stream of server-sent events (its body is the answer as it goes).
pub fn is_event_stream(response: &Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Middleware: traces chat, completion and Responses requests into the API's request log.
pub async fn record(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>().map(MatchedPath::as_str) {
        Some("/v1/chat/completions") => Route::Chat,
        Some("/v1/completions") => Route::Completions,
        Some("/v1/responses") => Route::Responses,
        Some("/v1/embeddings") => Route::Embeddings,
        _ => return next.run(request).await,
    };
    let span = RequestSpan::start(request.headers(), route);
    let trace = Trace::new(Some(state.request_log()), route, span);
    request.extensions_mut().insert(trace.clone());
    // Dropped with this future if the client leaves before the handler answers.
    let mut guard = EndGuard { trace: trace.clone(), status: None, message: None };
    let response = next.run(request).await;
    let status = response.status();
    guard.status = Some(status.as_u16());
    if is_event_stream(&response) {
        trace.data().stream = true;
        let (parts, body) = response.into_parts();
        // The guard rides along with the body and records when the body ends or is dropped.
        let body = body.into_data_stream().map(move |chunk| {
            let _keep = &guard;
            chunk
        });
        return Response::from_parts(parts, Body::from_stream(body));
    }
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, ERROR_BODY_LIMIT).await.unwrap_or_default();
    guard.message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .or_else(|| Some(status.canonical_reason().unwrap_or("error").to_string()));
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_request(messages: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                messages_json: messages.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn chat_prompt_text_is_the_last_user_message() {
        let r = chat_request(
            r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]"#,
        );
        assert_eq!(prompt_text(&[r]), "c");
        let system_only = chat_request(r#"[{"role":"system","content":"s"}]"#);
        assert!(prompt_text(&[system_only]).contains("\"system\""), "falls back to the messages");
    }

    #[test]
    fn the_most_telling_finish_reason_wins() {
        use pb::FinishReason::*;
        assert_eq!(worst(Some(Stop), Length), Length);
        assert_eq!(worst(Some(Length), Stop), Length);
        assert_eq!(worst(Some(Length), Abort), Abort);
        assert_eq!(worst(None, Stop), Stop);
    }

    fn finished_record(trace: &Trace, status: Option<u16>, message: Option<String>) -> RequestRecord {
        trace.end(status, message);
        let log = trace.data().log.clone().unwrap();
        log.recent(1).remove(0)
    }

    #[test]
    fn a_stream_without_its_end_is_recorded_as_a_client_disconnect() {
        let trace = Trace::new(Some(Arc::new(RequestLog::new(4, false))), Route::Chat, None);
        trace.data().stream = true;
        let delta = pb::Delta { token_ids: vec![1], text: "a".into(), ..Default::default() };
        trace.observe(&pb::generate_event::Event::Delta(delta));
        let record = finished_record(&trace, Some(200), None);
        assert_eq!(record.status, 200);
        assert_eq!(record.finish_reason.as_deref(), Some("abort"));
        assert_eq!(record.error.as_deref(), Some("client disconnected"));
        assert_eq!(record.completion_tokens, 1, "tokens seen so far count");
        assert!(record.ttft_ms.is_some());
    }

    #[test]
    fn a_failed_stream_records_the_failure_status() {
        let trace = Trace::new(Some(Arc::new(RequestLog::new(4, false))), Route::Completions, None);
        trace.data().stream = true;
        trace.failed(&ApiError::Unavailable("replica gone".into()));
        let record = finished_record(&trace, Some(200), None);
        assert_eq!(record.status, 503);
        assert_eq!(record.error.as_deref(), Some("replica gone"));
        assert!(record.id.starts_with("cmpl-"));
    }

    #[test]
    fn a_request_is_recorded_once() {
        let log = Arc::new(RequestLog::new(4, false));
        let trace = Trace::new(Some(log.clone()), Route::Chat, None);
        trace.completed(3, 4);
        trace.end(Some(200), None);
        trace.end(None, None);
        assert_eq!(log.recent(10).len(), 1);
        assert_eq!(log.recent(1)[0].completion_tokens, 4);
        assert_eq!(log.recent(1)[0].error, None);
    }
}
