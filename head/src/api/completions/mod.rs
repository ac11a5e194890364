//! `POST /v1/completions`, as vLLM serves it.
//!
//! `prompt` is a string, a list of strings, a list of token ids or a list of token-id lists. Each
//! prompt is its own backend request with `n` choices; choice `i` of prompt `p` has index
//! `p * n + i` in the response, as OpenAI numbers them. `echo` prepends the prompt's text (when
//! streaming, to each choice's first chunk, as vLLM does); with `logprobs` the log-probabilities
//! then cover the prompt's tokens too (the first one null), which the worker computes in the
//! prefill (the request asks for `prompt_logprobs`), and `max_tokens: 0` is allowed: the prompt
//! and its log-probabilities only (vLLM generates one token and drops it; so does Lumen, and
//! like vLLM counts it in `usage`). vLLM's `prompt_logprobs` (top `k` per prompt token, first
//! null) go into each choice's `prompt_logprobs`. Log-probabilities use the legacy shape
//! ([`crate::api::generate::logprobs::completion`]); vLLM's `return_tokens_as_token_ids` names their tokens
//! `token_id:N`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use crate::api::edge::errors::ApiError;
use crate::api::edge::keys::Caller;
use crate::api::edge::metrics::labelled;
use crate::api::edge::trace::Trace;
use crate::api::generate::dispatch::{
    self, Collected, Meta, Step, Usage, finish_reason, finish_reason_str, stop_reason_json,
};
use crate::api::generate::stream::{self, ChunkWriter};
use crate::api::generate::{logprobs, sse};
use crate::api::request::body::{JsonObject, typed};
use crate::api::request::fields;
use crate::api::request::params::{CommonParams, RouteDefaults, logprob_count};
use crate::api::request::prompts;
use crate::api::request::structured;
use crate::api::{ApiState, request_id};
use crate::backend::Runner;

/// vLLM's default `max_tokens` for completions (chat's default is the context length).
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// The most choices (prompts times `n`) one request may produce.
pub const MAX_CHOICES: usize = 1024;

