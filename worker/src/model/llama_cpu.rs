//! The Llama forward pass on the CPU, over a packed batch and the paged KV cache.
//!
//! Stateless apart from the cache: every step gets token ids, positions, slots and block tables
//! ([`ForwardBatch`]), writes the new K/V into the cache and attends over it. Intermediate buffers
//! are kept between steps and only grow.

use std::time::Instant;

use super::Model;
use super::batch::ForwardBatch;
use super::config::LlamaConfig;
use super::cpu_weights::{CpuWeightFormat, CpuWeights};
use super::source::TensorSource;
use crate::kernels::cpu::attention::{CacheLayout, QueryRef, paged_attention, write_kv};
use crate::kernels::cpu::isa::Isa;
use crate::kernels::cpu::matmul::{Epilogue, Input, InputKind, Matrix, matmul};
use crate::kernels::cpu::ops::{RopeTable, rms_norm};
use crate::kernels::cpu::pool::ThreadPool;
use crate::kernels::cpu::quant::{BlockQ8Act, QK, quantize_rows_q8};
use crate::kv_cache::cpu_storage::CpuKvStorage;
use crate::{Result, WorkerError};

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
}

#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    xn: Vec<f32>,
    xq: Vec<BlockQ8Act>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    mlp: Vec<f32>,
    last: Vec<f32>,
    logits: Vec<f32>,
}

impl CpuLlama {
    /// Loads the weights from `src` and allocates the cache.
    pub fn load(
        config: LlamaConfig,
        src: &dyn TensorSource,
        opts: &CpuModelOptions,
    ) -> Result<CpuLlama> {
        let started = Instant::now();
        let weights = CpuWeights::load(&config, src, opts.weight_format)?;
        let layout = CacheLayout {
            block_size: opts.block_size,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let cache = CpuKvStorage::new(layout, config.num_hidden_layers, opts.num_blocks);
        let rope = RopeTable::new(&config.rope_inv_freq(), opts.max_model_len);
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
        })
    }

    pub fn weights(&self) -> &CpuWeights {
        &self.weights
    }

    /// Rejects a batch that would index outside the vocabulary, the rotary tables or the cache.
    fn check(&self, batch: &ForwardBatch) -> Result<()> {
        let bad = |what: String| Err(WorkerError::Engine(format!("invalid batch: {what}")));
        let n = batch.num_tokens();
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            return bad("token, position and slot counts differ".into());
        }
        if let Some(t) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return bad(format!("token id {t} outside the vocabulary"));
        }
        if let Some(p) = batch
            .positions
            .iter()
            .find(|&&p| p as usize >= self.rope.max_positions())
        {
            return bad(format!("position {p} beyond max_model_len"));
        }
        let slots = self.cache.num_blocks * self.cache.layout.block_size;
        if batch.slot_mapping.iter().any(|&s| s as usize >= slots) {
            return bad("slot outside the cache".into());
        }
        let mut rows = 0;
        for s in &batch.seqs {
            if s.query_start != rows
                || s.context_len < s.query_len
                || s.block_table.len() * self.cache.layout.block_size < s.context_len
            {
                return bad(format!("sequence layout {s:?}"));
            }
            if s.block_table
                .iter()
                .any(|&b| b as usize >= self.cache.num_blocks)
            {
                return bad("block id outside the cache".into());
            }
            rows += s.query_len;
        }
        if rows != n || batch.logits_rows.iter().any(|&r| r >= n) {
            return bad("rows do not match the sequences".into());
        }
        Ok(())
    }
}

