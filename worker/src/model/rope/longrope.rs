//! `longrope` (LongRoPE): every frequency divided by its own rescale factor, from `short_factor`
//! or `long_factor`; cos and sin multiplied by `attention_factor` (by default
//! `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`, with `factor` defaulting to
//! `max_position_embeddings / original_max_position_embeddings`). Which list applies is fixed by
//! `max_model_len`, as in vLLM: `long_factor` when it exceeds `original_max_position_embeddings`
//! (see the module contract in `rope/mod.rs`).

use std::sync::Arc;

use super::{RopeInputs, RopeParams, RopeScaling};
use crate::Result;

#[derive(Debug)]
struct LongRope {
    short_factor: Vec<f64>,
    long_factor: Vec<f64>,
    original_max_position_embeddings: usize,
    attention_factor: f64,
}

pub(super) fn parse(p: &RopeParams<'_>) -> Result<Arc<dyn RopeScaling>> {
    let original = p.original_max_position_embeddings()?;
    let factor = match p.number("factor")? {
        Some(f) => p.check_positive("factor", f)?,
        None => p.max_position_embeddings as f64 / original as f64,
    };
    let attention_factor = match p.number("attention_factor")? {
        Some(a) => p.check_positive("attention_factor", a)?,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(Arc::new(LongRope {
        short_factor: p.per_frequency("short_factor")?,
        long_factor: p.per_frequency("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    }))
}

impl LongRope {
    /// The rescale factors a server of `max_model_len` uses for every sequence.
    fn factors(&self, max_model_len: usize) -> &[f64] {
        if max_model_len > self.original_max_position_embeddings { &self.long_factor } else { &self.short_factor }
    }
}

impl RopeScaling for LongRope {
    fn name(&self) -> &'static str {
        "longrope"
    }

    fn apply(&self, inputs: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        for (f, d) in inv_freq.iter_mut().zip(self.factors(inputs.max_model_len)) {
            *f /= d;
        }
        self.attention_factor
    }
}
