//! Conversions between the wire messages (`lumen_proto::v1`) and the engine's types.
//!
//! Contracts:
//! - Sampling values are taken literally (the head fills OpenAI's defaults, e.g. `top_p` 1 and
//!   `repetition_penalty` 1); the only sentinel is `top_k` 0 = off. A request without a
//!   `sampling` message gets the engine's defaults.
//! - `max_tokens` 0 (or no `stop` message) means "up to the context": `max_model_len` minus the
//!   prompt. A prompt that leaves no room at all is rejected here with both numbers in the
//!   message; any other length problem is the engine's validation (`max_tokens` named).
//! - A chat prompt is rendered with the model's template and tokenized with BOS exactly once
//!   (the same ids as `Tokenizer::encode_chat`); its errors name `messages`, those of text and
//!   token prompts name `prompt`.
//! - Engine options arrive as JSON (the serve config's `model:` section); fields the worker does
//!   not know (the head's `reasoning_parser`, options of newer versions) are ignored and logged
//!   at debug level.

use std::time::{Duration, Instant};

use lumen_proto::metrics::names;
use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde::de::{self, Visitor};
use serde_json::{Map, Value as Json};

use super::ServiceError;
use crate::TokenId;
use crate::engine::stats::{EngineHistograms, Histogram};
use crate::engine::{
    ChoiceDelta, EngineLimits, EngineOptions, EngineStats, FinishReason, PoolingParams, PromptLogprobs, RequestTimings,
    ResumedChoice, StopReason, TokenLogprob, Usage,
};
use crate::grammar::{Constraint, ConstraintKind};
use crate::sampling::{SamplingParams, StopParams};
use crate::tokenizer::{ChatMessage, ChatTemplateOptions, Tokenizer};

/// A count on the wire (`uint32`), saturating.
pub fn wire_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ---- engine options ----

/// Parses `StartReplicaRequest.engine_options_json` ("" means all defaults).
pub fn engine_options(json: &str) -> Result<EngineOptions, ServiceError> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let map: Map<String, Json> = serde_json::from_str(json)
        .map_err(|e| ServiceError::invalid("engine_options_json", format!("must be a JSON object: {e}")))?;
    let known = struct_fields::<EngineOptions>();
    if !known.is_empty() {
        let unknown: Vec<&str> = map.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
        if !unknown.is_empty() {
            tracing::debug!(?unknown, "ignoring engine options this worker does not know");
        }
    }
    EngineOptions::deserialize(Json::Object(map))
        .map_err(|e| ServiceError::invalid("engine_options_json", e.to_string()))
}

/// The field names (aliases included) a derived `Deserialize` struct accepts, read from what it
/// passes to `deserialize_struct`; empty for anything else.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

// ---- prompts ----

/// A prompt as either RPC carries it.
#[derive(Clone, Copy, Debug)]
pub enum PromptRef<'a> {
    Chat(&'a pb::ChatPrompt),
    Text(&'a pb::TextPrompt),
    Tokens(&'a [TokenId]),
}

impl<'a> From<&'a pb::generate_request::Prompt> for PromptRef<'a> {
    fn from(p: &'a pb::generate_request::Prompt) -> Self {
        match p {
            pb::generate_request::Prompt::Chat(c) => PromptRef::Chat(c),
            pb::generate_request::Prompt::Text(t) => PromptRef::Text(t),
            pb::generate_request::Prompt::Tokens(t) => PromptRef::Tokens(&t.token_ids),
        }
    }
}

impl<'a> From<&'a pb::tokenize_request::Input> for PromptRef<'a> {
    fn from(p: &'a pb::tokenize_request::Input) -> Self {
        match p {
            pb::tokenize_request::Input::Chat(c) => PromptRef::Chat(c),
            pb::tokenize_request::Input::Text(t) => PromptRef::Text(t),
        }
    }
}

impl PromptRef<'_> {
    /// The API parameter that holds this prompt.
    pub fn param(&self) -> &'static str {
        match self {
            PromptRef::Chat(_) => "messages",
            PromptRef::Text(_) | PromptRef::Tokens(_) => "prompt",
        }
    }
}

/// A tokenized prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedPrompt {
    pub token_ids: Vec<TokenId>,
    /// The prompt's text (the rendered template for chat), when asked for.
    pub text: Option<String>,
}