#[derive(Debug, Default, Deserialize)]
struct CompletionFields {
    prompt: Option<Value>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    return_tokens_as_token_ids: Option<bool>,
    add_special_tokens: Option<bool>,
    suffix: Option<String>,
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
    let fields: CompletionFields = typed(&body)?;
    fields::check_completions(&body)?;
    let card = state.resolve_for(common.model.as_deref(), Runner::Generate, "Completions API")?;
    let prompt = fields.prompt.as_ref().ok_or_else(|| ApiError::param("prompt", "prompt is required"))?;
    let prompts = prompts::parse("prompt", prompt, fields.add_special_tokens.unwrap_or(true))?;
    if fields.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "suffix is not supported"));
    }
    let logprobs = fields.logprobs.map(|k| logprob_count("logprobs", k)).transpose()?;
    let echo = fields.echo.unwrap_or(false);
    let explicit_prompt_k = fields::prompt_logprobs(&body)?;
    // vLLM: `max_tokens: 0` only with `echo` (scoring); one token is generated and dropped.
    let prompt_only = echo && common.max_tokens == Some(0);
    if prompt_only {
        common.max_tokens = Some(1);
    }
    let generation = common.validate(RouteDefaults { max_tokens: DEFAULT_MAX_TOKENS, logprobs })?;
    // What the worker computes: the explicit `prompt_logprobs` (not shown in a stream, where only
    // 0 is allowed), else `logprobs` when they must cover the echoed prompt.
    let echo_k = logprobs.filter(|_| echo);
    let prompt_k = match explicit_prompt_k {
        Some(_) if generation.stream => echo_k,
        Some(k) => Some(k),
        None => echo_k,
    };
    let token_ids = fields.return_tokens_as_token_ids.unwrap_or(false);
    let shape = Shape {
        echo,
        prompt_only,
        logprobs: logprobs.map(|k| logprobs::Legacy { k, token_ids }),
        prompt_logprobs: prompt_k,
    };
    for prompt in &prompts {
        let known = match prompt {
            pb::generate_request::Prompt::Tokens(t) => Some(t.token_ids.len()),
            _ => None,
        };
        generation.check_context("max_tokens", card.max_model_len, known)?;
    }
    let structured_output =
        structured::with_defaults(structured::from_body(&body)?, &state.structured_outputs(&card.id));
    let n = generation.n;
    if prompts.len().saturating_mul(n as usize) > MAX_CHOICES {
        return Err(ApiError::param("n", format!("prompts times n must not exceed {MAX_CHOICES}")));
    }

    let id = request_id("cmpl");
    let span = tracing::info_span!("completion", request_id = %id, model = %card.id, prompts = prompts.len());
    let mut requests: Vec<pb::GenerateRequest> = prompts
        .into_iter()
        .enumerate()
        .map(|(p, prompt)| pb::GenerateRequest {
            replica_id: String::new(),
            request_id: if p == 0 { id.clone() } else { format!("{id}-{p}") },
            prompt: Some(prompt),
            sampling: Some(generation.sampling.clone()),
            stop: Some(generation.stop.clone()),
            n,
            skip_special_tokens: generation.skip_special_tokens,
            return_prompt: echo,
            structured_output: structured_output.clone(),
            resume: None,
            return_prompt_token_ids: false,
            prompt_logprobs: prompt_k,
            pooling: None,
            priority: generation.priority,
            cache_salt: generation.cache_salt.clone(),
            tenant: String::new(), // set by `enter`
            tenant_weight: 0,
        })
        .collect();
    let entry = state.enter(&caller, &card, &mut requests)?;
    let launch = stream::launch(&state, card.id.clone(), requests, n, entry, trace).instrument(span.clone()).await?;
    let meta = Meta { id, object: "text_completion", created: crate::clock::unix_s(), model: card.id.clone() };
    let choices_per_prompt = n as usize;
    if generation.stream {
        let writer = CompletionChunks::new(meta, choices_per_prompt, shape);
        return Ok(stream::respond(launch, writer, generation.include_usage, &state, span));
    }
    let collected = async { dispatch::collect(launch.running().await?).await }.instrument(span).await?;
    if prompt_k.is_some() && collected.prompt_logprobs.iter().any(Option::is_none) {
        return Err(missing_prompt_logprobs());
    }
    Ok(Json(completion_body(&meta, collected, choices_per_prompt, shape)).into_response())
}

/// A replica that answered without the prompt log-probabilities it was asked for (a worker older
/// than the field): an error, never an answer that silently lacks them.
pub fn missing_prompt_logprobs() -> ApiError {
    ApiError::Internal("the replica sent no prompt log-probabilities (is the worker older than the head?)".into())
}

/// What a choice shows besides its own text.
#[derive(Clone, Copy, Debug)]
struct Shape {
    echo: bool,
    /// `echo` with `max_tokens: 0`: the prompt only, the one generated token dropped.
    prompt_only: bool,
    logprobs: Option<logprobs::Legacy>,
    /// `k` of each choice's `prompt_logprobs` field (absent when `None`).
    prompt_logprobs: Option<u32>,
}

fn completion_body(meta: &Meta, collected: Collected, n: usize, shape: Shape) -> Value {
    let choices: Vec<Value> = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| {
            let prompt = index / n.max(1);
            let scored = collected.prompt_logprobs.get(prompt).and_then(Option::as_ref);
            let prompt_text = match collected.prompts.get(prompt) {
                Some(started) if shape.echo => started.prompt_text.as_str(),
                _ => "",
            };
            let (text, tokens) =
                if shape.prompt_only { ("", &[][..]) } else { (choice.text.as_str(), &choice.logprobs[..]) };
            let logprobs = match shape.logprobs {
                Some(k) if shape.echo && scored.is_some() => logprobs::completion_echo(scored, tokens, k, 0).0,
                Some(k) => logprobs::completion(tokens, k, prompt_text.chars().count()).0,
                None => Value::Null,
            };
            let mut body = json!({
                "index": index,
                "text": format!("{prompt_text}{text}"),
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason.map(finish_reason_str),
                "stop_reason": stop_reason_json(&choice.stop_reason),
            });
            if let Some(k) = shape.prompt_logprobs {
                body["prompt_logprobs"] = scored.map_or(Value::Null, |p| logprobs::prompt_logprobs(p, k));
            }
            body
        })
        .collect();
    meta.object(Value::Array(choices), Some(collected.usage))
}

