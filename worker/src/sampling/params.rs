//! Per-request sampling and stopping parameters, with the validation the API relies on.
//!
//! Names and ranges follow vLLM's `SamplingParams`; `validate` names the offending parameter in
//! its error so the HTTP layer can answer 400 with `param` set.

use crate::{Result, TokenId, WorkerError};

/// The most `logit_bias` entries one request may carry (OpenAI allows 300).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;
/// The most top alternatives `logprobs` may ask for (OpenAI's chat limit is 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before softmax.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to at least this. (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; `None` disables it.
    pub top_k: Option<usize>,
    /// Drop tokens whose probability is below `min_p` times the top token's. [0, 1].
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated. [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already generated. [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens in the prompt or output. > 0, 1 = off.
    pub repetition_penalty: f32,
    /// Added to the logits of the given tokens before sampling, each in [-100, 100].
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Seeds this request's random generator: the same seed gives the same output.
    pub seed: Option<u64>,
    /// `Some(k)`: report the chosen token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// True when the next token is the argmax of the (processed) logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == Some(1)
    }

    /// Checks every field's range; `vocab_size` bounds the token ids in `logit_bias`.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let finite = |param: &'static str, v: f32| {
            if v.is_finite() { Ok(()) } else { Err(WorkerError::invalid(param, "must be a finite number")) }
        };
        finite("temperature", self.temperature)?;
        if self.temperature < 0.0 {
            return Err(WorkerError::invalid("temperature", format!("must be >= 0, got {}", self.temperature)));
        }
        finite("top_p", self.top_p)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(WorkerError::invalid("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        finite("min_p", self.min_p)?;
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(WorkerError::invalid("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            finite(param, v)?;
            if !(-2.0..=2.0).contains(&v) {
                return Err(WorkerError::invalid(param, format!("must be in [-2, 2], got {v}")));
            }
        }
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.repetition_penalty <= 0.0 {
            return Err(WorkerError::invalid(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS_ENTRIES {
            return Err(WorkerError::invalid(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {}", self.logit_bias.len()),
            ));
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(WorkerError::invalid(
                    "logit_bias",
                    format!("token id {token} is outside the vocabulary of {vocab_size}"),
                ));
            }
            if !bias.is_finite() || !(-100.0..=100.0).contains(&bias) {
                return Err(WorkerError::invalid("logit_bias", format!("bias {bias} is outside [-100, 100]")));
            }
        }
        if let Some(k) = self.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(WorkerError::invalid("logprobs", format!("at most {MAX_TOP_LOGPROBS}, got {k}")));
        }
        Ok(())
    }
}

/// When generation ends.
#[derive(Clone, Debug, PartialEq)]
pub struct StopParams {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    /// Generation stops when the text contains one of these; the match is cut from the output.
    pub stop: Vec<String>,
    /// Generation stops when one of these tokens is sampled (it is not shown as text).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Keep the matched stop string in the output instead of cutting it.
    pub include_stop_str_in_output: bool,
}

/// The most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 256;

impl Default for StopParams {
    fn default() -> Self {
        StopParams {
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
        }
    }
}

impl StopParams {
    /// Checks counts and lengths; `vocab_size` bounds `stop_token_ids`.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(WorkerError::invalid("max_tokens", "must be at least 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(WorkerError::invalid(
                "min_tokens",
                format!("{} is more than max_tokens {}", self.min_tokens, self.max_tokens),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(WorkerError::invalid(
                "stop",
                format!("at most {MAX_STOP_STRINGS} strings, got {}", self.stop.len()),
            ));
        }
        for s in &self.stop {
            if s.is_empty() {
                return Err(WorkerError::invalid("stop", "stop strings must not be empty"));
            }
            if s.len() > MAX_STOP_STRING_BYTES {
                return Err(WorkerError::invalid(
                    "stop",
                    format!("stop strings are at most {MAX_STOP_STRING_BYTES} bytes"),
                ));
            }
        }
        if let Some(&bad) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(WorkerError::invalid(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary of {vocab_size}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range_values_naming_the_parameter() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { presence_penalty: 3.0, ..Default::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: f32::NAN, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { logit_bias: vec![(100, 1.0)], ..Default::default() }, "logit_bias"),
            (SamplingParams { logit_bias: vec![(1, 101.0)], ..Default::default() }, "logit_bias"),
            (SamplingParams { logprobs: Some(21), ..Default::default() }, "logprobs"),
        ];
        for (params, want) in cases {
            match params.validate(100) {
                Err(WorkerError::InvalidParameter { param, .. }) => {
                    assert_eq!(param, want, "{params:?}")
                }
                other => panic!("{params:?} gave {other:?}"),
            }
        }
        SamplingParams::default().validate(100).unwrap();
        SamplingParams::greedy().validate(100).unwrap();
    }

    #[test]
    fn stop_params_reject_bad_limits() {
        let bad = [
            (StopParams { max_tokens: 0, ..Default::default() }, "max_tokens"),
            (StopParams { min_tokens: 20, max_tokens: 10, ..Default::default() }, "min_tokens"),
            (StopParams { stop: vec![String::new()], ..Default::default() }, "stop"),
            (StopParams { stop: vec!["x".into(); 17], ..Default::default() }, "stop"),
            (StopParams { stop_token_ids: vec![100], ..Default::default() }, "stop_token_ids"),
        ];
        for (params, want) in bad {
            match params.validate(100) {
                Err(WorkerError::InvalidParameter { param, .. }) => assert_eq!(param, want),
                other => panic!("{params:?} gave {other:?}"),
            }
        }
    }
}
