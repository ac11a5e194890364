//! vLLM's `speculative_config` (issue 18): the object a deployment's `model:` section and the
//! worker's `--speculative-config` flag take, and its checks. It lives here because both sides
//! read it: the head refuses a bad one before a worker is sent it, the worker runs what
//! [`SpeculativeConfig::settings`] returns (its proposers are in the worker's `spec` module).
//!
//! Invariants: [`SpeculativeConfig::settings`] accepts only what the worker runs (the `ngram`
//! and `draft_model` methods; EAGLE-style heads and MTP are refused by name until they are
//! built), with vLLM's defaults and its inference of the method from `model`, and bounds every
//! number ([`MAX_SPECULATIVE_TOKENS`], [`MAX_LOOKUP`]), so a config cannot make a step or a
//! lookup unbounded. Whether a draft model's files exist and fit the target (same vocabulary,
//! long enough context) is the worker's check: only it can read them.

use serde::{Deserialize, Serialize};

/// The most tokens proposed for one sequence in one step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;
/// The longest n-gram the prompt-lookup proposer matches.
pub const MAX_LOOKUP: usize = 32;

/// vLLM's `speculative_config`, as given (the flag's JSON or the serve config's object).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    /// The proposer: `ngram` (prompt lookup; vLLM also spells it `[ngram]`) or `draft_model`
    /// (a small model sharing the target's tokenizer). Without it, `model` decides: `[ngram]`
    /// is prompt lookup, anything else a draft model (vLLM's inference).
    #[serde(default)]
    pub method: Option<String>,
    /// The draft model (a GGUF file, a Hugging Face directory or a hub id), or vLLM's older
    /// spelling of the method (`"model": "[ngram]"`).
    #[serde(default)]
    pub model: Option<String>,
    /// The draft model's tensor-parallel size: only 1 (the draft runs whole, on the target's
    /// device; a target split over GPUs takes no draft yet, one split over CPU ranks does).
    #[serde(default)]
    pub draft_tensor_parallel_size: Option<usize>,
    /// The draft model's weight quantization, as `--quantization` takes it (default: what its
    /// checkpoint says).
    #[serde(default)]
    pub quantization: Option<String>,
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

/// Which proposer drafts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup (`ngram`): no model runs.
    #[default]
    Ngram,
    /// A draft model ([`SpeculativeConfig::model`]) proposes its greedy continuation.
    DraftModel,
}

