//! Paged attention on the GPU: the host-side plan (tiles of query tokens, the split over the
//! context); `kernels.rs` loads and launches `attention_mma.cu` (tensor cores, bf16) and
//! `attention.cu` (CUDA cores: f32, and bf16 with `LUMEN_CUDA_ATTENTION=simt`).
//!
//! A step's sequences form two parts, each one launch: those with one query token (decode) and
//! the rest (prompt chunks). A tile is up to `rows` (token, query head) rows of one sequence
//! sharing one KV head, so the K/V of each chunk of positions is read once for all of them: the
//! decode kernels take one token's heads, the prefill kernels several tokens. When a part's tiles
//! alone would leave most multiprocessors idle (decode of few sequences), the context is split
//! across CTAs and the last CTA of each split group merges the partial softmax sums (a second
//! kernel does when `LUMEN_CUDA_SPLIT_MERGE=launch`, the earlier scheme). Unlike the CPU
//! kernels, results may therefore differ in the last bits with the batch's composition.

mod kernels;

use candle_core::DType;

pub(crate) use self::kernels::AttentionKernels;
use super::pack::{HostPack, Section};
use crate::model::batch::BatchSeq;
use crate::{Result, WorkerError};

/// Pipeline stages of the tensor-core kernels; must match `DEFAULT_STAGES` in attention_mma.cu.
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

/// The kernels of a kind: decode (one query token per sequence) and prefill, whose tensor-core
/// instance also comes with tiles twice as tall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    Decode,
    Prefill,
    /// Tensor cores only: 128 rows per CTA (two 16-row tiles per warp share every K and V
    /// fragment), 32-position chunks.
    PrefillTall,
}

/// Which prefill tiles a tensor-core plan takes (`LUMEN_CUDA_PREFILL_TILES`: `64`, the
/// default; `128`; `auto`, the tall ones where they still give every multiprocessor its CTAs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillTiles {
    Short,
    Tall,
    Auto,
}

impl PrefillTiles {
    pub fn from_env() -> Result<PrefillTiles> {
        match std::env::var("LUMEN_CUDA_PREFILL_TILES").as_deref() {
            Err(_) | Ok("64") => Ok(PrefillTiles::Short),
            Ok("128") => Ok(PrefillTiles::Tall),
            Ok("auto") => Ok(PrefillTiles::Auto),
            Ok(other) => {
                Err(WorkerError::invalid("LUMEN_CUDA_PREFILL_TILES", format!("{other:?} is not 64, 128 or auto")))
            }
        }
    }
}

/// Which tensor-core decode kernel runs (`LUMEN_CUDA_DECODE_ATTENTION`): the same tiles, chunks
/// and shared memory, copying K/V differently (attention_mma.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// `block`: the CTA's threads copy each chunk together and meet at a barrier per chunk.
    Block,
    /// `l2`: as `block`, each copy asking L2 for the 256 bytes around it.
    L2,
    /// `warp`, the default: each warp copies and waits for its own positions alone (no barrier
    /// per chunk), with the L2 hint. On an H100, 1% more output at 256 streams than `block`
    /// (8,615 against 8,520 tok/s offline, three runs each), the same at 32.
    Warp,
    /// `warp2`: `warp` with two stages, so three CTAs fit a Hopper multiprocessor instead of
    /// two (alone: 86% of the read rate at 256 streams against 80%, 62% against 69% at 64 x 600;
    /// in the engine on an H100, offline 8,449 against 8,326 tok/s at 256 streams, 3,583
    /// against 3,629 at 32).
    Warp2,
    /// `auto`: `warp2` for a launch of at least two full waves of it (unsplit CTAs >= 2 x its
    /// resident CTAs x the multiprocessors: 792 on an H100, about 100 sequences of Llama-3.1-8B),
    /// where its third CTA per multiprocessor pays; `warp` below, where `warp2`'s last wave
    /// runs part-empty (the split policy follows `warp`). A captured decode graph keeps the
    /// kernel it was captured with (chosen for the graph's size).
    Auto,
}

impl DecodeKernel {
    pub fn from_env() -> Result<DecodeKernel> {
        match std::env::var("LUMEN_CUDA_DECODE_ATTENTION").as_deref() {
            Ok("block") => Ok(DecodeKernel::Block),
            Ok("l2") => Ok(DecodeKernel::L2),
            Err(_) | Ok("warp") => Ok(DecodeKernel::Warp),
            Ok("warp2") => Ok(DecodeKernel::Warp2),
            Ok("auto") => Ok(DecodeKernel::Auto),
            Ok(other) => Err(WorkerError::invalid(
                "LUMEN_CUDA_DECODE_ATTENTION",
                format!("{other:?} is not block, l2, warp, warp2 or auto"),
            )),
        }
    }

    /// Dynamic shared memory of one CTA: its K/V stages.
    pub fn shared_bytes(self, head_dim: usize) -> usize {
        let stages = if self == DecodeKernel::Warp2 { 2 } else { MMA_STAGES };
        mma_shared_bytes(stages, AttentionKind::TensorCore.shape(Tiles::Decode).chunk, 0, head_dim)
    }

