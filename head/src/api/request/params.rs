//! The sampling and stopping parameters shared by chat and completions: their JSON view, their
//! validation (ranges as vLLM's `SamplingParams`; every error names its parameter) and their
//! conversion into `lumen_proto` `SamplingParams` / `StopParams`.
//!
//! Defaults follow vLLM: temperature 1, top_p 1, top_k off, min_p 0, penalties off (repetition 1),
//! `n` 1, special tokens skipped. Replicas validate again against the model (vocabulary size,
//! context length); the head checks what it can know without the model.

use std::collections::HashMap;

use lumen_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Number, Value};

use crate::api::edge::errors::ApiError;

/// The most top alternatives a request may ask for per token (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: i64 = 20;
/// A sanity bound on `n`; replicas enforce their own, possibly lower, limit.
pub const MAX_N: i64 = 128;
/// The highest `temperature` (OpenAI's range is [0, 2]).
pub const MAX_TEMPERATURE: f64 = 2.0;
/// The most stop strings, and the most stop token ids, one request may carry (each is checked
/// against every generated token, so the list is bounded like any other per-token cost).
pub const MAX_STOP: usize = 64;
/// The most `logit_bias` entries one request may carry.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// The fields every generation request accepts, as sent.
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<Number>,
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's `priority` (the replica's scheduling policy decides whether it may be non-zero).
    pub priority: Option<i64>,
    /// vLLM's `cache_salt` (its length is checked with the other fields, `fields.rs`).
    pub cache_salt: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's usage in every chunk; Lumen reports usage once, at the end.
    pub continuous_usage_stats: Option<bool>,
}

impl StreamOptions {
    /// Whether any option is set (vLLM refuses set options without `stream`).
    fn any_set(&self) -> bool {
        self.include_usage.is_some() || self.continuous_usage_stats.is_some()
    }
}

/// What differs between the routes: how many tokens by default and how many log-probabilities.
#[derive(Debug, Clone, Copy)]
pub struct RouteDefaults {
    /// `max_tokens` when absent; 0 = up to the context length.
    pub max_tokens: u32,
    /// `Some(k)`: report the chosen token's log-probability and `k` alternatives.
    pub logprobs: Option<u32>,
}

/// The validated parameters, ready for a `GenerateRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub sampling: pb::SamplingParams,
    pub stop: pb::StopParams,
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub skip_special_tokens: bool,
    pub priority: i64,
    pub cache_salt: Option<String>,
}

impl CommonParams {
    /// Validates every field and converts to the protocol's parameters.
    pub fn validate(&self, route: RouteDefaults) -> Result<Generation, ApiError> {
        let max_tokens = match self.max_tokens {
            Some(v) => int_in("max_tokens", v, 1, u32::MAX as i64)? as u32,
            None => route.max_tokens,
        };
        let min_tokens = match self.min_tokens {
            Some(v) => int_in("min_tokens", v, 0, u32::MAX as i64)? as u32,
            None => 0,
        };
        if max_tokens != 0 && min_tokens > max_tokens {
            return Err(ApiError::param(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            ));
        }
        let sampling = pb::SamplingParams {
            temperature: float_in("temperature", self.temperature.unwrap_or(1.0), 0.0, MAX_TEMPERATURE)?,
            top_p: float_in("top_p", self.top_p.unwrap_or(1.0), f64::MIN_POSITIVE, 1.0)?,
            top_k: top_k(self.top_k)?,
            min_p: float_in("min_p", self.min_p.unwrap_or(0.0), 0.0, 1.0)?,
            presence_penalty: float_in("presence_penalty", self.presence_penalty.unwrap_or(0.0), -2.0, 2.0)?,
            frequency_penalty: float_in("frequency_penalty", self.frequency_penalty.unwrap_or(0.0), -2.0, 2.0)?,
            repetition_penalty: repetition_penalty(self.repetition_penalty)?,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
            seed: self.seed.as_ref().map(seed).transpose()?,
            logprobs: route.logprobs,
        };
        let stop = pb::StopParams {
            max_tokens,
            min_tokens,
            stop: stop_strings(self.stop.as_ref())?,
            stop_token_ids: stop_token_ids(self.stop_token_ids.as_deref().unwrap_or_default())?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
        };
        let stream = self.stream.unwrap_or(false);
        if let Some(options) = &self.stream_options {
            if options.any_set() && !stream {
                return Err(ApiError::param("stream_options", "stream_options can only be set when stream is true"));
            }
            if options.continuous_usage_stats == Some(true) {
                return Err(ApiError::param(
                    "stream_options.continuous_usage_stats",
                    "continuous_usage_stats true is not supported by Lumen (usage comes once, at the end)",
                ));
            }
        }
        Ok(Generation {
            sampling,
            stop,
            n: int_in("n", self.n.unwrap_or(1), 1, MAX_N)? as u32,
            stream,
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            priority: self.priority.unwrap_or(0),
            cache_salt: self.cache_salt.clone(),
        })
    }
}

