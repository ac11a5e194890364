//! Launch wrapper of `sample.cu`: the sampler's row reductions (`sampling::reduce`) on the
//! device, over the step's f32 logits `[rows, vocab]`. The plans travel in the step's packed
//! upload ([`pack_plans`]); the structured-output masks of the reduced rows in a second, small
//! upload made once the layers are queued ([`pack_masks`]: the masks are computed on the host
//! while the device runs the layers, and waited for only then); the results come back in one
//! small copy ([`unpack`]).

use candle_core::{DType, Tensor};

use super::pack::{HostPack, Section};
use super::{CudaKernels, alloc_tensor, device_ptr, grid, int};
use crate::grammar::{TokenMask, mask_words};
use crate::sampling::reduce::{DEVICE_TOP_K_MAX, ReducedRows, Reduction, RowPlan, RowResult};
use crate::{Result, WorkerError};

/// u32 words per row of the kernel's output: the token, then `TOPK_MAX` ids and values.
pub const OUT_STRIDE: usize = 1 + 2 * DEVICE_TOP_K_MAX;
/// Threads per block; must match `THREADS` in sample.cu.
const THREADS: u32 = 1024;
/// What the kernel writes when every value of a row is `-inf`.
const NO_TOKEN: u32 = u32::MAX;
/// A row's mask slot when it has no mask.
const NO_MASK: u32 = u32::MAX;

/// Where the plans lie in the step's pack.
#[derive(Clone, Copy, Debug)]
pub struct PackedPlans {
    desc: Section,
    edits: Section,
}

/// Whether the kernel applies `plan`'s mask (reduced rows only; `Full` rows are masked on the host).
fn device_masked(plan: &RowPlan) -> bool {
    plan.reduction != Reduction::Full && plan.mask.is_some()
}

/// Packs one descriptor per row (mode, k, first edit, edit count, mask slot) and the edits
/// (token, flags, repetition, subtract, bias as f32 bits) into `pack`. Mask slots number the
/// masked reduced rows in row order, as [`pack_masks`] lays their masks out.
pub fn pack_plans(pack: &mut HostPack, plans: &[RowPlan]) -> PackedPlans {
    let mut first = 0u32;
    let mut slot = 0u32;
    let desc = pack.push(plans.iter().flat_map(|p| {
        let (mode, k) = match p.reduction {
            Reduction::Full => (0, 0),
            Reduction::Argmax => (1, 0),
            Reduction::TopK(k) => (2, k.min(DEVICE_TOP_K_MAX) as u32),
        };
        let count = if mode == 0 { 0 } else { p.edits.len() as u32 };
        let mask = if device_masked(p) {
            slot += 1;
            slot - 1
        } else {
            NO_MASK
        };
        let row = [mode, k, first, count, mask];
        first += count;
        row
    }));
    let edits =
        pack.push(plans.iter().filter(|p| p.reduction != Reduction::Full).flat_map(|p| p.edits.iter()).flat_map(|e| {
            let flags = u32::from(e.repetition.is_some())
                | u32::from(e.subtract.is_some()) << 1
                | u32::from(e.bias.is_some()) << 2
                | u32::from(e.suppress) << 3;
            let bits = |v: Option<f32>| v.unwrap_or(0.0).to_bits();
            [e.token, flags, bits(e.repetition), bits(e.subtract), bits(e.bias)]
        }));
    PackedPlans { desc, edits }
}

/// Packs the masks of the masked reduced rows, in row order, `mask_words(vocab)` words each
/// (waiting for masks still being computed); `None` when no reduced row has one.
pub fn pack_masks(pack: &mut HostPack, plans: &[RowPlan], vocab: usize) -> Option<Section> {
    let words = mask_words(vocab);
    let masks: Vec<&TokenMask> = plans.iter().filter(|p| device_masked(p)).filter_map(|p| p.mask.as_ref()).collect();
    if masks.is_empty() {
        return None;
    }
    pack.clear();
    let section = pack.push(
        masks
            .iter()
            .flat_map(|m| m.with_words(|w| (0..words).map(|i| w.get(i).copied().unwrap_or(0)).collect::<Vec<u32>>())),
    );
    Some(section)
}

impl CudaKernels {
    /// Applies each row's edits to `logits` (`[rows, vocab]` f32, modified in place) and reduces
    /// the rows whose plan says so, reading masked ids as `-inf`; `desc` and `edits` are the
    /// device addresses of [`pack_plans`]'s sections, `masks` that of [`pack_masks`]'s (0 when it
    /// packed none). Returns `rows * OUT_STRIDE` u32 (read them with [`unpack`]).
    pub fn reduce_rows(&self, logits: &Tensor, desc: u64, edits: u64, masks: u64) -> Result<Tensor> {
        let (rows, vocab) =
            logits.dims2().map_err(|e| WorkerError::Engine(format!("cuda reduce_rows: logits: {e}")))?;
        if logits.dtype() != DType::F32 || !logits.is_contiguous() {
            return Err(WorkerError::Engine("cuda reduce_rows: logits must be contiguous f32".into()));
        }
        let out = alloc_tensor(&self.device, (rows * OUT_STRIDE).into(), DType::U32)?;
        if rows > 0 {
            // SAFETY: logits hold rows * vocab f32; desc holds 5 u32 per row whose edit ranges
            // lie inside `edits` and whose mask slots lie inside `masks`, mask_words(vocab) u32
            // each (pack_plans and pack_masks build them from the same plans); out holds
            // rows * OUT_STRIDE u32.
            let words = int("mask_words", mask_words(vocab))?;
            launch!(self, &self.reduce_rows, grid((rows as u32, 1, 1), THREADS);
                device_ptr(logits)?, int("vocab", vocab)?, desc, edits, masks, words, device_ptr(&out)?)?;
        }
        Ok(out)
    }
}

impl PackedPlans {
    pub fn desc(&self) -> Section {
        self.desc
    }

    pub fn edits(&self) -> Section {
        self.edits
    }
}

/// Turns the kernel's output into `out.rows`, in row order: reduced rows from `words`, and
/// the `Full` rows as consecutive `vocab`-long ranges of `out.logits` (filled by the caller, in
/// the same order).
pub fn unpack(words: &[u32], plans: &[RowPlan], vocab: usize, out: &mut ReducedRows) -> Result<()> {
    if words.len() < plans.len() * OUT_STRIDE {
        return Err(WorkerError::Engine(format!("cuda reduce_rows: {} words for {} rows", words.len(), plans.len())));
    }
    let mut full = 0;
    for (plan, w) in plans.iter().zip(words.chunks_exact(OUT_STRIDE)) {
        let row = match plan.reduction {
            Reduction::Full => {
                full += 1;
                RowResult::Full((full - 1) * vocab..full * vocab)
            }
            Reduction::Argmax => RowResult::Token((w[0] != NO_TOKEN).then_some(w[0])),
            Reduction::TopK(k) => {
                let k = k.min(DEVICE_TOP_K_MAX).min(vocab);
                let start = out.candidates.len();
                let ids = &w[1..1 + k];
                let values = &w[1 + DEVICE_TOP_K_MAX..1 + DEVICE_TOP_K_MAX + k];
                out.candidates.extend(ids.iter().zip(values).map(|(&id, &v)| (id, f32::from_bits(v))));
                RowResult::TopK(start..out.candidates.len())
            }
        };
        out.rows.push(row);
    }
    Ok(())
}