/// Messages and template options of a chat prompt.
pub fn chat_input(chat: &pb::ChatPrompt) -> Result<(Vec<ChatMessage>, ChatTemplateOptions), ServiceError> {
    let messages: Vec<ChatMessage> = serde_json::from_str(&chat.messages_json)
        .map_err(|e| ServiceError::invalid("messages", format!("not a valid list of chat messages: {e}")))?;
    if messages.is_empty() {
        return Err(ServiceError::invalid("messages", "at least one message is required"));
    }
    let extra = if chat.template_kwargs_json.trim().is_empty() {
        Map::new()
    } else {
        serde_json::from_str::<Map<String, Json>>(&chat.template_kwargs_json)
            .map_err(|e| ServiceError::invalid("chat_template_kwargs", format!("must be a JSON object: {e}")))?
    };
    Ok((messages, ChatTemplateOptions { add_generation_prompt: chat.add_generation_prompt, extra }))
}

/// Tokenizes a prompt (blocking: call it off the async runtime for long prompts).
pub fn encode_prompt(tok: &Tokenizer, prompt: PromptRef<'_>, want_text: bool) -> Result<EncodedPrompt, ServiceError> {
    match prompt {
        PromptRef::Chat(chat) => {
            let (messages, opts) = chat_input(chat)?;
            let text = tok.apply_chat_template(&messages, &opts)?;
            let token_ids = tok.encode(&text, true)?;
            Ok(EncodedPrompt { token_ids, text: want_text.then_some(text) })
        }
        PromptRef::Text(t) => {
            let token_ids = tok.encode(&t.text, t.add_special_tokens)?;
            Ok(EncodedPrompt { token_ids, text: want_text.then(|| t.text.clone()) })
        }
        PromptRef::Tokens(ids) => {
            let text = if want_text { Some(tok.decode(ids, false)?) } else { None };
            Ok(EncodedPrompt { token_ids: ids.to_vec(), text })
        }
    }
}

/// Rejects a prompt that leaves no room to generate, stating both numbers.
pub fn check_prompt_fits(prompt_tokens: usize, limits: &EngineLimits, param: &'static str) -> Result<(), ServiceError> {
    if prompt_tokens >= limits.max_model_len {
        return Err(ServiceError::invalid(
            param,
            format!(
                "the prompt has {prompt_tokens} tokens but this model's max_model_len is {}, which leaves no room to generate",
                limits.max_model_len
            ),
        ));
    }
    Ok(())
}

// ---- pooling ----

/// The pooling of a request on a replica that pools as `model` says (`None`: it generates): the
/// replica's pooler config with the request's `normalize` override; `None` for a generation
/// request on a generating replica. A request of the other kind than the replica serves is
/// refused, naming `model`.
pub fn pooling(
    request: Option<&pb::PoolingRequest>,
    model: Option<PoolingParams>,
) -> Result<Option<PoolingParams>, ServiceError> {
    match (request, model) {
        (None, None) => Ok(None),
        (Some(r), Some(m)) => Ok(Some(PoolingParams { normalize: r.normalize.unwrap_or(m.normalize), ..m })),
        (Some(_), None) => Err(ServiceError::invalid(
            "model",
            "The model does not support Embeddings API (it is served for generation; serve it with `--runner pooling`)",
        )),
        (None, Some(_)) => Err(ServiceError::invalid(
            "model",
            "The model does not support generation (it is served with `--runner pooling`)",
        )),
    }
}

/// Keeps only the last `keep` tokens of `ids` (vLLM's `truncate_prompt_tokens`); `None` keeps all.
pub fn truncate_left(ids: &mut Vec<TokenId>, keep: Option<u32>) {
    if let Some(keep) = keep.map(|k| k as usize)
        && ids.len() > keep
    {
        ids.drain(..ids.len() - keep);
    }
}

// ---- sampling and stopping ----

/// A continuation's output so far, per choice: `choices` (`n > 1`), else `output_token_ids` as
/// choice 0 (none: a new request).
pub fn resumed(resume: pb::Resume) -> Vec<ResumedChoice> {
    if resume.choices.is_empty() {
        if resume.output_token_ids.is_empty() {
            return Vec::new();
        }
        return vec![ResumedChoice { index: 0, output: resume.output_token_ids, finished: false }];
    }
    let choice = |c: pb::ResumedChoice| ResumedChoice {
        index: c.index as usize,
        output: c.output_token_ids,
        finished: c.finished,
    };
    resume.choices.into_iter().map(choice).collect()
}

