//! The Llama forward pass on the CPU, over a packed batch and the paged KV cache.
//!
//! Stateless apart from the cache: every step gets token ids, positions, slots and block tables
//! ([`ForwardBatch`]), writes the new K/V into the cache and attends over it. Intermediate buffers
//! are kept between steps and only grow.
//!
//! One rank of a tensor-parallel model ([`CpuLlama::load_rank`], `crate::tp`) runs the same pass
//! over its shard: its embedding rows and the o and down projections' partial sums go through
//! the group's all-reduce, and its vocabulary's logits through an all-gather.

use std::sync::Arc;
use std::time::Instant;

use super::Model;
use super::batch::{ForwardBatch, attention_queries};
use super::config::LlamaConfig;
use super::cpu_weights::{CpuWeightFormat, CpuWeights};
use super::source::TensorSource;
use crate::Result;
use crate::WorkerError;
use crate::kernels::cpu::attention::{CacheLayout, paged_attention, write_kv};
use crate::kernels::cpu::isa::Isa;
use crate::kernels::cpu::matmul::{Epilogue, Input, InputKind, Matrix, matmul};
use crate::kernels::cpu::ops::{RopeTable, rms_norm, silu_mul};
use crate::kernels::cpu::pool::{SharedMut, ThreadPool, split_range};
use crate::kernels::cpu::quant::{PARALLEL_ROWS, QuantizedRows};
use crate::kv_cache::cpu_storage::CpuKvStorage;
use crate::tp::comm::{Aborted, LocalGroup};
use crate::tp::source::ShardedSource;
use crate::tp::{ShardPlan, vocab_range};

/// Options for building a CPU model.
#[derive(Clone, Debug)]
pub struct CpuModelOptions {
    pub threads: usize,
    pub weight_format: CpuWeightFormat,
    pub block_size: usize,
    /// KV cache blocks to allocate.
    pub num_blocks: usize,
    /// Longest sequence (sizes the rotary tables).
    pub max_model_len: usize,
}

/// A Llama model with its KV cache, on the CPU.
pub struct CpuLlama {
    config: LlamaConfig,
    weights: CpuWeights,
    rope: RopeTable,
    cache: CpuKvStorage,
    pool: ThreadPool,
    isa: Isa,
    buf: Buffers,
    /// Set for one rank of a tensor-parallel model.
    rank: Option<Rank>,
}

/// A tensor-parallel rank's place in its group.
struct Rank {
    plan: ShardPlan,
    group: Arc<LocalGroup>,
    /// The whole model's vocabulary (the rank's config has its own range's size).
    vocab: usize,
}

#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    xn: Vec<f32>,
    xq: QuantizedRows,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate_up: Vec<f32>,
    mlp: Vec<f32>,
    last: Vec<f32>,
    logits: Vec<f32>,
    /// The final-norm hidden states of the batch's `hidden_rows`.
    hidden: Vec<f32>,
    /// A rank's partial sums of a row-parallel projection, and its vocabulary's logits.
    partial: Vec<f32>,
}

