//! Per-frequency divisors as GGUF files store them (the `rope_freqs.weight` tensor llama.cpp's
//! converter writes for Llama-3.1's `llama3` scaling): frequency `i` divided by `factors[i]`,
//! missing entries counting as 1. Not a `rope_type`: only GGUF files produce it.

use super::{RopeInputs, RopeScaling};

#[derive(Debug)]
pub struct FreqFactors(pub Vec<f32>);

impl RopeScaling for FreqFactors {
    fn name(&self) -> &'static str {
        "rope_freqs"
    }

    fn apply(&self, _: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        for (f, &d) in inv_freq.iter_mut().zip(&self.0) {
            *f /= d as f64;
        }
        1.0
    }
}