/// Checks an integer's range; the error names `param` and the bound the value as given misses.
pub fn int_in(param: &str, v: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    if v < min {
        Err(ApiError::param(param, format!("{param} must be at least {min}, got {v}")))
    } else if v > max {
        Err(ApiError::param(param, format!("{param} must be at most {max}, got {v}")))
    } else {
        Ok(v)
    }
}

/// Token ids as sent (non-negative, 32-bit); the error names `param`.
pub fn token_ids(param: &str, ids: &[i64]) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&t| u32::try_from(t).map_err(|_| ApiError::param(param, format!("{t} is not a valid token id"))))
        .collect()
}

fn stop_token_ids(ids: &[i64]) -> Result<Vec<u32>, ApiError> {
    if ids.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop_token_ids",
            format!("stop_token_ids holds {} ids, at most {MAX_STOP} are allowed", ids.len()),
        ));
    }
    token_ids("stop_token_ids", ids)
}

impl Generation {
    /// Checks what the head knows of the context before the prompt is tokenized: `max_tokens`
    /// (named `param`, as sent) must leave room for at least one prompt token, and a prompt of
    /// known length (token ids) plus the tokens to generate must fit `max_model_len`. The replica
    /// checks text prompts once tokenized. `max_model_len` 0 means unknown: nothing is checked.
    pub fn check_context(&self, param: &str, max_model_len: u32, prompt_tokens: Option<usize>) -> Result<(), ApiError> {
        let (limit, max_tokens) = (max_model_len as usize, self.stop.max_tokens as usize);
        if limit == 0 {
            return Ok(());
        }
        if max_tokens >= limit {
            return Err(ApiError::param(
                param,
                format!("{param} ({max_tokens}) leaves no room for the prompt: the context is {limit} tokens"),
            ));
        }
        match prompt_tokens {
            Some(prompt) if prompt + max_tokens.max(1) > limit => Err(ApiError::param(
                "prompt",
                format!(
                    "this model's maximum context length is {limit} tokens, but {prompt} prompt tokens and \
                     {} to generate were requested",
                    max_tokens.max(1)
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Number of top log-probabilities per token (`top_logprobs` for chat, `logprobs` for completions).
pub fn logprob_count(param: &str, v: i64) -> Result<u32, ApiError> {
    Ok(int_in(param, v, 0, MAX_LOGPROBS)? as u32)
}

fn float_in(param: &str, v: f64, min: f64, max: f64) -> Result<f32, ApiError> {
    if v.is_finite() && (min..=max).contains(&v) {
        Ok(v as f32)
    } else if min == f64::MIN_POSITIVE {
        Err(ApiError::param(param, format!("{param} must be in (0, {max}], got {v}")))
    } else {
        Err(ApiError::param(param, format!("{param} must be in [{min}, {max}], got {v}")))
    }
}

fn top_k(v: Option<i64>) -> Result<u32, ApiError> {
    match v {
        // vLLM: -1 (and 0) disable top-k.
        None | Some(-1) | Some(0) => Ok(0),
        Some(k) if k >= 1 => u32::try_from(k)
            .map_err(|_| ApiError::param("top_k", format!("top_k must be at most {}, got {k}", u32::MAX))),
        Some(k) => Err(ApiError::param("top_k", format!("top_k must be -1 (disabled) or at least 1, got {k}"))),
    }
}

fn repetition_penalty(v: Option<f64>) -> Result<f32, ApiError> {
    let v = v.unwrap_or(1.0);
    if v.is_finite() && v > 0.0 && v <= 2.0 {
        Ok(v as f32)
    } else {
        Err(ApiError::param("repetition_penalty", format!("repetition_penalty must be in (0, 2], got {v}")))
    }
}

fn seed(v: &Number) -> Result<u64, ApiError> {
    // vLLM accepts any signed 64-bit integer; negative seeds keep their bit pattern.
    v.as_i64().map(|s| s as u64).ok_or_else(|| {
        ApiError::param("seed", format!("seed must be an integer from {} to {}, got {v}", i64::MIN, i64::MAX))
    })
}

fn logit_bias(map: Option<&HashMap<String, f64>>) -> Result<Vec<pb::LogitBias>, ApiError> {
    let Some(map) = map else { return Ok(Vec::new()) };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::param(
            "logit_bias",
            format!("logit_bias holds {} entries, at most {MAX_LOGIT_BIAS} are allowed", map.len()),
        ));
    }
    let mut out: Vec<pb::LogitBias> = map
        .iter()
        .map(|(key, &bias)| {
            let token_id = key.trim().parse::<u32>().map_err(|_| {
                ApiError::param("logit_bias", format!("logit_bias keys must be token ids, got {key:?}"))
            })?;
            if !bias.is_finite() || !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::param(
                    "logit_bias",
                    format!("bias {bias} for token {key} is outside [-100, 100]"),
                ));
            }
            Ok(pb::LogitBias { token_id, bias: bias as f32 })
        })
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|b| b.token_id);
    Ok(out)
}

fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let strings = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::param("stop", format!("stop must hold strings, found {other}"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::param("stop", format!("stop must be a string or a list of strings, got {other}")));
        }
    };
    if strings.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!("stop holds {} strings, at most {MAX_STOP} are allowed", strings.len()),
        ));
    }
    if strings.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop strings must not be empty"));
    }
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::body::{parse_object, typed};

    const CHAT: RouteDefaults = RouteDefaults { max_tokens: 0, logprobs: None };

    fn validate(json: &str) -> Result<Generation, ApiError> {
        let body = parse_object(json.as_bytes())?;
        typed::<CommonParams>(&body)?.validate(CHAT)
    }

    fn rejected_param(json: &str) -> String {
        match validate(json) {
            Err(ApiError::InvalidParam { param, .. }) => param,
            other => panic!("{json}: expected a parameter error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_vllm() {
        let g = validate("{}").unwrap();
        assert_eq!(g.sampling.temperature, 1.0);
        assert_eq!(g.sampling.top_p, 1.0);
        assert_eq!(g.sampling.top_k, 0);
        assert_eq!(g.sampling.repetition_penalty, 1.0);
        assert_eq!(g.sampling.seed, None);
        assert_eq!(g.stop.max_tokens, 0, "absent max_tokens means up to the context length");
        assert_eq!((g.n, g.stream, g.include_usage, g.skip_special_tokens), (1, false, false, true));
    }

    #[test]
    fn every_field_is_carried_into_the_protocol() {
        let g = validate(
            r#"{"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                "presence_penalty": 0.1, "frequency_penalty": -0.2, "repetition_penalty": 1.1, "seed": -1,
                "stop": "@@@", "stop_token_ids": [2, 3], "n": 3, "stream": true,
                "stream_options": {"include_usage": true}, "ignore_eos": true, "min_tokens": 2,
                "logit_bias": {"50": -100, "7": 2.5}, "skip_special_tokens": false, "user": "x"}"#,
        )
        .unwrap();
        assert_eq!(g.stop.max_tokens, 7);
        assert_eq!(g.stop.min_tokens, 2);
        assert_eq!(g.stop.stop, vec!["@@@".to_string()]);
        assert_eq!(g.stop.stop_token_ids, vec![2, 3]);
        assert!(g.stop.ignore_eos);
        assert_eq!((g.sampling.temperature, g.sampling.top_p, g.sampling.top_k), (0.5, 0.9, 40));
        assert_eq!(g.sampling.seed, Some(u64::MAX));
        assert_eq!(
            g.sampling.logit_bias,
            vec![pb::LogitBias { token_id: 7, bias: 2.5 }, pb::LogitBias { token_id: 50, bias: -100.0 }]
        );
        assert_eq!((g.n, g.stream, g.include_usage, g.skip_special_tokens), (3, true, true, false));
    }

    #[test]
    fn top_k_minus_one_disables_it() {
        assert_eq!(validate(r#"{"top_k": -1}"#).unwrap().sampling.top_k, 0);
    }

    #[test]
    fn stop_accepts_a_list() {
        assert_eq!(validate(r#"{"stop": ["a", "b"]}"#).unwrap().stop.stop, vec!["a", "b"]);
    }

    #[test]
    fn out_of_range_values_name_their_parameter() {
        let cases = [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": -5}"#, "max_tokens"),
            (r#"{"temperature": -0.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.01}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"min_p": 1.5}"#, "min_p"),
            (r#"{"presence_penalty": 2.5}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -3}"#, "frequency_penalty"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"min_tokens": 5, "max_tokens": 2}"#, "min_tokens"),
            (r#"{"stop": ""}"#, "stop"),
            (r#"{"stop": [1]}"#, "stop"),
            (r#"{"stop": 5}"#, "stop"),
            (r#"{"stop_token_ids": [-1]}"#, "stop_token_ids"),
            (r#"{"logit_bias": {"abc": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"5": 101}}"#, "logit_bias"),
            (r#"{"seed": 1.5}"#, "seed"),
            (r#"{"stream_options": {"include_usage": true}}"#, "stream_options"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"seed": 18446744073709551615}"#, "seed"),
            (
                r#"{"stream": true, "stream_options": {"continuous_usage_stats": true}}"#,
                "stream_options.continuous_usage_stats",
            ),
        ];
        for (json, param) in cases {
            assert_eq!(rejected_param(json), param, "{json}");
        }
    }

    #[test]
    fn messages_say_which_bound_the_value_as_given_misses() {
        let message = |json: &str| match validate(json) {
            Err(ApiError::InvalidParam { message, .. }) => message,
            other => panic!("{json}: {other:?}"),
        };
        assert_eq!(message(r#"{"max_tokens": 4294967296}"#), "max_tokens must be at most 4294967295, got 4294967296");
        assert_eq!(message(r#"{"max_tokens": 0}"#), "max_tokens must be at least 1, got 0");
        assert_eq!(message(r#"{"n": 129}"#), "n must be at most 128, got 129");
        assert_eq!(message(r#"{"temperature": 2.5}"#), "temperature must be in [0, 2], got 2.5");
        assert!(validate(r#"{"stream_options": {}}"#).is_ok(), "empty stream options need no stream, as in vLLM");
    }

    #[test]
    fn wrong_types_name_their_parameter() {
        assert_eq!(rejected_param(r#"{"temperature": "warm"}"#), "temperature");
        assert_eq!(rejected_param(r#"{"n": "2"}"#), "n");
        assert_eq!(rejected_param(r#"{"stream": 1}"#), "stream");
        assert_eq!(rejected_param(r#"{"logit_bias": {"5": "x"}}"#), "logit_bias.5");
        assert_eq!(rejected_param(r#"{"stream_options": {"include_usage": "yes"}}"#), "stream_options.include_usage");
    }

    #[test]
    fn oversized_lists_are_refused_by_name() {
        let stops: Vec<String> = (0..=MAX_STOP).map(|i| format!("s{i}")).collect();
        assert_eq!(rejected_param(&serde_json::json!({ "stop": stops }).to_string()), "stop");
        let ids: Vec<usize> = (0..=MAX_STOP).collect();
        assert_eq!(rejected_param(&serde_json::json!({ "stop_token_ids": ids }).to_string()), "stop_token_ids");
        let bias: serde_json::Map<String, Value> = (0..=MAX_LOGIT_BIAS).map(|i| (i.to_string(), 1.into())).collect();
        assert_eq!(rejected_param(&serde_json::json!({ "logit_bias": bias }).to_string()), "logit_bias");
        let at_limit: Vec<String> = (0..MAX_STOP).map(|i| format!("s{i}")).collect();
        assert_eq!(validate(&serde_json::json!({ "stop": at_limit }).to_string()).unwrap().stop.stop.len(), MAX_STOP);
    }

    #[test]
    fn context_checks_name_the_parameter_sent() {
        let g = validate(r#"{"max_tokens": 2048}"#).unwrap();
        assert!(
            matches!(g.check_context("max_completion_tokens", 2048, None), Err(ApiError::InvalidParam { param, .. }) if param == "max_completion_tokens")
        );
        let g = validate(r#"{"max_tokens": 48}"#).unwrap();
        assert!(g.check_context("max_tokens", 2048, Some(2000)).is_ok());
        assert!(
            matches!(g.check_context("max_tokens", 2048, Some(2001)), Err(ApiError::InvalidParam { param, .. }) if param == "prompt")
        );
        assert!(g.check_context("max_tokens", 0, Some(1 << 20)).is_ok(), "unknown context: the replica checks");
    }

    #[test]
    fn logprob_count_is_bounded() {
        assert_eq!(logprob_count("top_logprobs", 20).unwrap(), 20);
        assert!(
            matches!(logprob_count("top_logprobs", 21), Err(ApiError::InvalidParam { param, .. }) if param == "top_logprobs")
        );
        assert!(logprob_count("logprobs", -1).is_err());
    }
}