impl CpuLlama {
    /// Loads the weights from `src` and allocates the cache.
    pub fn load(config: LlamaConfig, src: &dyn TensorSource, opts: &CpuModelOptions) -> Result<CpuLlama> {
        let started = Instant::now();
        let weights = CpuWeights::load(&config, src, opts.weight_format)?;
        let layout = CacheLayout {
            block_size: opts.block_size,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let cache = CpuKvStorage::new(layout, config.num_hidden_layers, opts.num_blocks);
        let rope = config.rope_table(opts.max_model_len);
        let isa = Isa::detect();
        let (total, streamed) = weights.sizes();
        tracing::info!(
            source = %src.describe(),
            weights = %weights.format_summary(),
            weight_mib = total / (1 << 20),
            per_token_mib = streamed / (1 << 20),
            kv_cache_mib = cache.size_bytes() / (1 << 20),
            kv_blocks = opts.num_blocks,
            isa = isa.name(),
            threads = opts.threads,
            load_s = started.elapsed().as_secs_f32(),
            "loaded model on the CPU"
        );
        Ok(CpuLlama {
            config,
            weights,
            rope,
            cache,
            pool: ThreadPool::new(opts.threads),
            isa,
            buf: Buffers::default(),
            rank: None,
        })
    }

    /// Rank `plan.rank` of a tensor-parallel model of `config`: only its shard of `src`'s
    /// weights and its KV heads' cache (`opts.num_blocks` blocks, as every rank), meeting the
    /// other ranks in `group`.
    pub fn load_rank(
        config: &LlamaConfig,
        src: &dyn TensorSource,
        opts: &CpuModelOptions,
        plan: ShardPlan,
        group: Arc<LocalGroup>,
    ) -> Result<CpuLlama> {
        let shard = ShardedSource::new(src, plan.clone());
        let mut model = CpuLlama::load(plan.shard_config(config), &shard, opts)?;
        model.rank = Some(Rank { plan, group, vocab: config.vocab_size });
        Ok(model)
    }

    /// The logits of the last forward (every row's whole vocabulary, on every rank).
    pub(crate) fn logits(&self) -> &[f32] {
        &self.buf.logits
    }

    pub fn weights(&self) -> &CpuWeights {
        &self.weights
    }

    /// Rejects a batch that would index outside the vocabulary, the rotary tables or the cache.
    pub(crate) fn validate(&self, batch: &ForwardBatch) -> Result<()> {
        let (blocks, block_size) = (self.cache.num_blocks, self.cache.layout.block_size);
        batch.validate(self.vocab(), self.rope.max_positions(), blocks, block_size)
    }

    /// The whole model's vocabulary size (a rank's config holds only its range).
    fn vocab(&self) -> usize {
        self.rank.as_ref().map_or(self.config.vocab_size, |r| r.vocab)
    }
}

/// `f(row, src_row, dst_row)` for every row, spread over the pool's threads when there are enough
/// rows to pay for it (per-row work gives the same result either way).
fn map_rows(
    pool: &ThreadPool,
    src: &[f32],
    src_width: usize,
    dst: &mut [f32],
    dst_width: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) {
    let rows = dst.len() / dst_width;
    let run = |range: std::ops::Range<usize>, dst: &mut [f32]| {
        for (i, row) in range.clone().enumerate() {
            f(row, &src[row * src_width..(row + 1) * src_width], &mut dst[i * dst_width..(i + 1) * dst_width]);
        }
    };
    if rows < PARALLEL_ROWS || pool.threads() == 1 {
        return run(0..rows, dst);
    }
    let out = SharedMut(dst.as_mut_ptr());
    pool.run(&|t, n| {
        let range = split_range(rows, t, n, 1);
        // SAFETY: each thread writes only the rows of its own range.
        let mine =
            unsafe { std::slice::from_raw_parts_mut(out.get().add(range.start * dst_width), range.len() * dst_width) };
        run(range, mine);
    });
}

/// `out = x · Wᵀ` (through the epilogue), quantizing `x` first when `W` is quantized.
#[allow(clippy::too_many_arguments)]
fn project(
    pool: &ThreadPool,
    isa: Isa,
    w: &Matrix,
    x: &[f32],
    m: usize,
    xq: &mut QuantizedRows,
    out: &mut [f32],
    ep: Epilogue,
) {
    match w.input_kind() {
        InputKind::F32 => matmul(pool, isa, w, Input::F32(&x[..m * w.cols]), m, out, ep),
        InputKind::Q8 => {
            xq.quantize_on(pool, isa, &x[..m * w.cols], w.cols);
            matmul(pool, isa, w, Input::Q8(xq), m, out, ep);
        }
    }
}

/// `x += input · Wᵀ` for a row-parallel projection: in place on one rank; on a rank of a
/// tensor-parallel group, its partial sum (over its columns of `W`) all-reduced first.
#[allow(clippy::too_many_arguments)]
fn project_add(
    pool: &ThreadPool,
    isa: Isa,
    w: &Matrix,
    input: &[f32],
    m: usize,
    xq: &mut QuantizedRows,
    partial: &mut Vec<f32>,
    x: &mut [f32],
    rank: Option<&Rank>,
) -> std::result::Result<(), Aborted> {
    let Some(rank) = rank else {
        project(pool, isa, w, input, m, xq, x, Epilogue::Add);
        return Ok(());
    };
    partial.resize(x.len(), 0.0);
    project(pool, isa, w, input, m, xq, partial, Epilogue::Store);
    rank.group.all_reduce_sum(rank.plan.rank, partial)?;
    x.iter_mut().zip(partial.iter()).for_each(|(x, p)| *x += p);
    Ok(())
}

fn rank_failed(_: Aborted) -> WorkerError {
    WorkerError::Engine("another tensor-parallel rank failed during the step".into())
}

impl Model for CpuLlama {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    fn block_size(&self) -> usize {
        self.cache.layout.block_size
    }

    fn describe(&self) -> String {
        format!("cpu ({}, {} threads, weights {})", self.isa.name(), self.pool.threads(), self.weights.format_summary())
    }

