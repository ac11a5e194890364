//! A step's results back to the host: the device's row reduction (one token or k candidates per
//! row) and, gathered into one copy, the rows that must be read whole. These copies are the
//! step's only synchronisation with the device.

use candle_core::{Device, Tensor};

use crate::Result;
use crate::kernels::cuda::gpu_error;
use crate::kernels::cuda::sample as reduce_kernel;
use crate::sampling::reduce::{ReducedRows, Reduction, RowPlan, RowResult};

/// Copies the step's rows to the host: the reduction's output when there is one, and the rows
/// planned `Full` (all rows without plans), gathered on `device` into one copy.
pub(super) fn read_rows(
    device: &Device,
    vocab: usize,
    logits: &Tensor,
    reduced: Option<&Tensor>,
    plans: &[RowPlan],
    out: &mut ReducedRows,
) -> Result<()> {
    let read =
        |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| gpu_error("reading logits", e));
    let Some(reduced) = reduced else {
        out.logits = read(logits)?;
        out.rows.extend((0..out.logits.len() / vocab).map(|r| RowResult::Full(r * vocab..(r + 1) * vocab)));
        return Ok(());
    };
    let words = reduced.to_vec1::<u32>().map_err(|e| gpu_error("reading reduced rows", e))?;
    reduce_kernel::unpack(&words, plans, vocab, out)?;
    let full: Vec<u32> =
        plans.iter().enumerate().filter(|(_, p)| p.reduction == Reduction::Full).map(|(i, _)| i as u32).collect();
    if !full.is_empty() {
        let ids = Tensor::from_slice(&full, full.len(), device).map_err(|e| gpu_error("uploading row ids", e))?;
        let selected = logits.index_select(&ids, 0).map_err(|e| gpu_error("gathering rows", e))?;
        out.logits = read(&selected)?;
    }
    Ok(())
}
