//! `dynamic` (NTK-aware scaling): a larger base, `theta * (factor * len / max_position_embeddings -
//! (factor - 1)) ^ (dim / (dim - 2))` for a sequence of `len` tokens. transformers evaluates it at
//! the current length (and not at all below `max_position_embeddings`); a KV cache cannot follow a
//! base that moves, so Lumen fixes `len = factor * max_position_embeddings` for every position, as
//! vLLM does (see the module contract in `rope/mod.rs`).

use std::sync::Arc;

use super::{RopeInputs, RopeParams, RopeScaling};
use crate::{Result, WorkerError};

#[derive(Debug)]
struct Dynamic {
    factor: f64,
}

pub(super) fn parse(p: &RopeParams<'_>) -> Result<Arc<dyn RopeScaling>> {
    let factor = p.positive("factor")?;
    if p.dim <= 2 {
        return Err(WorkerError::UnsupportedConfig {
            key: p.key("rope_type"),
            value: "\"dynamic\"".into(),
            reason: format!("NTK scaling needs a head_dim above 2, not {}", p.dim),
        });
    }
    Ok(Arc::new(Dynamic { factor }))
}

impl RopeScaling for Dynamic {
    fn name(&self) -> &'static str {
        "dynamic"
    }

    fn apply(&self, inputs: &RopeInputs, inv_freq: &mut [f64]) -> f64 {
        let max_pos = inputs.max_position_embeddings as f64;
        let len = self.factor * max_pos;
        let dim = inputs.dim as f64;
        let base = inputs.theta * (self.factor * len / max_pos - (self.factor - 1.0)).powf(dim / (dim - 2.0));
        for (i, f) in inv_freq.iter_mut().enumerate() {
            *f = base.powf(-2.0 * i as f64 / dim);
        }
        1.0
    }
}