    fn hidden_states(&self) -> &[f32] {
        &self.buf.hidden
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<&[f32]> {
        self.validate(batch)?;
        let c = &self.config;
        let (m, h, inter, vocab) = (batch.num_tokens(), c.hidden_size, c.intermediate_size, self.vocab());
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let (pool, isa, w, b) = (&self.pool, self.isa, &self.weights, &mut self.buf);
        for (v, len) in [
            (&mut b.x, m * h),
            (&mut b.xn, m * h),
            (&mut b.qkv, m * (qd + 2 * kvd)),
            (&mut b.q, m * qd),
            (&mut b.k, m * kvd),
            (&mut b.v, m * kvd),
            (&mut b.attn, m * qd),
            (&mut b.gate_up, m * 2 * inter),
            (&mut b.mlp, m * inter),
        ] {
            v.resize(len, 0.0);
        }
        let rank = self.rank.as_ref();
        // A rank holds the embeddings of its vocabulary range: the others' rows come through
        // the all-reduce (each row is written by exactly one rank, so the sum is exact).
        let held = rank.map_or(0..vocab, |r| r.plan.vocab_range());
        for (row, &t) in batch.token_ids.iter().enumerate() {
            let out = &mut b.x[row * h..(row + 1) * h];
            match (t as usize).checked_sub(held.start).filter(|&i| i < held.len()) {
                Some(i) => w.embed.dequantize_row(i, out),
                None => out.fill(0.0),
            }
        }
        if let Some(r) = rank {
            r.group.all_reduce_sum(r.plan.rank, &mut b.x).map_err(rank_failed)?;
        }
        let queries = attention_queries(&batch.seqs);
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = c.rms_norm_eps;
        let rope = &self.rope;
        let qkv_width = qd + 2 * kvd;
        for (li, layer) in w.layers.iter().enumerate() {
            map_rows(pool, &b.x, h, &mut b.xn, h, |_, x, out| rms_norm(isa, x, &layer.attn_norm, eps, out));
            project(pool, isa, &layer.qkv, &b.xn, m, &mut b.xq, &mut b.qkv, Epilogue::Store);
            // Split the stacked projection, rotating queries and keys by their positions.
            map_rows(pool, &b.qkv, qkv_width, &mut b.q, qd, |row, src, q| {
                q.copy_from_slice(&src[..qd]);
                rope.apply(q, batch.positions[row] as usize);
            });
            map_rows(pool, &b.qkv, qkv_width, &mut b.k, kvd, |row, src, k| {
                k.copy_from_slice(&src[qd..qd + kvd]);
                rope.apply(k, batch.positions[row] as usize);
            });
            map_rows(pool, &b.qkv, qkv_width, &mut b.v, kvd, |_, src, v| v.copy_from_slice(&src[qd + kvd..]));
            let layout = self.cache.layout;
            write_kv(&layout, &b.k, &b.v, &batch.slot_mapping, &mut self.cache.k[li], &mut self.cache.v[li]);
            let heads = c.num_attention_heads;
            let (k_cache, v_cache) = (&self.cache.k[li], &self.cache.v[li]);
            paged_attention(pool, isa, &layout, heads, scale, &b.q, &queries, k_cache, v_cache, &mut b.attn);
            project_add(pool, isa, &layer.o, &b.attn, m, &mut b.xq, &mut b.partial, &mut b.x, rank)
                .map_err(rank_failed)?;
            map_rows(pool, &b.x, h, &mut b.xn, h, |_, x, out| rms_norm(isa, x, &layer.ffn_norm, eps, out));
            project(pool, isa, &layer.gate_up, &b.xn, m, &mut b.xq, &mut b.gate_up, Epilogue::Store);
            map_rows(pool, &b.gate_up, 2 * inter, &mut b.mlp, inter, |_, gu, out| silu_mul(isa, gu, inter, out));
            project_add(pool, isa, &layer.down, &b.mlp, m, &mut b.xq, &mut b.partial, &mut b.x, rank)
                .map_err(rank_failed)?;
        }
        let final_norm = |rows: &[usize], out: &mut Vec<f32>| {
            out.resize(rows.len() * h, 0.0);
            for (i, &row) in rows.iter().enumerate() {
                rms_norm(isa, &b.x[row * h..(row + 1) * h], &w.final_norm, eps, &mut out[i * h..(i + 1) * h]);
            }
        };
        final_norm(&batch.hidden_rows, &mut b.hidden);
        final_norm(&batch.logits_rows, &mut b.last);
        let r = batch.logits_rows.len();
        b.logits.resize(r * vocab, 0.0);
        match rank {
            None if r > 0 => project(pool, isa, w.output(), &b.last, r, &mut b.xq, &mut b.logits, Epilogue::Store),
            None => {}
            Some(rank) => {
                // Every rank enters the gather, rows or not.
                b.partial.resize(r * held.len(), 0.0);
                if r > 0 {
                    project(pool, isa, w.output(), &b.last, r, &mut b.xq, &mut b.partial, Epilogue::Store);
                }
                let (ranks, group) = (rank.plan.ranks, &rank.group);
                let columns = |q| vocab_range(vocab, q, ranks);
                group.all_gather_columns(rank.plan.rank, &b.partial, r, columns, &mut b.logits).map_err(rank_failed)?;
            }
        }
        Ok(&b.logits)
    }
}
