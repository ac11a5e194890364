//! Paged attention on the GPU: the host-side plan (tiles of query tokens, the split over the
//! context) and the launches of `attention_mma.cu` (tensor cores, bf16) and `attention.cu`
//! (CUDA cores: f32, and bf16 with `LUMEN_CUDA_ATTENTION=simt`).
//!
//! A step's sequences form two parts, each one launch: those with one query token (decode) and
//! the rest (prompt chunks). A tile is up to `rows` (token, query head) rows of one sequence
//! sharing one KV head, so the K/V of each chunk of positions is read once for all of them: the
//! decode kernels take one token's heads, the prefill kernels several tokens. When a part's tiles
//! alone would leave most multiprocessors idle (decode of few sequences), the context is split
//! across CTAs and the last CTA of each split group merges the partial softmax sums (a second
//! kernel does when `LUMEN_CUDA_SPLIT_MERGE=launch`, the earlier scheme). Unlike the CPU
//! kernels, results may therefore differ in the last bits with the batch's composition.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};

use super::pack::{DevicePack, HostPack, Section};
use super::{CudaKernels, device_ptr, gpu_error, grid, int};
use crate::model::batch::BatchSeq;
use crate::{Result, WorkerError};

const THREADS: u32 = 128;
/// Pipeline stages of the tensor-core kernels; must match `STAGES` in attention_mma.cu.
const MMA_STAGES: usize = 3;

/// Which kernels compute attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// `attention.cu`: scalar f32 arithmetic (any element type).
    Simt,
    /// `attention_mma.cu`: bf16 tensor cores (`mma.m16n8k16`), K/V staged by `cp.async`.
    TensorCore,
}

/// The tile shape of one kernel: (token, head) rows per CTA and positions per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelShape {
    pub rows: usize,
    pub chunk: usize,
}

impl AttentionKind {
    /// For a dtype: tensor cores for bf16 unless `LUMEN_CUDA_ATTENTION=simt`; f32 always SIMT.
    pub fn for_dtype(dtype: DType) -> AttentionKind {
        match (dtype, std::env::var("LUMEN_CUDA_ATTENTION").as_deref()) {
            (DType::BF16, Ok("simt")) => AttentionKind::Simt,
            (DType::BF16, _) => AttentionKind::TensorCore,
            _ => AttentionKind::Simt,
        }
    }

    /// The shape of the decode or the prefill kernel (must match the `.cu` files: attention.cu's
    /// DECODE_ROWS / TILE_ROWS and CHUNK; 16 x WARPS_M rows and CHUNK in attention_mma.cu).
    pub fn shape(self, decode: bool) -> KernelShape {
        match (self, decode) {
            (AttentionKind::Simt, true) => KernelShape { rows: 4, chunk: 32 },
            (AttentionKind::Simt, false) => KernelShape { rows: 16, chunk: 32 },
            (AttentionKind::TensorCore, true) => KernelShape { rows: 16, chunk: 64 },
            (AttentionKind::TensorCore, false) => KernelShape { rows: 64, chunk: 64 },
        }
    }

    /// Dynamic shared memory of one CTA (the tensor-core kernels stage K and V, `MMA_STAGES`
    /// chunks deep, in rows padded by 16 bytes).
    pub fn shared_bytes(self, head_dim: usize) -> usize {
        match self {
            AttentionKind::Simt => 0,
            AttentionKind::TensorCore => MMA_STAGES * 2 * 64 * (head_dim + 8) * 2,
        }
    }
}

/// What a plan needs to know of the kernels that will run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSetup {
    pub kind: AttentionKind,
    /// CTAs a launch aims for: a part with fewer tiles splits the context until it has about as
    /// many (the decode kernel's resident CTAs per multiprocessor times the multiprocessors, so
    /// a split decode fills the GPU in one wave).
    pub split_ctas: usize,
}

/// One launch of a plan: the tiles of its decode or its prefill sequences.
#[derive(Clone, Debug)]
struct Part {
    decode: bool,
    tiles: Section,
    num_tiles: usize,
    heads_per_cta: usize,
    shape: KernelShape,
    splits: usize,
    chunks_per_split: usize,
}

/// The attention work of one step, with its descriptors in the step's [`HostPack`].
#[derive(Clone, Debug)]
pub struct AttentionPlan {
    seqs: Section,
    tables: Section,
    num_tokens: usize,
    heads: usize,
    kv_heads: usize,
    kind: AttentionKind,
    /// The decode part first, then the prefill part; a part without sequences is left out.
    parts: Vec<Part>,
}