/// The checked settings the engine runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecSettings {
    pub method: SpecMethod,
    /// Tokens proposed per sequence and step (1 to [`MAX_SPECULATIVE_TOKENS`]).
    pub num_tokens: usize,
    /// The n-gram lengths tried, longest first (1 <= min <= max <= [`MAX_LOOKUP`]; `ngram`
    /// only).
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
                "{e} (a JSON object with `method` (ngram or draft_model), `model`, `num_speculative_tokens`, \
                 `prompt_lookup_min`, `prompt_lookup_max`, `draft_tensor_parallel_size`, `quantization` and/or \
                 `disable_by_batch_size`)"
            )
        })
    }

    /// The settings this config asks for, or an error naming what is wrong (vLLM's defaults and
    /// checks, plus our bounds).
    pub fn settings(&self) -> Result<SpecSettings, String> {
        let bad = |message: String| Err(message);
        let model = self.model.as_deref().filter(|m| *m != "[ngram]");
        let method = match (self.method.as_deref(), self.model.as_deref()) {
            (Some(m), _) => m,
            (None, Some("[ngram]")) => "ngram",
            (None, Some(_)) => "draft_model",
            (None, None) => {
                return bad("`method` is required: \"ngram\" (prompt lookup) or \"draft_model\" (with `model`)".into());
            }
        };
        let method = match method {
            "ngram" | "[ngram]" => {
                if let Some(model) = model {
                    return bad(format!(
                        "method \"ngram\" runs no model; drop `model` ({model:?}) or use \"draft_model\""
                    ));
                }
                SpecMethod::Ngram
            }
            "draft_model" => {
                if model.is_none_or(|m| m.trim().is_empty()) {
                    return bad(
                        "method \"draft_model\" needs `model`: the draft's GGUF file, directory or hub id".into()
                    );
                }
                if self.prompt_lookup_min.is_some() || self.prompt_lookup_max.is_some() {
                    return bad(
                        "prompt_lookup_min / prompt_lookup_max are for method \"ngram\", not a draft model".into()
                    );
                }
                SpecMethod::DraftModel
            }
            "eagle" | "eagle3" | "medusa" | "mlp_speculator" | "deepseek_mtp" | "mtp" | "suffix" => {
                return bad(format!("method {method:?} is not built yet; \"ngram\" and \"draft_model\" are"));
            }
            other => {
                return bad(format!("unknown method {other:?}; the ones built are \"ngram\" and \"draft_model\""));
            }
        };
        if method == SpecMethod::Ngram && self.quantization.is_some() {
            return bad("`quantization` is the draft model's; method \"ngram\" runs no model".into());
        }
        match self.draft_tensor_parallel_size {
            None | Some(1) => {}
            Some(n) => {
                return bad(format!(
                    "draft_tensor_parallel_size must be 1 (the draft runs whole beside the target), got {n}"
                ));
            }
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
        Ok(SpecSettings {
            method,
            num_tokens,
            lookup_min,
            lookup_max,
            disable_by_batch_size: self.disable_by_batch_size,
        })
    }

    /// The draft model to load, when the method is `draft_model` (call after
    /// [`SpeculativeConfig::settings`] accepted the config).
    pub fn draft_model(&self) -> Option<&str> {
        match self.settings() {
            Ok(SpecSettings { method: SpecMethod::DraftModel, .. }) => self.model.as_deref(),
            _ => None,
        }
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
        assert_eq!(
            s,
            SpecSettings {
                method: SpecMethod::Ngram,
                num_tokens: 4,
                lookup_min: 5,
                lookup_max: 5,
                disable_by_batch_size: None
            }
        );
        let s = settings(r#"{"model": "[ngram]", "num_speculative_tokens": 3, "prompt_lookup_max": 4}"#).unwrap();
        assert_eq!((s.num_tokens, s.lookup_min, s.lookup_max), (3, 4, 4));
        let s = settings(r#"{"method": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 6, "disable_by_batch_size": 8}"#)
            .unwrap();
        assert_eq!(
            s,
            SpecSettings {
                method: SpecMethod::Ngram,
                num_tokens: 2,
                lookup_min: 2,
                lookup_max: 6,
                disable_by_batch_size: Some(8)
            }
        );
    }

    #[test]
    fn a_draft_model_is_named_by_method_or_inferred_from_model() {
        let explicit =
            r#"{"method": "draft_model", "model": "meta-llama/Llama-3.2-1B-Instruct", "num_speculative_tokens": 5}"#;
        let config = SpeculativeConfig::parse_json(explicit).unwrap();
        let s = config.settings().unwrap();
        assert_eq!((s.method, s.num_tokens), (SpecMethod::DraftModel, 5));
        assert_eq!(config.draft_model(), Some("meta-llama/Llama-3.2-1B-Instruct"));
        // vLLM infers the method from a model that is not `[ngram]`.
        let inferred = SpeculativeConfig::parse_json(
            r#"{"model": "/models/draft.gguf", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1, "quantization": "fp8"}"#,
        )
        .unwrap();
        assert_eq!(inferred.settings().unwrap().method, SpecMethod::DraftModel);
        assert_eq!(inferred.draft_model(), Some("/models/draft.gguf"));
        let ngram = SpeculativeConfig::parse_json(r#"{"model": "[ngram]", "num_speculative_tokens": 3}"#).unwrap();
        assert_eq!(ngram.draft_model(), None);
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
            (r#"{"method": "draft_model", "num_speculative_tokens": 4}"#, "needs `model`"),
            (r#"{"method": "draft_model", "model": " ", "num_speculative_tokens": 4}"#, "needs `model`"),
            (r#"{"model": "d.gguf", "num_speculative_tokens": 4, "prompt_lookup_max": 3}"#, "for method \"ngram\""),
            (r#"{"method": "ngram", "model": "d.gguf", "num_speculative_tokens": 4}"#, "runs no model"),
            (r#"{"method": "ngram", "num_speculative_tokens": 4, "quantization": "fp8"}"#, "runs no model"),
            (r#"{"model": "d.gguf", "num_speculative_tokens": 4, "draft_tensor_parallel_size": 2}"#, "must be 1"),
            (r#"{"model": "d.gguf", "num_speculative_tokens": 40}"#, "1 to 16"),
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
