//! Speculative decoding (issue 18): proposing tokens cheaply and letting the target model verify
//! several of them in one forward pass.
//!
//! What this module owns: the proposers (`ngram`: prompt lookup; `draft_model`: a small model's
//! greedy continuation) for vLLM's
//! `speculative_config` (`lumen_proto::speculative`, where the config and its checks live, as
//! the head checks it too: `method`, `num_speculative_tokens`, `prompt_lookup_min` /
//! `prompt_lookup_max`, `disable_by_batch_size`). The
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
//! distribution, and greedy output is identical to non-speculative decoding. The draft model
//! proposes its argmax, a function of the tokens, so the same rule holds for it. Drafting from
//! the draft's own distribution q would need the general rule (accept with min(1, p/q), on
//! rejection draw from (p - q)+) and q's rows from the proposer; EAGLE-style heads propose from
//! the target's hidden states the same way as the draft model (see docs/architecture.md).
//!
//! Invariants: a draft never runs a sequence past `max_tokens` or `max_model_len`; at most
//! [`MAX_SPECULATIVE_TOKENS`] tokens a step and n-grams of at most [`MAX_LOOKUP`] tokens, so a
//! config cannot make a step or a lookup unbounded.

pub mod adaptive;
pub mod draft_model;
pub mod ngram;

pub use lumen_proto::speculative::{MAX_LOOKUP, MAX_SPECULATIVE_TOKENS, SpecMethod, SpecSettings, SpeculativeConfig};

use crate::WorkerError;

/// The settings of `config`, or the error the engine reports for it.
pub fn settings(config: &SpeculativeConfig) -> Result<SpecSettings, WorkerError> {
    config.settings().map_err(|message| WorkerError::invalid("speculative_config", message))
}

#[cfg(test)]
mod tests;
