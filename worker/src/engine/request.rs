//! What goes into the engine (a request) and what comes out (a stream of events).
//!
//! A pooling request's stream (one with [`EngineRequest::pooling`]) carries one
//! [`EngineEvent::Embedding`] and then [`EngineEvent::Finished`] (or one `Failed`).
//! A generation request's stream carries, when asked for, one [`EngineEvent::PromptLogprobs`] first, then
//! [`EngineEvent::Delta`]s (each with the choice index, new text,
//! token ids, optional log-probabilities and, on a choice's last delta, its finish reason), then
//! exactly one [`EngineEvent::Finished`] with usage and timings, or one [`EngineEvent::Failed`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pooling::PoolingParams;
use crate::grammar::CompiledGrammar;
use crate::sampling::{SamplingParams, StopParams};
use crate::{Result, TokenId, WorkerError};

/// The most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;

/// A generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Unique among the engine's live requests.
    pub id: String,
    pub prompt_token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Independent choices sampled for the same prompt (they share its KV blocks).
    pub n: usize,
    pub skip_special_tokens: bool,
    pub arrival: Instant,
    /// A structured-output constraint, compiled by the replica's `GrammarCompiler`: every
    /// choice's tokens stay inside it, and a choice ends (`stop`) when it is complete.
    pub constraint: Option<Arc<CompiledGrammar>>,
    /// The constraint waits until the output has written this marker (a reasoning model's
    /// `</think>`): the thinking before it is free (`grammar::ReasoningGate`).
    pub constraint_after: Option<String>,
    /// vLLM's `prompt_logprobs`: the log-probability of every prompt token after the first, with
    /// this many alternatives, computed in the prefill (which then reads no prompt block from the
    /// prefix cache).
    pub prompt_logprobs: Option<usize>,
    /// A pooling (embedding) request: the prompt's prefill only, pooled into one vector as this
    /// says; nothing is sampled (`sampling`, `stop` and `n` are not used) and its blocks are
    /// freed as soon as the vector is out.
    pub pooling: Option<PoolingParams>,
    /// A continuation (the head moved the request off a replica that failed): each choice's
    /// output so far, taken as generated here (`core_resume.rs`); empty for a new request.
    /// Exactly the choices `0..n` in order, no constraint, not every choice finished, and an
    /// unfinished choice has fewer tokens than `max_tokens`.
    pub resumed: Vec<ResumedChoice>,
    /// vLLM's `priority`: with the priority scheduling policy, lower values are scheduled first
    /// and may preempt higher ones; must be 0 otherwise.
    pub priority: i64,
    /// vLLM's `cache_salt`: the request shares prefix-cache blocks only with requests of the
    /// same salt.
    pub cache_salt: Option<String>,
    /// The request's tenant and its weight: the scheduler shares slots across tenants
    /// (`scheduler/fairness.rs`); `None` for requests without one.
    pub tenant: Option<std::sync::Arc<str>>,
    pub tenant_weight: u32,
}

/// One choice of a resumed request: its output so far, and whether it ended there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumedChoice {
    pub index: usize,
    pub output: Vec<TokenId>,
    pub finished: bool,
}

impl EngineRequest {
    /// A request with default sampling, `n = 1`, arriving now.
    pub fn new(
        id: impl Into<String>,
        prompt_token_ids: Vec<TokenId>,
        sampling: SamplingParams,
        stop: StopParams,
    ) -> Self {
        EngineRequest {
            id: id.into(),
            prompt_token_ids,
            sampling,
            stop,
            n: 1,
            skip_special_tokens: true,
            arrival: Instant::now(),
            constraint: None,
            constraint_after: None,
            prompt_logprobs: None,
            pooling: None,
            resumed: Vec::new(),
            priority: 0,
            cache_salt: None,
            tenant: None,
            tenant_weight: 1,
        }
    }

    /// Output tokens taken as generated, over every resumed choice.
    pub fn resumed_tokens(&self) -> usize {
        self.resumed.iter().map(|c| c.output.len()).sum()
    }

    /// The choices to generate: `(index, output so far)` of each resumed choice not finished, or
    /// choice 0 from nothing for a new request (its siblings fork at the first token).
    pub fn choices_to_run(&self) -> Vec<(usize, Vec<TokenId>)> {
        if self.resumed.is_empty() {
            return vec![(0, Vec::new())];
        }
        self.resumed.iter().filter(|c| !c.finished).map(|c| (c.index, c.output.clone())).collect()
    }

    /// A pooling request for `prompt_token_ids`, arriving now.
    pub fn pooling(id: impl Into<String>, prompt_token_ids: Vec<TokenId>, pooling: PoolingParams) -> Self {
        let mut req = EngineRequest::new(id, prompt_token_ids, SamplingParams::default(), StopParams::default());
        req.pooling = Some(pooling);
        req
    }
}

/// The engine's limits, against which requests are validated before they are queued.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    pub vocab_size: usize,
    pub max_model_len: usize,
    /// Tokens the KV cache holds in total; one sequence can never grow beyond it.
    pub cache_capacity_tokens: usize,
    /// Requests may carry a `priority` other than 0 (the priority scheduling policy).
    pub priority_scheduling: bool,
}