/// Engine sampling parameters of a request (see the module docs for the defaults).
pub fn sampling_params(p: Option<&pb::SamplingParams>) -> SamplingParams {
    let Some(p) = p else {
        return SamplingParams::default();
    };
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: (p.top_k > 0).then_some(p.top_k as usize),
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p.logit_bias.iter().map(|b| (b.token_id, b.bias)).collect(),
        seed: p.seed,
        logprobs: p.logprobs.map(|k| k as usize),
    }
}

/// Engine stop parameters; `max_tokens` 0 becomes the room left in the context after the prompt.
pub fn stop_params(p: Option<&pb::StopParams>, prompt_tokens: usize, limits: &EngineLimits) -> StopParams {
    let room = limits.max_model_len.min(limits.cache_capacity_tokens).saturating_sub(prompt_tokens).max(1);
    let Some(p) = p else {
        return StopParams { max_tokens: room, ..StopParams::default() };
    };
    StopParams {
        max_tokens: if p.max_tokens == 0 { room } else { p.max_tokens as usize },
        min_tokens: p.min_tokens as usize,
        stop: p.stop.clone(),
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        include_stop_str_in_output: p.include_stop_str_in_output,
    }
}

// ---- structured outputs ----

/// The engine's constraint of a request's `structured_output`; an empty one (no kind) is refused.
pub fn constraint(p: &pb::StructuredOutput) -> Result<Constraint, ServiceError> {
    use pb::structured_output::Kind;
    let param = if p.param.is_empty() { "structured_outputs".to_string() } else { p.param.clone() };
    let kind = match &p.kind {
        Some(Kind::JsonSchema(schema)) => ConstraintKind::JsonSchema(schema.clone()),
        Some(Kind::JsonObject(_)) => ConstraintKind::JsonObject,
        Some(Kind::Regex(rx)) => ConstraintKind::Regex(rx.clone()),
        Some(Kind::Choice(list)) => ConstraintKind::Choice(list.choices.clone()),
        Some(Kind::Grammar(g)) => ConstraintKind::Lark(g.clone()),
        None => {
            return Err(ServiceError::InvalidConstraint { param, reason: "no constraint kind is set".into() });
        }
    };
    Ok(Constraint {
        kind,
        disable_any_whitespace: p.disable_any_whitespace,
        disable_additional_properties: p.disable_additional_properties,
        whitespace_pattern: (!p.whitespace_pattern.is_empty()).then(|| p.whitespace_pattern.clone()),
        param,
    })
}

/// The marker a constraint waits for (`structured_output.reasoning_end`), unless the prompt's
/// text has already ended the reasoning.
pub fn constraint_after(p: &pb::StructuredOutput, prompt_text: Option<&str>) -> Option<String> {
    if p.reasoning_end.is_empty() {
        return None;
    }
    let ended = prompt_text.is_some_and(|t| crate::grammar::reasoning_ended(t, &p.reasoning_start, &p.reasoning_end));
    (!ended).then(|| p.reasoning_end.clone())
}

// ---- events ----

/// The `started` event: with `prompt` (echo) its ids and text, else with `ids` its ids only;
/// `resumed` output tokens taken as generated (a continuation).
pub fn started_event(
    prompt_tokens: usize,
    resumed: usize,
    ids: Vec<TokenId>,
    prompt: Option<EncodedPrompt>,
) -> pb::GenerateEvent {
    let (prompt_token_ids, prompt_text) = match prompt {
        Some(p) => (p.token_ids, p.text.unwrap_or_default()),
        None => (ids, String::new()),
    };
    let started = pb::Started {
        prompt_tokens: wire_u32(prompt_tokens),
        prompt_token_ids,
        prompt_text,
        resumed_tokens: wire_u32(resumed),
    };
    pb::GenerateEvent { event: Some(pb::generate_event::Event::Started(started)) }
}

pub fn finish_reason(f: Option<FinishReason>) -> pb::FinishReason {
    match f {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::Abort) => pb::FinishReason::Abort,
    }
}

