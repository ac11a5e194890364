//! `llama3` (Llama-3.1): wavelengths shorter than `original_max_position_embeddings /
//! high_freq_factor` keep their frequency, those longer than `original_max_position_embeddings /
//! low_freq_factor` are divided by `factor`, and the band between blends the two linearly in
//! `original_max_position_embeddings / wavelength`.

use std::sync::Arc;

use super::{RopeInputs, RopeParams, RopeScaling};
use crate::{Result, WorkerError};

#[derive(Debug)]
struct Llama3 {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
}

pub(super) fn parse(p: &RopeParams<'_>) -> Result<Arc<dyn RopeScaling>> {
    let s = Llama3 {
        factor: p.positive("factor")?,
        low_freq_factor: p.positive("low_freq_factor")?,
        high_freq_factor: p.positive("high_freq_factor")?,
        original_max_position_embeddings: p.original_max_position_embeddings()?,
    };
    if s.high_freq_factor <= s.low_freq_factor {
        return Err(WorkerError::UnsupportedConfig {
            key: p.key("high_freq_factor"),
            value: s.high_freq_factor.to_string(),
            reason: format!("must exceed low_freq_factor ({})", s.low_freq_factor),
        });
    }
    Ok(Arc::new(s))
}

impl RopeScaling for Llama3 {
    fn name(&self) -> &'static str {
        "llama3"
    }

    fn apply(&self, _: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        let (low, high) = (self.low_freq_factor, self.high_freq_factor);
        let old_len = self.original_max_position_embeddings as f64;
        let (low_freq_wavelen, high_freq_wavelen) = (old_len / low, old_len / high);
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen > low_freq_wavelen {
                *f /= self.factor;
            } else if wavelen >= high_freq_wavelen {
                let smooth = (old_len / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / self.factor + smooth * *f;
            }
        }
        1.0
    }
}