impl EngineLimits {
    /// Checks a request against the model and the cache; the error names the parameter.
    pub fn validate(&self, req: &EngineRequest) -> Result<()> {
        if req.id.is_empty() {
            return Err(WorkerError::invalid("request_id", "must not be empty"));
        }
        if req.prompt_token_ids.is_empty() {
            return Err(WorkerError::invalid("prompt", "the prompt must contain at least one token"));
        }
        if let Some(&t) = req.prompt_token_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(WorkerError::invalid(
                "prompt",
                format!("token id {t} is outside the vocabulary of {}", self.vocab_size),
            ));
        }
        if req.priority != 0 && !self.priority_scheduling {
            return Err(WorkerError::invalid(
                "priority",
                format!(
                    "Got priority {} but Priority scheduling is not enabled: serve with --scheduling-policy priority",
                    req.priority
                ),
            ));
        }
        if req.n == 0 || req.n > MAX_N {
            return Err(WorkerError::invalid("n", format!("must be between 1 and {MAX_N}, got {}", req.n)));
        }
        if let Some(k) = req.prompt_logprobs
            && k > crate::sampling::MAX_TOP_LOGPROBS
        {
            return Err(WorkerError::invalid(
                "prompt_logprobs",
                format!("must be at most {}, got {k}", crate::sampling::MAX_TOP_LOGPROBS),
            ));
        }
        let prompt_tokens = req.prompt_token_ids.len();
        if req.pooling.is_some() {
            return self.validate_pooled(prompt_tokens);
        }
        self.validate_resumed(req)?;
        req.sampling.validate(self.vocab_size)?;
        req.stop.validate(self.vocab_size)?;
        let total = prompt_tokens.saturating_add(req.stop.max_tokens);
        if total > self.max_model_len {
            return Err(WorkerError::ContextTooLong {
                prompt_tokens,
                max_tokens: req.stop.max_tokens,
                max_model_len: self.max_model_len,
            });
        }
        if total > self.cache_capacity_tokens {
            return Err(WorkerError::invalid(
                "max_tokens",
                format!(
                    "prompt plus max_tokens ({total}) exceeds the KV cache's {} tokens",
                    self.cache_capacity_tokens
                ),
            ));
        }
        Ok(())
    }

    /// A pooling prompt fits when it is at most `max_model_len` tokens (vLLM's message; the
    /// cache always holds `max_model_len` tokens, which loading the model checks).
    fn validate_pooled(&self, prompt_tokens: usize) -> Result<()> {
        if prompt_tokens > self.max_model_len {
            return Err(WorkerError::invalid(
                "input",
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {prompt_tokens} tokens in the input for embedding generation. Please reduce the length of the input.",
                    self.max_model_len
                ),
            ));
        }
        Ok(())
    }
}

impl EngineLimits {
    /// A continuation's output must be one the engine could have produced itself.
    fn validate_resumed(&self, req: &EngineRequest) -> Result<()> {
        if req.resumed.is_empty() {
            return Ok(());
        }
        let refuse = |why: String| Err(WorkerError::invalid("resume", why));
        let indices: Vec<usize> = req.resumed.iter().map(|c| c.index).collect();
        if indices != (0..req.n).collect::<Vec<_>>() {
            return refuse(format!("choices {indices:?} resumed of a request for n = {}", req.n));
        }
        if req.resumed.iter().all(|c| c.finished) {
            return refuse("every resumed choice finished already".into());
        }
        for choice in &req.resumed {
            let (index, len) = (choice.index, choice.output.len());
            if let Some(&t) = choice.output.iter().find(|&&t| t as usize >= self.vocab_size) {
                return refuse(format!("token id {t} is outside the vocabulary of {}", self.vocab_size));
            }
            if len > req.stop.max_tokens || (len == req.stop.max_tokens && !choice.finished) {
                return refuse(format!(
                    "{len} tokens resumed in choice {index} but max_tokens is {}",
                    req.stop.max_tokens
                ));
            }
        }
        Ok(())
    }
}

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence, a stop token, a stop string, or a structured-output constraint that is
    /// complete.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// Aborted (client gone, shutdown, engine failure).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What triggered a `Stop` finish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token or one of `stop_token_ids`.
    Token(TokenId),
    /// One of the `stop` strings (by value).
    String(String),
}

/// A sampled token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenId,
    /// The token's text (lossy for partial UTF-8 pieces).
    pub piece: String,
    pub logprob: f32,
    /// `(token, piece, logprob)`, most likely first.
    pub top: Vec<(TokenId, String, f32)>,
    /// The token's rank in its distribution (1 = most likely); 0 where not computed (sampled
    /// tokens).
    pub rank: u32,
}

/// A prompt's log-probabilities: `tokens[i]` is prompt token `i + 1`; the first token has none.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprobs {
    pub first_token: TokenId,
    pub first_piece: String,
    pub tokens: Vec<TokenLogprob>,
}

/// New output of one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceDelta {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<TokenId>,
    /// One entry per token in `token_ids` when log-probabilities were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Summed over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Where a request's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestTimings {
    /// Arrival to first scheduled.
    pub queue: Duration,
    /// Arrival to first token.
    pub first_token: Option<Duration>,
    /// Arrival to the end.
    pub total: Duration,
}

/// One item of a request's output stream.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Prompt token `i + 1`'s log-probability at index `i` (the first token has none); sent once,
    /// before the first delta, when the request asked for `prompt_logprobs`.
    PromptLogprobs(PromptLogprobs),
    /// A pooling request's vector (`hidden_size` values), sent once at the end of its prefill.
    Embedding(Vec<f32>),
    Delta(ChoiceDelta),
    Finished {
        usage: Usage,
        timings: RequestTimings,
    },
    Failed(String),
}
