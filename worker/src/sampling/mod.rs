//! Choosing the next token: logits processing (penalties, bias, temperature, top-k/top-p/min-p),
//! seeded random sampling and log-probabilities.
//!
//! The engine keeps one [`SequenceSampler`] per sequence (built from the request's
//! [`SamplingParams`]), calls [`SequenceSampler::sample`] once per step on that sequence's row of
//! logits and [`SequenceSampler::record`] with every accepted token. `n > 1` choices come from
//! [`SequenceSampler::fork`] with the choice index as the seed stream. All of it runs on the CPU
//! over `f32` logits; the row is consumed (modified in place), unless the model reduced the row
//! on its device first ([`reduce`]: the same result from a token or a few candidates).

mod params;
pub mod reduce;
pub(crate) mod row;
mod sampler;
mod truncate;

pub use params::{
    MAX_LOGIT_BIAS_ENTRIES, MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams, StopParams,
};
pub use sampler::{Sampled, SequenceSampler, ranked_logprob};
