//! Choosing the next token: logits processing (penalties, bias, temperature, top-k/top-p/min-p),
//! seeded random sampling and log-probabilities.

mod params;

pub use params::{MAX_LOGIT_BIAS_ENTRIES, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_TOP_LOGPROBS, SamplingParams, StopParams};
