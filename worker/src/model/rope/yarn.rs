//! `yarn` (YaRN): frequencies that turn fewer than `beta_slow` times over
//! `original_max_position_embeddings` positions are divided by `factor` (interpolated), those that
//! turn more than `beta_fast` times are kept (extrapolated), with a linear ramp over the dimensions
//! in between; cos and sin are multiplied by `attention_factor` (by default `0.1 ln(factor) + 1`,
//! or the ratio of that with `mscale` and `mscale_all_dim` when both are set).

use std::f64::consts::PI;
use std::sync::Arc;

use super::{RopeInputs, RopeParams, RopeScaling};
use crate::Result;

#[derive(Debug)]
struct Yarn {
    factor: f64,
    original_max_position_embeddings: usize,
    beta_fast: f64,
    beta_slow: f64,
    /// Round the ramp's ends outwards to whole dimensions (transformers' default).
    truncate: bool,
    attention_factor: f64,
}

pub(super) fn parse(p: &RopeParams<'_>) -> Result<Arc<dyn RopeScaling>> {
    let original = p.original_max_position_embeddings()?;
    // transformers requires the key; an explicit null means the ratio of the two lengths.
    if !p.present("factor") {
        p.required("factor")?;
    }
    let factor = match p.number("factor")? {
        Some(f) => p.check_positive("factor", f)?,
        None => p.max_position_embeddings as f64 / original as f64,
    };
    let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let attention_factor = match (p.number("attention_factor")?, p.number("mscale")?, p.number("mscale_all_dim")?) {
        (Some(a), _, _) => p.check_positive("attention_factor", a)?,
        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
        _ => mscale(factor, 1.0),
    };
    // transformers: `beta_fast or 32`, `beta_slow or 1` (a zero counts as unset).
    let or = |x: Option<f64>, default: f64| x.filter(|&v| v != 0.0).unwrap_or(default);
    Ok(Arc::new(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: or(p.number("beta_fast")?, 32.0),
        beta_slow: or(p.number("beta_slow")?, 1.0),
        truncate: p.boolean("truncate")?.unwrap_or(true),
        attention_factor,
    }))
}

impl Yarn {
    /// The (fractional) dimension whose frequency turns `rotations` times over the original context.
    fn correction_dim(&self, rotations: f64, inputs: &RopeInputs) -> f64 {
        let dim = inputs.dim as f64;
        dim * (self.original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * inputs.theta.ln())
    }
}

impl RopeScaling for Yarn {
    fn name(&self) -> &'static str {
        "yarn"
    }

    fn apply(&self, inputs: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        let (mut low, mut high) =
            (self.correction_dim(self.beta_fast, inputs), self.correction_dim(self.beta_slow, inputs));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(inputs.dim as f64 - 1.0));
        if low == high {
            high += 0.001;
        }
        for (i, f) in inv_freq.iter_mut().enumerate() {
            // 0 below `low` (keep the frequency), 1 above `high` (divide it by the factor).
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            *f = ramp * (*f / self.factor) + (1.0 - ramp) * *f;
        }
        self.attention_factor
    }
}
