//! Paged attention on the GPU: the host-side plan (tiles of query tokens, the split over the
//! context) and the launches of `attention.cu`.
//!
//! A tile is up to [`ROWS`] (token, query head) rows of one sequence sharing one KV head, so the
//! K/V of each chunk of positions is read once for all of them. When the tiles alone would leave
//! most multiprocessors idle (decode of few sequences), the context is split across CTAs and the
//! last CTA of each split group merges the partial softmax sums (a second kernel does when
//! `LUMEN_CUDA_SPLIT_MERGE=launch`, the earlier scheme). Unlike the CPU kernels, results may
//! therefore differ in the last bits with the batch's composition.

use candle_core::{DType, Tensor};

use super::pack::{DevicePack, HostPack, Section};
use super::{CudaKernels, device_ptr, grid, int};
use crate::model::batch::BatchSeq;
use crate::{Result, WorkerError};

/// (token, head) rows per CTA of the general kernel; must match `TILE_ROWS` in attention.cu.
pub const ROWS: usize = 16;
/// Rows per CTA of the decode kernel (`paged_attention_decode_*`, for steps whose every
/// sequence has one query token): a quarter of the registers and shared memory per CTA for
/// the rows a decode tile has anyway, so more CTAs fit a multiprocessor; must match
/// `DECODE_ROWS` in attention.cu.
pub const DECODE_ROWS: usize = 4;
/// Positions per chunk; must match `CHUNK` in attention.cu.
pub const CHUNK: usize = 32;
const THREADS: u32 = 128;
/// CTAs per multiprocessor the split aims for (shared memory allows five).
pub const CTAS_PER_SM: usize = 4;

/// The attention work of one step, with its descriptors in the step's [`HostPack`].
#[derive(Clone, Debug)]
pub struct AttentionPlan {
    seqs: Section,
    tiles: Section,
    tables: Section,
    num_tiles: usize,
    num_tokens: usize,
    heads: usize,
    kv_heads: usize,
    heads_per_cta: usize,
    /// Rows per CTA: [`ROWS`], or [`DECODE_ROWS`] for the decode kernel.
    rows: usize,
    splits: usize,
    chunks_per_split: usize,
}

impl AttentionPlan {
    /// Plans attention for `seqs` (the step's sequences, as the engine packed them) with
    /// `heads` query heads over `kv_heads` KV heads, on a device of `num_sms` multiprocessors.
    pub fn new(pack: &mut HostPack, seqs: &[BatchSeq], heads: usize, kv_heads: usize, num_sms: usize) -> Result<Self> {
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(WorkerError::ModelConfig(format!("{heads} heads do not group over {kv_heads} KV heads")));
        }
        let ratio = heads / kv_heads;
        let decode = !seqs.is_empty() && seqs.iter().all(|s| s.query_len == 1);
        let rows = if decode { DECODE_ROWS } else { ROWS };
        let heads_per_cta = (1..=ratio.min(rows)).rev().find(|d| ratio.is_multiple_of(*d)).unwrap_or(1);
        let tokens_per_tile = rows / heads_per_cta;
        let mut descriptors = Vec::new();
        let mut tables = Vec::new();
        let mut tiles = Vec::new();
        let mut max_chunks = 0;
        for (i, s) in seqs.iter().enumerate() {
            descriptors.extend([s.query_start, s.query_len, s.context_len, tables.len()].map(|v| v as u32));
            tables.extend_from_slice(&s.block_table);
            for first in (0..s.query_len).step_by(tokens_per_tile) {
                let count = tokens_per_tile.min(s.query_len - first);
                let span = s.context_len - s.query_len + first + count;
                max_chunks = max_chunks.max(span.div_ceil(CHUNK));
                tiles.extend([i, first, count, 0].map(|v| v as u32));
            }
        }
        let num_tiles = tiles.len() / 4;
        let ctas = num_tiles * kv_heads * (ratio / heads_per_cta);
        let wanted = (CTAS_PER_SM * num_sms).div_ceil(ctas.max(1));
        let splits = wanted.clamp(1, max_chunks.max(1));
        let chunks_per_split = max_chunks.div_ceil(splits).max(1);
        let splits = max_chunks.div_ceil(chunks_per_split).max(1);
        Ok(AttentionPlan {
            seqs: pack.push(descriptors),
            tiles: pack.push(tiles),
            tables: pack.push(tables),
            num_tiles,
            num_tokens: seqs.iter().map(|s| s.query_len).sum(),
            heads,
            kv_heads,
            heads_per_cta,
            rows,
            splits,
            chunks_per_split,
        })
    }

    /// CTAs along the context (1: no split).
    pub fn splits(&self) -> usize {
        self.splits
    }

    /// Whether the decode kernel runs this plan.
    pub fn is_decode(&self) -> bool {
        self.rows == DECODE_ROWS
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads / self.heads_per_cta
    }
}