    /// The kernel's name before `_bf16_d<D>` (`auto`'s first kernel: `warp`).
    pub fn prefix(self) -> &'static str {
        match self {
            DecodeKernel::Block => "paged_attention_mma_decode",
            DecodeKernel::L2 => "paged_attention_mma_decode_l2",
            DecodeKernel::Warp | DecodeKernel::Auto => "paged_attention_mma_decode_warp",
            DecodeKernel::Warp2 => "paged_attention_mma_decode_warp2",
        }
    }
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

    /// The shape of a kernel (must match the `.cu` files: attention.cu's DECODE_ROWS /
    /// TILE_ROWS and CHUNK; 16 x WARPS_M x MT rows and CHUNK of the instances in
    /// attention_mma.cu). SIMT has no tall tiles: it takes its prefill kernel for them.
    pub fn shape(self, tiles: Tiles) -> KernelShape {
        match (self, tiles) {
            (AttentionKind::Simt, Tiles::Decode) => KernelShape { rows: 4, chunk: 32 },
            (AttentionKind::Simt, _) => KernelShape { rows: 16, chunk: 32 },
            (AttentionKind::TensorCore, Tiles::Decode) => KernelShape { rows: 16, chunk: 64 },
            (AttentionKind::TensorCore, Tiles::Prefill) => KernelShape { rows: 64, chunk: 64 },
            (AttentionKind::TensorCore, Tiles::PrefillTall) => KernelShape { rows: 128, chunk: 32 },
        }
    }

    /// Dynamic shared memory of one CTA: the tensor-core kernels stage K and V, `MMA_STAGES`
    /// chunks deep, and the tall tiles their queries too, in rows padded by 16 bytes.
    pub fn shared_bytes(self, tiles: Tiles, head_dim: usize) -> usize {
        let shape = self.shape(tiles);
        let query_rows = if tiles == Tiles::PrefillTall { shape.rows } else { 0 };
        match self {
            AttentionKind::Simt => 0,
            AttentionKind::TensorCore => mma_shared_bytes(MMA_STAGES, shape.chunk, query_rows, head_dim),
        }
    }
}

/// Dynamic shared memory of a tensor-core CTA (attention_mma.cu's `smem_bytes`): `stages` K/V
/// chunks of `chunk` positions and `query_rows` staged queries, in bf16 rows padded by 16 bytes.
fn mma_shared_bytes(stages: usize, chunk: usize, query_rows: usize, head_dim: usize) -> usize {
    (stages * 2 * chunk + query_rows) * (head_dim + 8) * 2
}

/// What a plan needs to know of the kernels that will run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSetup {
    pub kind: AttentionKind,
    /// CTAs a launch aims for: a part with fewer tiles splits the context until it has about as
    /// many (the decode kernel's resident CTAs per multiprocessor times the multiprocessors, so
    /// a split decode fills the GPU in one wave).
    pub split_ctas: usize,
    /// Which prefill tiles (tensor cores; SIMT has one kind).
    pub prefill_tiles: PrefillTiles,
}

/// One launch of a plan: the tiles of its decode or its prefill sequences.
#[derive(Clone, Debug)]
struct Part {
    tiles_kind: Tiles,
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
        let decodes = seqs.iter().enumerate().filter(|(_, s)| s.query_len == 1);
        let prompts = || seqs.iter().enumerate().filter(|(_, s)| s.query_len != 1);
        let prefill = match (kind, setup.prefill_tiles) {
            (AttentionKind::Simt, _) | (_, PrefillTiles::Short) => Tiles::Prefill,
            (_, PrefillTiles::Tall) => Tiles::PrefillTall,
            (_, PrefillTiles::Auto) => {
                // Tall tiles where they still give the GPU as many CTAs as a launch aims for.
                let shape = kind.shape(Tiles::PrefillTall);
                let heads_per_cta = heads_per_cta(ratio, shape.rows);
                let tiles: usize = prompts().map(|(_, s)| s.query_len.div_ceil(shape.rows / heads_per_cta)).sum();
                let ctas = tiles * kv_heads * (ratio / heads_per_cta);
                if ctas >= setup.split_ctas { Tiles::PrefillTall } else { Tiles::Prefill }
            }
        };
        let parts = [
            Part::plan(pack, decodes, Tiles::Decode, kind.shape(Tiles::Decode), ratio, kv_heads, setup.split_ctas),
            Part::plan(pack, prompts(), prefill, kind.shape(prefill), ratio, kv_heads, setup.split_ctas),
        ]
        .into_iter()
        .flatten()
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

    /// Which parts run: (kernel, tiles) for each launch, the decode part first.
    pub fn launches(&self) -> Vec<(Tiles, usize)> {
        self.parts.iter().map(|p| (p.tiles_kind, p.num_tiles)).collect()
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
        tiles_kind: Tiles,
        shape: KernelShape,
        ratio: usize,
        kv_heads: usize,
        split_ctas: usize,
    ) -> Option<Part> {
        let heads_per_cta = heads_per_cta(ratio, shape.rows);
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
        Some(Part { tiles_kind, tiles, num_tiles, heads_per_cta, shape, splits, chunks_per_split })
    }
}

/// Query heads of one KV head a CTA of `rows` rows takes: the largest divisor of the group's
/// `ratio` that fits.
fn heads_per_cta(ratio: usize, rows: usize) -> usize {
    (1..=ratio.min(rows)).rev().find(|d| ratio.is_multiple_of(*d)).unwrap_or(1)
}
