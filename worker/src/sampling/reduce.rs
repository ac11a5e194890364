//! Reducing logits rows where they are computed (on the GPU), so a step copies back a token or a
//! few candidates per sequence instead of a whole vocabulary row.
//!
//! Contract:
//! - The engine asks each sequence's [`SequenceSampler`](super::SequenceSampler) for a
//!   [`RowPlan`] (`plan_row`) and hands the plans to `Model::forward_reduced`. A model that cannot
//!   reduce (the CPU path) returns every row in full; the GPU model applies the plan's
//!   [`TokenEdit`]s to the row in place and reduces it as [`Reduction`] says.
//! - A reduced row is what `SequenceSampler::sample` would compute from the full row, exactly:
//!   the edits are the sampler's penalties, `logit_bias` and suppression merged per token, done
//!   with the same IEEE operations in the same order; [`Reduction::Argmax`] is the sanitized
//!   argmax with ties to the lowest id; [`Reduction::TopK`] is the `k` best sanitized values
//!   ranked like `row::top_k_into` (descending, ties to the lower id). The sampler then draws
//!   from them with the same random number it would have used (`sample_reduced`). No
//!   approximation is made: a row the device cannot reduce exactly (logprobs, top-p or min-p
//!   over the whole vocabulary, `top_k` above [`DEVICE_TOP_K_MAX`], repeated `logit_bias` ids,
//!   the first step of an `n > 1` request) is planned [`Reduction::Full`] and sampled on the host.
//! - A structured-output mask ([`RowPlan::mask`]) rides along a reduced row: the device treats a
//!   masked id as `-inf` while it reduces (no row is copied for it); `Full` rows are masked by the
//!   host sampler.
//! - [`reduce_row`] is the CPU reference of the device kernel (tests compare the two).

use std::ops::Range;

use super::row::{argmax, top_k_into};
use crate::grammar::{TokenMask, apply_mask};

/// The largest `top_k` reduced on the device (the kernel keeps its candidates in shared memory).
pub const DEVICE_TOP_K_MAX: usize = 64;

/// What the engine needs of one logits row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The whole row, unprocessed (the host samples it).
    Full,
    /// The argmax of the edited row (greedy sampling).
    Argmax,
    /// The `k` best (id, value) pairs of the edited row, `1 <= k <= DEVICE_TOP_K_MAX`.
    TopK(usize),
}

/// Every change the sampler makes to one token's logit before choosing, in its order:
/// `x = x > 0 ? x / repetition : x * repetition` (when `repetition` is set), `x -= subtract`,
/// `x += bias`, then `x = -inf` when `suppress`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenEdit {
    pub token: u32,
    pub repetition: Option<f32>,
    pub subtract: Option<f32>,
    pub bias: Option<f32>,
    pub suppress: bool,
}

impl TokenEdit {
    pub fn new(token: u32) -> TokenEdit {
        TokenEdit { token, repetition: None, subtract: None, bias: None, suppress: false }
    }

    /// The edit applied to one value (the device does the same operations).
    pub fn apply(&self, x: f32) -> f32 {
        let mut x = x;
        if let Some(rep) = self.repetition {
            x = if x > 0.0 { x / rep } else { x * rep };
        }
        if let Some(sub) = self.subtract {
            x -= sub;
        }
        if let Some(bias) = self.bias {
            x += bias;
        }
        if self.suppress { f32::NEG_INFINITY } else { x }
    }
}

/// One row's plan: the edits (one per token, distinct tokens), the structured-output mask and
/// the reduction.
#[derive(Clone, Debug, PartialEq)]
pub struct RowPlan {
    pub reduction: Reduction,
    pub edits: Vec<TokenEdit>,
    /// Ids whose bit is clear count as `-inf` (set only on reduced rows; a `Full` row is masked
    /// on the host). The device waits for it only when it reduces, after the layers are queued.
    pub mask: Option<TokenMask>,
}

impl RowPlan {
    /// The whole row back, untouched.
    pub fn full() -> RowPlan {
        RowPlan { reduction: Reduction::Full, edits: Vec::new(), mask: None }
    }
}

/// One row as the model returned it.
#[derive(Clone, Debug, PartialEq)]
pub enum RowResult {
    /// The whole row: `ReducedRows::logits[range]`.
    Full(Range<usize>),
    /// The argmax, `None` when every edited value is NaN or `-inf`.
    Token(Option<u32>),
    /// The candidates: `ReducedRows::candidates[range]`, ranked best first.
    TopK(Range<usize>),
}

/// A step's rows, one [`RowResult`] per logits row of the batch, in order.
#[derive(Clone, Debug, Default)]
pub struct ReducedRows {
    pub logits: Vec<f32>,
    pub candidates: Vec<(u32, f32)>,
    pub rows: Vec<RowResult>,
}

/// A reduced row as the sampler takes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduced<'a> {
    Token(Option<u32>),
    TopK(&'a [(u32, f32)]),
}

impl ReducedRows {
    pub fn clear(&mut self) {
        self.logits.clear();
        self.candidates.clear();
        self.rows.clear();
    }

    /// Every row in full: `logits` holds `rows` rows of `vocab` values.
    pub fn set_full(&mut self, logits: &[f32], vocab: usize) {
        self.clear();
        self.logits.extend_from_slice(logits);
        let rows = logits.len().checked_div(vocab).unwrap_or(0);
        self.rows.extend((0..rows).map(|r| RowResult::Full(r * vocab..(r + 1) * vocab)));
    }
}

/// The CPU reference of the device reduction: applies `plan`'s edits to `row` in place, reduces
/// it and appends the result to `out` (a `Full` row is copied untouched).
pub fn reduce_row(row: &mut [f32], plan: &RowPlan, out: &mut ReducedRows) {
    if plan.reduction == Reduction::Full {
        let start = out.logits.len();
        out.logits.extend_from_slice(row);
        out.rows.push(RowResult::Full(start..out.logits.len()));
        return;
    }
    for edit in &plan.edits {
        if let Some(x) = row.get_mut(edit.token as usize) {
            *x = edit.apply(*x);
        }
    }
    // After the edits, as the sampler's `-inf` suppression; -inf absorbs every edit, so the order
    // does not change the result.
    if let Some(mask) = &plan.mask {
        mask.with_words(|words| apply_mask(row, words));
    }
    match plan.reduction {
        Reduction::TopK(k) => {
            let mut kept = Vec::new();
            top_k_into(row, k.min(row.len()), &mut kept);
            let start = out.candidates.len();
            out.candidates.extend_from_slice(&kept);
            out.rows.push(RowResult::TopK(start..out.candidates.len()));
        }
        _ => out.rows.push(RowResult::Token(argmax(row).map(|i| i as u32))),
    }
}

#[cfg(test)]
#[path = "reduce_tests.rs"]
mod tests;