impl CudaKernels {
    /// Attention of every query token over its sequence's cache: `q` is `[tokens, width]` with
    /// the query heads at the start of each row (the fused QKV projection works as is); the
    /// caches already hold this step's K/V. Returns `[tokens, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        plan: &AttentionPlan,
        meta: &DevicePack,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        block_size: usize,
        scale: f32,
    ) -> Result<Tensor> {
        self.expect("q", q)?;
        self.expect("k_cache", k_cache)?;
        self.expect("v_cache", v_cache)?;
        let (tokens, width) = q.dims2().map_err(|e| WorkerError::Engine(format!("cuda kernel input `q`: {e}")))?;
        let out_width = plan.heads * self.head_dim;
        if tokens != plan.num_tokens || width < out_width {
            return Err(WorkerError::Engine(format!(
                "cuda attention: q {:?} for {} tokens of {} heads",
                q.dims(),
                plan.num_tokens,
                plan.heads
            )));
        }
        if !(width * self.dtype.size_in_bytes()).is_multiple_of(16) || !device_ptr(q)?.is_multiple_of(16) {
            return Err(WorkerError::Engine("cuda attention: q rows must be 16-byte aligned".into()));
        }
        let out = self.alloc((tokens, out_width))?;
        if plan.num_tiles == 0 {
            return Ok(out);
        }
        let groups = plan.groups();
        let grid_xy = (plan.num_tiles as u32, (plan.kv_heads * groups) as u32);
        let partial_rows = plan.num_tiles * plan.kv_heads * groups * plan.splits * plan.rows;
        let (part_acc, part_ml) = if plan.splits > 1 {
            let acc = self.alloc_of((partial_rows * self.head_dim,).into(), DType::F32)?;
            let ml = self.alloc_of((partial_rows * 2,).into(), DType::F32)?;
            (Some(acc), Some(ml))
        } else {
            (None, None)
        };
        let acc_ptr = part_acc.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
        let ml_ptr = part_ml.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
        let ratio = plan.heads / plan.kv_heads;
        // The last split merges in the attention launch itself when there is a zeroed counter
        // for every (tile, head group); otherwise a second launch merges.
        let merge_in_place = plan.splits > 1 && self.merge_splits && grid_xy.0 * grid_xy.1 <= self.split_counter_len;
        let counters = if merge_in_place { device_ptr(&self.split_counters)? } else { 0 };
        // SAFETY: the descriptors in `meta` were built by `plan` for these sequences (the caller
        // checked block tables and contexts against the cache); q/out rows are as checked above;
        // partial buffers hold every (tile, group, split, row) slot.
        let (attention, combine) = if plan.is_decode() {
            (&self.attention_decode, &self.attention_decode_combine)
        } else {
            (&self.attention, &self.attention_combine)
        };
        launch!(self, attention, grid((grid_xy.0, grid_xy.1, plan.splits as u32), THREADS);
            device_ptr(&out)?, acc_ptr, ml_ptr, device_ptr(q)?, int("q_stride", width)?,
            int("out_stride", out_width)?, device_ptr(k_cache)?, device_ptr(v_cache)?,
            meta.ptr(plan.tiles), meta.ptr(plan.seqs), meta.ptr(plan.tables), int("kv_heads", plan.kv_heads)?,
            int("ratio", ratio)?, int("heads_per_cta", plan.heads_per_cta)?, int("block_size", block_size)?,
            int("chunks_per_split", plan.chunks_per_split)?, scale, counters)?;
        if plan.splits > 1 && !merge_in_place {
            // SAFETY: as above; the partials were all written by the launch before.
            launch!(self, combine, grid((grid_xy.0, grid_xy.1, 1), THREADS);
                device_ptr(&out)?, acc_ptr, ml_ptr, int("out_stride", out_width)?, meta.ptr(plan.tiles),
                meta.ptr(plan.seqs), int("ratio", ratio)?, int("heads_per_cta", plan.heads_per_cta)?,
                int("splits", plan.splits)?)?;
        }
        Ok(out)
    }
}
