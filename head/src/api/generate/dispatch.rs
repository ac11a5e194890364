//! Running one API request on the backend: one `GenerateRequest` per prompt (completions may send
//! several), their event streams merged, choice indices made global (`prompt * n + index`, as
//! OpenAI numbers them), and the end checked: every prompt must end with `finished`, so a stream
//! that stops early is reported as an error, never passed off as a complete answer.
//!
//! A [`Running`] owns the admission permit, the key's lease and the backend streams; dropping it
//! (client gone) drops them, which aborts the requests on their replicas and settles the lease
//! on the tokens counted so far. It notes every event, the end and any
//! failure into the request's [`Trace`] (the request log's view of it).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use lumen_proto::v1 as pb;

use crate::api::edge::errors::ApiError;
use crate::api::edge::limits::Lease;
use crate::api::edge::trace::Trace;
use crate::api::generate::admission::Permit;
use crate::api::generate::migration::{self, Migrations};
use crate::backend::{self, Backend, BackendError};

type Tagged = Pin<Box<dyn Stream<Item = (usize, Result<pb::GenerateEvent, BackendError>)> + Send>>;

/// What happened next, in API terms.
#[derive(Debug)]
pub enum Step {
    /// A prompt was accepted; carries its token count (and text with `return_prompt`).
    Started { prompt: usize, started: pb::Started },
    /// New output of the choice with global index `index`.
    Delta { index: usize, delta: pb::Delta },
    /// The prompt's log-probabilities (`tokens[i]` is prompt token `i + 1`), before its deltas.
    PromptLogprobs { prompt: usize, logprobs: pb::PromptLogprobs },
    /// The prompt's pooled vector (an embedding request).
    Embedding { prompt: usize, values: Vec<f32> },
}

/// Token counts over all prompts and choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV the replicas read from their prefix caches (at most
    /// `prompt_tokens`).
    pub cached_tokens: u32,
    /// Whether `usage` shows `prompt_tokens_details` (`--enable-prompt-tokens-details`).
    pub details: bool,
}

impl Usage {
    /// OpenAI's `usage` object.
    pub fn to_json(self) -> serde_json::Value {
        let mut usage = serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens.saturating_add(self.completion_tokens),
        });
        if self.details {
            usage["prompt_tokens_details"] = serde_json::json!({"cached_tokens": self.cached_tokens});
        }
        usage
    }
}

/// What every response object of one request repeats.
pub struct Meta {
    pub id: String,
    /// `chat.completion.chunk`, `text_completion`, ...
    pub object: &'static str,
    pub created: u64,
    pub model: String,
}

impl Meta {
    /// A response object (or streamed chunk) with these `choices` and optionally `usage`.
    pub fn object(&self, choices: serde_json::Value, usage: Option<Usage>) -> serde_json::Value {
        let mut object = serde_json::json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            object["usage"] = usage.to_json();
        }
        object
    }
}

/// The backend streams of one API request.
pub struct Running {
    events: Tagged,
    n: usize,
    finished: Vec<bool>,
    usage: Usage,
    trace: Trace,
    _permit: Permit,
    /// The key's limits: counts the usage, settles when dropped.
    lease: Lease,
}

/// Sends each request to `model` and returns their merged streams; fails if any is refused. Each
/// stream moves to another replica if its own fails ([`migration`]).
pub async fn start(
    backend: &Arc<dyn Backend>,
    migrations: &Migrations,
    model: &str,
    requests: Vec<pb::GenerateRequest>,
    n: u32,
    (permit, lease): (Permit, Lease),
    trace: Trace,
) -> Result<Running, ApiError> {
    let prompts = requests.len();
    let calls = futures::future::try_join_all(
        requests.into_iter().map(|r| migration::generate(backend, migrations, model, r, &trace)),
    );
    let streams = trace.in_span(backend::with_route_slot(trace.route_slot(), calls)).await?;
    trace.routed();
    let tagged = streams.into_iter().enumerate().map(|(p, s)| s.map(move |e| (p, e)).boxed());
    Ok(Running {
        events: futures::stream::select_all(tagged).boxed(),
        n: n as usize,
        finished: vec![false; prompts],
        usage: Usage::default(),
        trace,
        _permit: permit,
        lease,
    })
}

impl Running {
    /// Whether the usage shows `prompt_tokens_details` (`--enable-prompt-tokens-details`).
    pub fn with_prompt_details(mut self, details: bool) -> Running {
        self.usage.details = details;
        self
    }

    /// The next step; `None` once every prompt finished (then [`Running::usage`] is final).
    pub async fn next(&mut self) -> Option<Result<Step, ApiError>> {
        let next = self.advance().await;
        match &next {
            None => self.trace.completed(self.usage.prompt_tokens, self.usage.completion_tokens),
            Some(Err(e)) => self.trace.failed(e),
            Some(Ok(_)) => {}
        }
        next
    }