impl AttentionPlan {
    /// Plans attention for `seqs` (the step's sequences, as the engine packed them) with
    /// `heads` query heads over `kv_heads` KV heads, for the kernels of `setup`.
    pub fn new(
        pack: &mut HostPack,
        seqs: &[BatchSeq],
        heads: usize,
        kv_heads: usize,
        setup: AttentionSetup,
    ) -> Result<Self> {
        let kind = setup.kind;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(WorkerError::ModelConfig(format!("{heads} heads do not group over {kv_heads} KV heads")));
        }
        let ratio = heads / kv_heads;
        let mut descriptors = Vec::new();
        let mut tables = Vec::new();
        for s in seqs {
            descriptors.extend([s.query_start, s.query_len, s.context_len, tables.len()].map(|v| v as u32));
            tables.extend_from_slice(&s.block_table);
        }
        let parts = [true, false]
            .into_iter()
            .filter_map(|decode| {
                let members = seqs.iter().enumerate().filter(|(_, s)| (s.query_len == 1) == decode);
                Part::plan(pack, members, decode, kind.shape(decode), ratio, kv_heads, setup.split_ctas)
            })
            .collect();
        Ok(AttentionPlan {
            seqs: pack.push(descriptors),
            tables: pack.push(tables),
            num_tokens: seqs.iter().map(|s| s.query_len).sum(),
            heads,
            kv_heads,
            kind,
            parts,
        })
    }

    /// Most CTAs along the context of any part (1: no split).
    pub fn splits(&self) -> usize {
        self.parts.iter().map(|p| p.splits).max().unwrap_or(1)
    }

    /// Which parts run: (decode, tiles) for each launch, the decode part first.
    pub fn launches(&self) -> Vec<(bool, usize)> {
        self.parts.iter().map(|p| (p.decode, p.num_tiles)).collect()
    }

    /// The kernels this plan was made for.
    pub fn kind(&self) -> AttentionKind {
        self.kind
    }
}

impl Part {
    /// Tiles the sequences `members` (index in the step, sequence) for a kernel of `shape`,
    /// the tiles with the longest spans first (so the longest CTAs do not start last); `None`
    /// without members.
    fn plan<'a>(
        pack: &mut HostPack,
        members: impl Iterator<Item = (usize, &'a BatchSeq)>,
        decode: bool,
        shape: KernelShape,
        ratio: usize,
        kv_heads: usize,
        split_ctas: usize,
    ) -> Option<Part> {
        let heads_per_cta = (1..=ratio.min(shape.rows)).rev().find(|d| ratio.is_multiple_of(*d)).unwrap_or(1);
        let tokens_per_tile = shape.rows / heads_per_cta;
        // (span, tile): the positions the tile's last token sees.
        let mut tiles: Vec<(usize, [u32; 4])> = Vec::new();
        for (i, s) in members {
            for first in (0..s.query_len).step_by(tokens_per_tile) {
                let count = tokens_per_tile.min(s.query_len - first);
                let span = s.context_len - s.query_len + first + count;
                tiles.push((span, [i, first, count, 0].map(|v| v as u32)));
            }
        }
        if tiles.is_empty() {
            return None;
        }
        tiles.sort_by_key(|&(span, _)| std::cmp::Reverse(span));
        let max_chunks = tiles[0].0.div_ceil(shape.chunk);
        let num_tiles = tiles.len();
        let ctas = num_tiles * kv_heads * (ratio / heads_per_cta);
        let splits = (split_ctas / ctas.max(1)).clamp(1, max_chunks.max(1));
        let chunks_per_split = max_chunks.div_ceil(splits).max(1);
        let splits = max_chunks.div_ceil(chunks_per_split).max(1);
        let tiles = pack.push(tiles.into_iter().flat_map(|(_, t)| t));
        Some(Part { decode, tiles, num_tiles, heads_per_cta, shape, splits, chunks_per_split })
    }
}

const ATTENTION_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin"));
const ATTENTION_MMA_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention_mma.fatbin"));

/// The kernels of one [`AttentionKind`] for one element type and head size.
pub(crate) struct AttentionKernels {
    pub kind: AttentionKind,
    decode: CudaFunction,
    decode_combine: CudaFunction,
    prefill: CudaFunction,
    prefill_combine: CudaFunction,
    /// Dynamic shared memory per CTA.
    shared_bytes: u32,
    /// CTAs of the decode kernel resident on one multiprocessor at once.
    pub decode_ctas_per_sm: usize,
}