pub fn token_logprob(l: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: l.token,
        piece: l.piece,
        logprob: l.logprob,
        top: l.top.into_iter().map(|(token_id, piece, logprob)| pb::TopLogprob { token_id, piece, logprob }).collect(),
        rank: l.rank,
    }
}

pub fn prompt_logprobs_event(p: PromptLogprobs) -> pb::GenerateEvent {
    let logprobs = pb::PromptLogprobs {
        tokens: p.tokens.into_iter().map(token_logprob).collect(),
        first_token_id: p.first_token,
        first_piece: p.first_piece,
    };
    pb::GenerateEvent { event: Some(pb::generate_event::Event::PromptLogprobs(logprobs)) }
}

pub fn embedding_event(values: Vec<f32>) -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(pb::generate_event::Event::Embedding(pb::Embedding { values })) }
}

pub fn delta_event(d: ChoiceDelta) -> pb::GenerateEvent {
    let delta = pb::Delta {
        index: wire_u32(d.index),
        text: d.text,
        token_ids: d.token_ids,
        logprobs: d.logprobs.into_iter().map(token_logprob).collect(),
        finish_reason: finish_reason(d.finish_reason) as i32,
        stop_reason: d.stop_reason.map(|s| match s {
            StopReason::Token(t) => pb::delta::StopReason::StopTokenId(t),
            StopReason::String(s) => pb::delta::StopReason::StopString(s),
        }),
    };
    pb::GenerateEvent { event: Some(pb::generate_event::Event::Delta(delta)) }
}

pub fn finished_event(usage: Usage, timings: RequestTimings) -> pb::GenerateEvent {
    let finished = pb::Finished {
        usage: Some(pb::Usage {
            prompt_tokens: wire_u32(usage.prompt_tokens),
            completion_tokens: wire_u32(usage.completion_tokens),
            cached_tokens: wire_u32(usage.cached_tokens),
        }),
        timings: Some(pb::Timings {
            queue_us: micros(timings.queue),
            first_token_us: timings.first_token.map_or(0, micros),
            total_us: micros(timings.total),
        }),
    };
    pb::GenerateEvent { event: Some(pb::generate_event::Event::Finished(finished)) }
}

// ---- stats ----

pub fn replica_stats(replica_id: &str, model_name: &str, s: &EngineStats, state: pb::ReplicaState) -> pb::ReplicaStats {
    pb::ReplicaStats {
        replica_id: replica_id.to_string(),
        model_name: model_name.to_string(),
        running: wire_u32(s.running),
        waiting: wire_u32(s.waiting),
        kv_blocks_total: s.kv_blocks_total as u64,
        kv_blocks_used: s.kv_blocks_used as u64,
        prefix_cache_queries: s.prefix_cache_queries,
        prefix_cache_hits: s.prefix_cache_hits,
        prompt_tokens_total: s.prompt_tokens_total,
        generation_tokens_total: s.generation_tokens_total,
        preemptions_total: s.preemptions_total,
        requests_finished_stop: s.requests_finished_stop,
        requests_finished_length: s.requests_finished_length,
        requests_finished_abort: s.requests_finished_abort,
        prompt_tokens_per_s: s.prompt_tokens_per_s,
        generation_tokens_per_s: s.generation_tokens_per_s,
        stalled_for_ms: u64::try_from(s.stalled_at(Instant::now()).as_millis()).unwrap_or(u64::MAX),
        state: state as i32,
        histograms: histograms(&s.histograms),
        spec_decode_drafts: s.spec_decode.drafts,
        spec_decode_draft_tokens: s.spec_decode.draft_tokens,
        spec_decode_accepted_tokens: s.spec_decode.accepted_tokens,
        spec_decode_accepted_per_position: s.spec_decode.accepted_per_position.clone(),
    }
}

/// The engine's histograms under their vLLM series names.
fn histograms(h: &EngineHistograms) -> Vec<pb::HistogramSnapshot> {
    let named = [
        (names::TIME_TO_FIRST_TOKEN, &h.time_to_first_token),
        (names::TIME_PER_OUTPUT_TOKEN, &h.inter_token_latency),
        (names::E2E_REQUEST_LATENCY, &h.e2e_latency),
        (names::REQUEST_QUEUE_TIME, &h.queue_time),
        (names::REQUEST_PROMPT_TOKENS, &h.prompt_tokens),
        (names::REQUEST_GENERATION_TOKENS, &h.generation_tokens),
        (names::STRUCTURED_OUTPUT_MASK, &h.structured_output_mask),
    ];
    named.into_iter().map(|(name, h)| histogram(name, h)).collect()
}