    async fn advance(&mut self) -> Option<Result<Step, ApiError>> {
        loop {
            let Some((prompt, item)) = self.events.next().await else {
                if self.finished.iter().all(|&f| f) {
                    return None;
                }
                return Some(Err(ApiError::Unavailable(
                    "the replica closed the stream before the request finished".into(),
                )));
            };
            let event = match item {
                Ok(pb::GenerateEvent { event: Some(event) }) => event,
                Ok(pb::GenerateEvent { event: None }) => continue,
                Err(e) => return Some(Err(e.into())),
            };
            self.trace.observe(&event);
            self.lease.observe(prompt, &event);
            match event {
                pb::generate_event::Event::Started(started) => return Some(Ok(Step::Started { prompt, started })),
                pb::generate_event::Event::PromptLogprobs(p) => {
                    return Some(Ok(Step::PromptLogprobs { prompt, logprobs: p }));
                }
                pb::generate_event::Event::Embedding(e) => {
                    return Some(Ok(Step::Embedding { prompt, values: e.values }));
                }
                pb::generate_event::Event::Delta(delta) => {
                    let index = delta.index as usize;
                    if index >= self.n {
                        return Some(Err(ApiError::Internal(format!(
                            "the replica sent choice {index} of a request for {} choices",
                            self.n
                        ))));
                    }
                    return Some(Ok(Step::Delta { index: prompt * self.n + index, delta }));
                }
                pb::generate_event::Event::Finished(finished) => {
                    let usage = finished.usage.unwrap_or_default();
                    self.usage.prompt_tokens = self.usage.prompt_tokens.saturating_add(usage.prompt_tokens);
                    self.usage.completion_tokens = self.usage.completion_tokens.saturating_add(usage.completion_tokens);
                    // A resumed request's prompt includes the tokens generated before it moved.
                    let cached = usage.cached_tokens.min(usage.prompt_tokens);
                    self.usage.cached_tokens = self.usage.cached_tokens.saturating_add(cached);
                    if let Some(done) = self.finished.get_mut(prompt) {
                        *done = true;
                    }
                }
            }
        }
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Number of choices over all prompts.
    pub fn choices(&self) -> usize {
        self.finished.len() * self.n
    }
}

/// One choice of a finished request.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub text: String,
    pub logprobs: Vec<pb::TokenLogprob>,
    pub finish_reason: Option<pb::FinishReason>,
    pub stop_reason: Option<pb::delta::StopReason>,
}

/// A whole request's output, for non-streaming responses.
#[derive(Debug, Default)]
pub struct Collected {
    pub choices: Vec<Choice>,
    /// Per prompt, what `started` reported.
    pub prompts: Vec<pb::Started>,
    /// Per prompt, its log-probabilities when asked for (`tokens[i]` is prompt token `i + 1`).
    pub prompt_logprobs: Vec<Option<pb::PromptLogprobs>>,
    /// Per prompt, its pooled vector (embedding requests).
    pub embeddings: Vec<Option<Vec<f32>>>,
    pub usage: Usage,
}

/// Runs `running` to the end and gathers every choice.
pub async fn collect(mut running: Running) -> Result<Collected, ApiError> {
    let mut out = Collected {
        choices: vec![Choice::default(); running.choices()],
        prompts: vec![pb::Started::default(); running.finished.len()],
        prompt_logprobs: vec![None; running.finished.len()],
        embeddings: vec![None; running.finished.len()],
        usage: Usage::default(),
    };
    while let Some(step) = running.next().await {
        match step? {
            Step::Started { prompt, started } => {
                if let Some(slot) = out.prompts.get_mut(prompt) {
                    *slot = started;
                }
            }
            Step::PromptLogprobs { prompt, logprobs } => {
                if let Some(slot) = out.prompt_logprobs.get_mut(prompt) {
                    *slot = Some(logprobs);
                }
            }
            Step::Embedding { prompt, values } => {
                if let Some(slot) = out.embeddings.get_mut(prompt) {
                    *slot = Some(values);
                }
            }
            Step::Delta { index, delta } => {
                let Some(choice) = out.choices.get_mut(index) else { continue };
                choice.text.push_str(&delta.text);
                choice.logprobs.extend(delta.logprobs.iter().cloned());
                if let Some(reason) = finish_reason(&delta) {
                    choice.finish_reason = Some(reason);
                    choice.stop_reason = delta.stop_reason.clone();
                }
            }
        }
    }
    out.usage = running.usage();
    Ok(out)
}

/// The delta's finish reason, if it ends its choice.
pub fn finish_reason(delta: &pb::Delta) -> Option<pb::FinishReason> {
    match pb::FinishReason::try_from(delta.finish_reason) {
        Ok(pb::FinishReason::Unspecified) => None,
        Ok(reason) => Some(reason),
        // An unknown value from a newer worker still ends the choice.
        Err(_) => Some(pb::FinishReason::Stop),
    }
}

/// OpenAI's spelling of a finish reason.
pub fn finish_reason_str(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Abort => "abort",
        pb::FinishReason::Stop | pb::FinishReason::Unspecified => "stop",
    }
}

/// vLLM's `stop_reason`: the stop token id or stop string that ended the choice, else null.
pub fn stop_reason_json(reason: &Option<pb::delta::StopReason>) -> serde_json::Value {
    match reason {
        Some(pb::delta::StopReason::StopTokenId(t)) => serde_json::Value::from(*t),
        Some(pb::delta::StopReason::StopString(s)) => serde_json::Value::from(s.clone()),
        None => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::Usage;

    #[test]
    fn prompt_tokens_details_show_only_when_enabled() {
        let usage = Usage { prompt_tokens: 40, completion_tokens: 3, cached_tokens: 32, details: false };
        let plain = usage.to_json();
        assert_eq!(plain, serde_json::json!({"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}));
        let detailed = Usage { details: true, ..usage }.to_json();
        assert_eq!(detailed["prompt_tokens_details"], serde_json::json!({"cached_tokens": 32}));
        assert_eq!(detailed["total_tokens"], 43);
    }
}