/// `out = x · Wᵀ` (through the epilogue), quantizing `x` first when `W` is quantized.
#[allow(clippy::too_many_arguments)]
fn project(
    pool: &ThreadPool,
    isa: Isa,
    w: &Matrix,
    x: &[f32],
    m: usize,
    xq: &mut Vec<BlockQ8Act>,
    out: &mut [f32],
    ep: Epilogue,
) {
    match w.input_kind() {
        InputKind::F32 => matmul(pool, isa, w, Input::F32(&x[..m * w.cols]), m, out, ep),
        InputKind::Q8 => {
            xq.resize(m * w.cols / QK, BlockQ8Act::default());
            quantize_rows_q8(isa, &x[..m * w.cols], w.cols, xq);
            matmul(pool, isa, w, Input::Q8(xq), m, out, ep);
        }
    }
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
        format!(
            "cpu ({}, {} threads, weights {})",
            self.isa.name(),
            self.pool.threads(),
            self.weights.format_summary()
        )
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<&[f32]> {
        self.check(batch)?;
        let c = &self.config;
        let (m, h, inter, vocab) = (
            batch.num_tokens(),
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
        );
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
            (&mut b.mlp, m * inter),
        ] {
            v.resize(len, 0.0);
        }
        for (row, &t) in batch.token_ids.iter().enumerate() {
            w.embed
                .dequantize_row(t as usize, &mut b.x[row * h..(row + 1) * h]);
        }
        let queries: Vec<QueryRef<'_>> = batch
            .seqs
            .iter()
            .flat_map(|s| {
                (0..s.query_len).map(move |i| QueryRef {
                    block_table: &s.block_table,
                    context_len: s.context_len - s.query_len + i + 1,
                })
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in w.layers.iter().enumerate() {
            rms_norm(isa, &b.x, &layer.attn_norm, c.rms_norm_eps, &mut b.xn);
            project(
                pool,
                isa,
                &layer.qkv,
                &b.xn,
                m,
                &mut b.xq,
                &mut b.qkv,
                Epilogue::Store,
            );
            for row in 0..m {
                let src = &b.qkv[row * (qd + 2 * kvd)..(row + 1) * (qd + 2 * kvd)];
                let pos = batch.positions[row] as usize;
                let q = &mut b.q[row * qd..(row + 1) * qd];
                q.copy_from_slice(&src[..qd]);
                self.rope.apply(q, pos);
                let k = &mut b.k[row * kvd..(row + 1) * kvd];
                k.copy_from_slice(&src[qd..qd + kvd]);
                self.rope.apply(k, pos);
                b.v[row * kvd..(row + 1) * kvd].copy_from_slice(&src[qd + kvd..]);
            }
            let layout = self.cache.layout;
            write_kv(
                &layout,
                &b.k,
                &b.v,
                &batch.slot_mapping,
                &mut self.cache.k[li],
                &mut self.cache.v[li],
            );
            paged_attention(
                pool,
                isa,
                &layout,
                c.num_attention_heads,
                scale,
                &b.q,
                &queries,
                &self.cache.k[li],
                &self.cache.v[li],
                &mut b.attn,
            );
            project(
                pool,
                isa,
                &layer.o,
                &b.attn,
                m,
                &mut b.xq,
                &mut b.x,
                Epilogue::Add,
            );
            rms_norm(isa, &b.x, &layer.ffn_norm, c.rms_norm_eps, &mut b.xn);
            project(
                pool,
                isa,
                &layer.gate_up,
                &b.xn,
                m,
                &mut b.xq,
                &mut b.mlp,
                Epilogue::SiluMulPairs,
            );
            project(
                pool,
                isa,
                &layer.down,
                &b.mlp,
                m,
                &mut b.xq,
                &mut b.x,
                Epilogue::Add,
            );
        }
        let r = batch.logits_rows.len();
        b.last.resize(r * h, 0.0);
        for (i, &row) in batch.logits_rows.iter().enumerate() {
            rms_norm(
                isa,
                &b.x[row * h..(row + 1) * h],
                &w.final_norm,
                c.rms_norm_eps,
                &mut b.last[i * h..(i + 1) * h],
            );
        }
        b.logits.resize(r * vocab, 0.0);
        project(
            pool,
            isa,
            w.output(),
            &b.last,
            r,
            &mut b.xq,
            &mut b.logits,
            Epilogue::Store,
        );
        Ok(&b.logits)
    }
}
