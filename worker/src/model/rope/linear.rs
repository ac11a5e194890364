//! `linear` (position interpolation): every frequency divided by `factor`, which is the same as
//! dividing positions by it.

use std::sync::Arc;

use super::{RopeInputs, RopeParams, RopeScaling};
use crate::Result;

#[derive(Debug)]
struct Linear {
    factor: f64,
}

pub(super) fn parse(p: &RopeParams<'_>) -> Result<Arc<dyn RopeScaling>> {
    Ok(Arc::new(Linear { factor: p.positive("factor")? }))
}

impl RopeScaling for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn apply(&self, _: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        inv_freq.iter_mut().for_each(|f| *f /= self.factor);
        1.0
    }
}
