//! vLLM's `speculative_config` (issue 18): the object a deployment's `model:` section and the
//! worker's `--speculative-config` flag take, and its checks. It lives here because both sides
//! read it: the head refuses a bad one before a worker is sent it, the worker runs what
//! [`SpeculativeConfig::settings`] returns (its proposers are in the worker's `spec` module).
//!
//! Invariants: [`SpeculativeConfig::settings`] accepts only what the worker runs (the `ngram`
//! method; draft models and EAGLE-style heads are refused by name until they are built), with
//! vLLM's defaults, and bounds every number ([`MAX_SPECULATIVE_TOKENS`], [`MAX_LOOKUP`]), so a
//! config cannot make a step or a lookup unbounded.

use serde::{Deserialize, Serialize};

/// The most tokens proposed for one sequence in one step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;
/// The longest n-gram the prompt-lookup proposer matches.
pub const MAX_LOOKUP: usize = 32;

/// vLLM's `speculative_config`, as given (the flag's JSON or the serve config's object).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    /// The proposer: `ngram` (prompt lookup; vLLM also spells it `[ngram]`).
    #[serde(default)]
    pub method: Option<String>,
    /// vLLM's older spelling of the method (`"model": "[ngram]"`), or a draft model's path.
    #[serde(default)]
    pub model: Option<String>,
    /// Tokens proposed per step.
    #[serde(default)]
    pub num_speculative_tokens: Option<usize>,
    /// The shortest n-gram the lookup matches (default: `prompt_lookup_max`, or 5 with neither).
    #[serde(default)]
    pub prompt_lookup_min: Option<usize>,
    /// The longest n-gram the lookup matches (default: `prompt_lookup_min`, or 5 with neither).
    #[serde(default)]
    pub prompt_lookup_max: Option<usize>,
    /// Speculation is off for a step when more sequences than this are running.
    #[serde(default)]
    pub disable_by_batch_size: Option<usize>,
}

/// The checked settings the engine runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecSettings {
    /// Tokens proposed per sequence and step (1 to [`MAX_SPECULATIVE_TOKENS`]).
    pub num_tokens: usize,
    /// The n-gram lengths tried, longest first (1 <= min <= max <= [`MAX_LOOKUP`]).
    pub lookup_min: usize,
    pub lookup_max: usize,
    /// No speculation in a step with more running sequences than this (`None`: always).
    pub disable_by_batch_size: Option<usize>,
}

impl SpeculativeConfig {
    /// Parses the flag's JSON (`{"method": "ngram", "num_speculative_tokens": 4, ...}`).
    pub fn parse_json(s: &str) -> Result<SpeculativeConfig, String> {
        serde_json::from_str(s).map_err(|e| {
            format!(
                "{e} (a JSON object with `method` (ngram), `num_speculative_tokens`, `prompt_lookup_min`, \
                 `prompt_lookup_max` and/or `disable_by_batch_size`)"
            )
        })
    }

    /// The settings this config asks for, or an error naming what is wrong (vLLM's defaults and
    /// checks, plus our bounds).
    pub fn settings(&self) -> Result<SpecSettings, String> {
        let bad = |message: String| Err(message);
        let method = match (self.method.as_deref(), self.model.as_deref()) {
            (Some(m), _) => m,
            (None, Some("[ngram]")) => "ngram",
            (None, Some(model)) => {
                return bad(format!(
                    "a draft model (`model`: {model:?}) is not built yet; `method`: \"ngram\" is (prompt lookup)"
                ));
            }
            (None, None) => return bad("`method` is required: \"ngram\" (prompt lookup)".into()),
        };
        match method {
            "ngram" | "[ngram]" => {}
            "draft_model" | "eagle" | "eagle3" | "medusa" | "mlp_speculator" | "deepseek_mtp" | "mtp" => {
                return bad(format!("method {method:?} is not built yet; \"ngram\" (prompt lookup) is"));
            }
            other => return bad(format!("unknown method {other:?}; the one built is \"ngram\" (prompt lookup)")),
        }
        let Some(num_tokens) = self.num_speculative_tokens else {
            return bad("`num_speculative_tokens` is required (tokens proposed per step)".into());
        };
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&num_tokens) {
            return bad(format!("num_speculative_tokens must be 1 to {MAX_SPECULATIVE_TOKENS}, got {num_tokens}"));
        }
        let (lookup_min, lookup_max) = match (self.prompt_lookup_min, self.prompt_lookup_max) {
            (None, None) => (5, 5),
            (Some(min), None) => (min, min),
            (None, Some(max)) => (max, max),
            (Some(min), Some(max)) => (min, max),
        };
        if lookup_min < 1 || lookup_max > MAX_LOOKUP || lookup_min > lookup_max {
            return bad(format!(
                "prompt_lookup_min ({lookup_min}) and prompt_lookup_max ({lookup_max}) must satisfy 1 <= min <= max <= {MAX_LOOKUP}"
            ));
        }
        if self.disable_by_batch_size == Some(0) {
            return bad("disable_by_batch_size must be at least 1 (leave it out to speculate at any batch size)".into());
        }
        Ok(SpecSettings { num_tokens, lookup_min, lookup_max, disable_by_batch_size: self.disable_by_batch_size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<SpecSettings, String> {
        SpeculativeConfig::parse_json(json)?.settings()
    }

    #[test]
    fn configs_take_vllms_spellings_and_defaults() {
        let s = settings(r#"{"method": "ngram", "num_speculative_tokens": 4}"#).unwrap();
        assert_eq!(s, SpecSettings { num_tokens: 4, lookup_min: 5, lookup_max: 5, disable_by_batch_size: None });
        let s = settings(r#"{"model": "[ngram]", "num_speculative_tokens": 3, "prompt_lookup_max": 4}"#).unwrap();
        assert_eq!((s.num_tokens, s.lookup_min, s.lookup_max), (3, 4, 4));
        let s = settings(r#"{"method": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 6, "disable_by_batch_size": 8}"#)
            .unwrap();
        assert_eq!(s, SpecSettings { num_tokens: 2, lookup_min: 2, lookup_max: 6, disable_by_batch_size: Some(8) });
    }

    #[test]
    fn bad_configs_are_refused_naming_what_is_wrong() {
        for (json, says) in [
            (r#"{"num_speculative_tokens": 4}"#, "`method` is required"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
            (r#"{"method": "ngram", "num_speculative_tokens": 0}"#, "1 to 16"),
            (r#"{"method": "ngram", "num_speculative_tokens": 1000000}"#, "1 to 16"),
            (r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0}"#, "1 <= min"),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 2}"#,
                "min <= max",
            ),
            (r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 100000}"#, "<= 32"),
            (r#"{"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 0}"#, "at least 1"),
            (r#"{"method": "eagle", "num_speculative_tokens": 4}"#, "not built yet"),
            (r#"{"model": "meta-llama/Llama-3.2-1B", "num_speculative_tokens": 4}"#, "draft model"),
            (r#"{"method": "magic", "num_speculative_tokens": 4}"#, "unknown method"),
            (r#"{"method": "ngram", "num_speculative_tokens": -1}"#, "invalid value"),
            (r#"{"method": "ngram", "num_speculative_tokens": 4, "temperature": 1}"#, "unknown field"),
            (r#"[1, 2]"#, "JSON object"),
            ("{", "JSON object"),
        ] {
            let err = settings(json).expect_err(json);
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