/// Writes streamed `text_completion` chunks. With `echo`, a choice's first chunk carries the
/// prompt's text (and log-probabilities) before its first output, as vLLM streams it.
struct CompletionChunks {
    meta: Meta,
    n: usize,
    shape: Shape,
    /// Per prompt: its text (`echo`) and log-probabilities, once the worker sent them.
    prompts: Vec<(String, Option<pb::PromptLogprobs>)>,
    /// Per choice: whether its prompt was sent, and the character offset where its next text
    /// starts (legacy `text_offset`).
    echoed: Vec<bool>,
    offsets: Vec<usize>,
}

impl CompletionChunks {
    fn new(meta: Meta, n: usize, shape: Shape) -> Self {
        CompletionChunks { meta, n, shape, prompts: Vec::new(), echoed: Vec::new(), offsets: Vec::new() }
    }

    fn chunk(&self, choices: Value, usage: Option<Usage>) -> Bytes {
        sse::data(&self.meta.object(choices, usage))
    }

    fn prompt(&mut self, prompt: usize) -> &mut (String, Option<pb::PromptLogprobs>) {
        if self.prompts.len() <= prompt {
            self.prompts.resize(prompt + 1, (String::new(), None));
        }
        &mut self.prompts[prompt]
    }

    /// Marks choice `index` echoed; true the first time.
    fn first_of(&mut self, index: usize) -> bool {
        if self.echoed.len() <= index {
            self.echoed.resize(index + 1, false);
            self.offsets.resize(index + 1, 0);
        }
        !std::mem::replace(&mut self.echoed[index], true)
    }
}

impl ChunkWriter for CompletionChunks {
    fn started(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    fn step(&mut self, step: Step) -> Vec<Bytes> {
        let (index, delta) = match step {
            Step::Started { prompt, started } => {
                self.prompt(prompt).0 = started.prompt_text;
                return Vec::new();
            }
            Step::PromptLogprobs { prompt, logprobs } => {
                self.prompt(prompt).1 = Some(logprobs);
                return Vec::new();
            }
            Step::Delta { index, delta } => (index, delta),
            Step::Embedding { .. } => return Vec::new(),
        };
        let finish = finish_reason(&delta);
        let first = self.first_of(index);
        let echo = self.shape.echo && first;
        let (mut text, tokens) =
            if self.shape.prompt_only { (String::new(), &[][..]) } else { (delta.text, &delta.logprobs[..]) };
        if !echo && text.is_empty() && tokens.is_empty() && finish.is_none() {
            return Vec::new();
        }
        let logprobs = match self.shape.logprobs {
            Some(k) if echo => {
                let (prompt_text, scored) = self.prompt(index / self.n.max(1)).clone();
                text.insert_str(0, &prompt_text);
                // Offsets count from the prompt's start when its tokens are listed, else after it.
                let start = if scored.is_some() { 0 } else { prompt_text.chars().count() };
                let (shape, end) = logprobs::completion_echo(scored.as_ref(), tokens, k, start);
                self.offsets[index] = end;
                shape
            }
            Some(k) => {
                let (shape, end) = logprobs::completion(tokens, k, self.offsets[index]);
                self.offsets[index] = end;
                shape
            }
            None => {
                if echo {
                    text.insert_str(0, &self.prompt(index / self.n.max(1)).0);
                }
                Value::Null
            }
        };
        let mut choice = json!({
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish.map(finish_reason_str),
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