fn histogram(name: &str, h: &Histogram) -> pb::HistogramSnapshot {
    pb::HistogramSnapshot {
        name: name.to_string(),
        bounds: h.bounds().to_vec(),
        cumulative_counts: h.cumulative_counts(),
        sum: h.sum(),
        count: h.count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EngineLimits {
        EngineLimits { vocab_size: 100, max_model_len: 64, cache_capacity_tokens: 1024, priority_scheduling: false }
    }

    #[test]
    fn a_constraint_waits_for_the_reasoning_end_unless_the_prompt_wrote_it() {
        let so = |end: &str| pb::StructuredOutput {
            reasoning_start: "<think>".into(),
            reasoning_end: end.into(),
            ..Default::default()
        };
        assert_eq!(constraint_after(&so(""), Some("<think>\n")), None, "no reasoning parser");
        assert_eq!(constraint_after(&so("</think>"), Some("User: hi<think>\n")).as_deref(), Some("</think>"));
        assert_eq!(constraint_after(&so("</think>"), Some("<think>\n\n</think>\n\n")), None, "thinking off");
        assert_eq!(constraint_after(&so("</think>"), None).as_deref(), Some("</think>"));
    }

    #[test]
    fn engine_options_ignore_unknown_fields_and_accept_source() {
        let opts = engine_options(r#"{"source": "m.gguf", "reasoning_parser": "deepseek_r1", "gpu_memory_utilization": 0.9, "max_model_len": 512}"#)
            .unwrap();
        assert_eq!(opts.model, "m.gguf");
        assert_eq!(opts.max_model_len, Some(512));
        assert_eq!(engine_options("").unwrap(), EngineOptions::default());
    }

    #[test]
    fn engine_options_reject_wrong_types_naming_the_field() {
        let err = engine_options(r#"{"max_num_seqs": "many"}"#).unwrap_err();
        assert!(matches!(err, ServiceError::InvalidRequest { param: "engine_options_json", .. }), "{err}");
        assert!(engine_options("[1]").is_err());
    }

    #[test]
    fn the_options_field_list_includes_aliases() {
        let fields = struct_fields::<EngineOptions>();
        assert!(fields.contains(&"model") && fields.contains(&"source") && fields.contains(&"kv_cache_memory"));
    }

    #[test]
    fn top_k_zero_is_off_and_values_pass_through() {
        let p = pb::SamplingParams { temperature: 0.5, top_p: 0.9, top_k: 0, logprobs: Some(3), ..Default::default() };
        let s = sampling_params(Some(&p));
        assert_eq!((s.temperature, s.top_p, s.top_k, s.logprobs), (0.5, 0.9, None, Some(3)));
        assert_eq!(sampling_params(Some(&pb::SamplingParams { top_k: 5, ..p })).top_k, Some(5));
        assert_eq!(sampling_params(None), SamplingParams::default());
    }

    #[test]
    fn zero_max_tokens_fills_the_context_after_the_prompt() {
        assert_eq!(stop_params(Some(&pb::StopParams::default()), 10, &limits()).max_tokens, 54);
        assert_eq!(stop_params(None, 60, &limits()).max_tokens, 4);
        let explicit = pb::StopParams { max_tokens: 7, stop: vec!["x".into()], ..Default::default() };
        let s = stop_params(Some(&explicit), 10, &limits());
        assert_eq!((s.max_tokens, s.stop), (7, vec!["x".to_string()]));
    }

    #[test]
    fn a_prompt_at_max_model_len_is_rejected_with_both_numbers() {
        assert!(check_prompt_fits(63, &limits(), "prompt").is_ok());
        let err = check_prompt_fits(64, &limits(), "messages").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("64 tokens") && text.contains("max_model_len is 64"), "{text}");
        assert!(matches!(err, ServiceError::InvalidRequest { param: "messages", .. }));
    }

    #[test]
    fn chat_input_rejects_bad_json_and_reads_template_kwargs() {
        let bad = pb::ChatPrompt { messages_json: "{".into(), ..Default::default() };
        assert!(matches!(chat_input(&bad), Err(ServiceError::InvalidRequest { param: "messages", .. })));
        let empty = pb::ChatPrompt { messages_json: "[]".into(), ..Default::default() };
        assert!(matches!(chat_input(&empty), Err(ServiceError::InvalidRequest { param: "messages", .. })));
        let ok = pb::ChatPrompt {
            messages_json: r#"[{"role": "user", "content": "hi"}]"#.into(),
            add_generation_prompt: true,
            template_kwargs_json: r#"{"enable_thinking": false}"#.into(),
        };
        let (messages, opts) = chat_input(&ok).unwrap();
        assert_eq!(messages, vec![ChatMessage::new("user", "hi")]);
        assert!(opts.add_generation_prompt);
        assert_eq!(opts.extra.get("enable_thinking"), Some(&Json::Bool(false)));
        let not_object = pb::ChatPrompt { template_kwargs_json: "[1]".into(), ..ok };
        assert!(matches!(
            chat_input(&not_object),
            Err(ServiceError::InvalidRequest { param: "chat_template_kwargs", .. })
        ));
    }

    #[test]
    fn pooling_requests_meet_pooling_replicas_only() {
        use crate::engine::PoolingType;
        let model = PoolingParams { pooling_type: PoolingType::Mean, normalize: true };
        assert_eq!(pooling(None, None).unwrap(), None);
        let plain = pb::PoolingRequest::default();
        assert_eq!(pooling(Some(&plain), Some(model)).unwrap(), Some(model));
        let raw = pb::PoolingRequest { normalize: Some(false), ..Default::default() };
        assert_eq!(pooling(Some(&raw), Some(model)).unwrap().map(|p| p.normalize), Some(false));
        let err = pooling(Some(&plain), None).unwrap_err().to_string();
        assert!(err.contains("does not support Embeddings API"), "{err}");
        let err = pooling(None, Some(model)).unwrap_err().to_string();
        assert!(err.contains("--runner pooling"), "{err}");
    }

    #[test]
    fn truncation_keeps_the_last_tokens() {
        let mut ids = vec![1, 2, 3, 4, 5];
        truncate_left(&mut ids, None);
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        truncate_left(&mut ids, Some(9));
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        truncate_left(&mut ids, Some(2));
        assert_eq!(ids, vec![4, 5]);
    }

    #[test]
    fn deltas_carry_finish_and_stop_reasons() {
        let d = ChoiceDelta {
            index: 1,
            text: "hi".into(),
            token_ids: vec![5, 6],
            logprobs: vec![],
            finish_reason: Some(FinishReason::Stop),
            stop_reason: Some(StopReason::String("</s>".into())),
        };
        let Some(pb::generate_event::Event::Delta(delta)) = delta_event(d).event else { panic!("not a delta") };
        assert_eq!(delta.index, 1);
        assert_eq!(delta.finish_reason, pb::FinishReason::Stop as i32);
        assert_eq!(delta.stop_reason, Some(pb::delta::StopReason::StopString("</s>".into())));
    }

    #[test]
    fn replica_stats_carry_every_engine_histogram_under_its_vllm_name() {
        let mut stats = EngineStats { histograms: EngineHistograms::new(100), ..EngineStats::default() };
        stats.histograms.time_to_first_token.observe(0.03);
        stats.histograms.generation_tokens.observe(7.0);
        let wire = replica_stats("r1", "smol", &stats, pb::ReplicaState::Running);
        let names: Vec<&str> = wire.histograms.iter().map(|h| h.name.as_str()).collect();
        let exported: Vec<&str> = lumen_proto::metrics::HISTOGRAMS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, exported, "every engine histogram is one the metrics module exports");
        let ttft = &wire.histograms[0];
        assert_eq!((ttft.count, ttft.bounds.len(), ttft.cumulative_counts.len()), (1, 22, 22));
        assert_eq!(ttft.cumulative_counts[4], 1, "0.03 s lands in the 0.04 s bucket");
        let generated = &wire.histograms[5];
        assert_eq!(generated.bounds, vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        assert_eq!(generated.cumulative_counts, vec![0, 0, 0, 1, 1, 1, 1]);
    }
}