impl AttentionKernels {
    /// Loads `kind`'s kernels for `suffix` (`bf16_d128`, ...) with `load` (a fatbin to a module);
    /// raises the dynamic shared memory limit of those that need more than the default 48 KiB.
    pub fn load(
        kind: AttentionKind,
        load: &dyn Fn(&[u8]) -> Result<Arc<CudaModule>>,
        suffix: &str,
        head_dim: usize,
    ) -> Result<AttentionKernels> {
        let shared_bytes = kind.shared_bytes(head_dim) as u32;
        let (module, prefix) = match kind {
            AttentionKind::Simt => (load(ATTENTION_FATBIN)?, "paged_attention"),
            AttentionKind::TensorCore => (load(ATTENTION_MMA_FATBIN)?, "paged_attention_mma_prefill"),
        };
        let decode_prefix = match kind {
            AttentionKind::Simt => "paged_attention_decode",
            AttentionKind::TensorCore => "paged_attention_mma_decode",
        };
        let func = |name: String, shared: u32| -> Result<CudaFunction> {
            let f = module.load_function(&name).map_err(|e| gpu_error(&format!("kernel {name}"), e))?;
            if shared > 0 {
                let attribute =
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                f.set_attribute(attribute, shared as i32)
                    .map_err(|e| gpu_error(&format!("kernel {name}: {shared} bytes of shared memory"), e))?;
            }
            Ok(f)
        };
        let decode = func(format!("{decode_prefix}_{suffix}"), shared_bytes)?;
        let resident = decode
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, shared_bytes as usize, None)
            .map_err(|e| gpu_error("the attention kernel's occupancy", e))?;
        Ok(AttentionKernels {
            kind,
            decode,
            decode_ctas_per_sm: (resident as usize).max(1),
            decode_combine: func(format!("{decode_prefix}_{suffix}_combine"), 0)?,
            prefill: func(format!("{prefix}_{suffix}"), shared_bytes)?,
            prefill_combine: func(format!("{prefix}_{suffix}_combine"), 0)?,
            shared_bytes,
        })
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
        let a = &self.attention;
        if plan.kind != a.kind {
            return Err(WorkerError::Engine(format!(
                "cuda attention: a {:?} plan for {:?} kernels",
                plan.kind, a.kind
            )));
        }
        let ratio = plan.heads / plan.kv_heads;
        for part in &plan.parts {
            let groups = ratio / part.heads_per_cta;
            let grid_xy = (part.num_tiles as u32, (plan.kv_heads * groups) as u32);
            let partial_rows = part.num_tiles * plan.kv_heads * groups * part.splits * part.shape.rows;
            let (part_acc, part_ml) = if part.splits > 1 {
                let acc = self.alloc_of((partial_rows * self.head_dim,).into(), DType::F32)?;
                let ml = self.alloc_of((partial_rows * 2,).into(), DType::F32)?;
                (Some(acc), Some(ml))
            } else {
                (None, None)
            };
            let acc_ptr = part_acc.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
            let ml_ptr = part_ml.as_ref().map(device_ptr).transpose()?.unwrap_or(0);
            // The last split merges in the attention launch itself when there is a zeroed
            // counter for every (tile, head group); otherwise a second launch merges. Launches
            // run in stream order, so the parts share the counters.
            let merge_in_place =
                part.splits > 1 && self.merge_splits && (grid_xy.0 * grid_xy.1) as usize <= self.split_ctas;
            let counters = if merge_in_place { device_ptr(&self.split_counters)? } else { 0 };
            let (attention, combine) =
                if part.decode { (&a.decode, &a.decode_combine) } else { (&a.prefill, &a.prefill_combine) };
            let cfg = LaunchConfig {
                grid_dim: (grid_xy.0, grid_xy.1, part.splits as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: a.shared_bytes,
            };
            // SAFETY: the descriptors in `meta` were built by `plan` for these sequences (the
            // caller checked block tables and contexts against the cache); q/out rows are as
            // checked above; partial buffers hold every (tile, group, split, row) slot; the
            // kernel's dynamic shared memory limit was raised to `shared_bytes` at load.
            launch!(self, attention, cfg;
                device_ptr(&out)?, acc_ptr, ml_ptr, device_ptr(q)?, int("q_stride", width)?,
                int("out_stride", out_width)?, device_ptr(k_cache)?, device_ptr(v_cache)?,
                meta.ptr(part.tiles), meta.ptr(plan.seqs), meta.ptr(plan.tables), int("kv_heads", plan.kv_heads)?,
                int("ratio", ratio)?, int("heads_per_cta", part.heads_per_cta)?, int("block_size", block_size)?,
                int("chunks_per_split", part.chunks_per_split)?, scale, counters)?;
            if part.splits > 1 && !merge_in_place {
                // SAFETY: as above; the partials were all written by the launch before.
                launch!(self, combine, grid((grid_xy.0, grid_xy.1, 1), THREADS);
                    device_ptr(&out)?, acc_ptr, ml_ptr, int("out_stride", out_width)?, meta.ptr(part.tiles),
                    meta.ptr(plan.seqs), int("ratio", ratio)?, int("heads_per_cta", part.heads_per_cta)?,
                    int("splits", part.splits)?)?;
            }
        }
        Ok(out)
    }
}
