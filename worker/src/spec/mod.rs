//! Speculative decoding (issue 18): proposing tokens cheaply and letting the target model verify
//! several of them in one forward pass.
//!
//! What this module owns: the `speculative_config` (vLLM's JSON: `method`,
//! `num_speculative_tokens`, `prompt_lookup_min` / `prompt_lookup_max`, `disable_by_batch_size`),
//! checked and bounded before anything runs, and the proposers (`ngram`: prompt lookup). The
//! scheduler holds a sequence's proposed tokens as its *draft* (`Scheduler::set_draft`): they are
//! computed in the sequence's next step like decode tokens, a logits row each, and never enter
//! the prefix cache until verified. The engine verifies them (`engine/core_spec.rs`).
//!
//! Verification of a proposer that puts all its probability on one token (ngram, and any
//! deterministic proposer): row i's token is *sampled from the target's own distribution* with
//! the sequence's sampler, exactly as without speculation (penalties, bias, top-k/p, min-p,
//! seeds, log-probabilities), after the tokens before it were accepted; the draft token is
//! accepted when the sample equals it, and the first sample that differs is the step's last
//! token (after all k match, row k+1's sample is the bonus token). For a point-mass proposal q
//! this is exactly rejection sampling (accept with probability p(d) / q(d) = p(d); on rejection
//! draw from (p - q)+ renormalized, which is p without d), so every token follows the target's
//! distribution, and greedy output is identical to non-speculative decoding. A draft model with
//! its own distribution (a later proposer) needs the general rule and is what `Proposal` would
//! carry probabilities for; EAGLE-style heads propose from the target's hidden states the same
//! way (see docs/architecture.md).
//!
//! Invariants: a draft never runs a sequence past `max_tokens` or `max_model_len`; at most
//! [`MAX_SPECULATIVE_TOKENS`] tokens a step and n-grams of at most [`MAX_LOOKUP`] tokens, so a
//! config cannot make a step or a lookup unbounded.

pub mod ngram;

use serde::{Deserialize, Serialize};

use crate::WorkerError;

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
    pub fn settings(&self) -> Result<SpecSettings, WorkerError> {
        let bad = |message: String| Err(WorkerError::invalid("speculative_config", message));
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
mod tests;
