//! Tensor parallelism inside one worker (vLLM's `tensor_parallel_size`): one model replica
//! spread over N ranks, Megatron-style.
//!
//! What each rank holds (rank r of N, `ShardPlan`):
//! - attention: query heads `r * H/N ..`, KV heads `r * KV/N ..` (so every query head's KV head
//!   is on its rank: `H/KV` stays the GQA ratio) — the rows of q/k/v (column-parallel) and the
//!   matching input columns of o (row-parallel), and its heads' part of the KV cache;
//! - MLP: intermediate rows `r * I/N ..` of gate and up (column-parallel) and those input columns
//!   of down (row-parallel);
//! - vocabulary: a contiguous range of token ids (`vocab_range`)
//!   of the embeddings and of the output projection (as even as possible);
//! - norms: all of them (the residual stream is replicated on every rank).
//!
//! Per layer the ranks meet twice, after o and after down: each holds a partial sum of the
//! projection over its heads / intermediate rows, and an all-reduce adds them (in rank order,
//! so every rank ends with the same bits). The embedding lookup is an all-reduce too (each rank
//! writes the rows of the token ids it holds, zeros elsewhere: exact), and the logits an
//! all-gather of the vocabulary ranges (exact). Because the row-parallel sums are added in
//! another order than one rank's dot products, TP N equals TP 1 to f32 rounding, not bit for bit.
//!
//! Invariants: `H % N == 0`, `KV % N == 0`, `I % N == 0` and `I / N` a multiple of the
//! quantization block (`QK`, 32), checked by [`ShardPlan::new`] with the option named in the
//! error; the column slices of o and down must also fall on the stored tensor's GGML blocks (256
//! values for K-quants), checked as each rank loads them (`source`), again naming the option.
//! Ranks run the same steps in the same order; a collective is entered by every rank or none
//! (a batch is validated before the first one).

pub mod comm;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod gpu_comm;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod source;

use std::ops::Range;

use crate::kernels::cpu::pool::split_range;
use crate::kernels::cpu::quant::QK;
use crate::model::LlamaConfig;
use crate::{Result, WorkerError};

/// Rank `rank` of `ranks`: which slice of every weight it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub ranks: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
}

impl ShardPlan {
    /// The plan of `rank` of `ranks` for `config`, or an error naming `tensor_parallel_size`
    /// when the model does not divide.
    pub fn new(config: &LlamaConfig, rank: usize, ranks: usize) -> Result<ShardPlan> {
        let bad = |why: String| Err(WorkerError::invalid("tensor_parallel_size", why));
        if ranks == 0 || rank >= ranks {
            return bad(format!("rank {rank} of {ranks}: tensor_parallel_size must be at least 1"));
        }
        let (h, kv, inter) = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size);
        if !h.is_multiple_of(ranks) || !kv.is_multiple_of(ranks) {
            return bad(format!("{ranks} does not divide the model's {h} attention heads and {kv} key/value heads"));
        }
        if !inter.is_multiple_of(ranks) || !(inter / ranks).is_multiple_of(QK) {
            return bad(format!(
                "{ranks} ranks would split the intermediate size {inter} into parts that are not multiples of {QK}"
            ));
        }
        if config.vocab_size < ranks {
            return bad(format!("{ranks} ranks exceed the vocabulary of {} tokens", config.vocab_size));
        }
        Ok(ShardPlan {
            rank,
            ranks,
            heads: h / ranks,
            kv_heads: kv / ranks,
            head_dim: config.head_dim,
            intermediate: inter / ranks,
            vocab: config.vocab_size,
        })
    }

    /// Every rank's plan.
    pub fn all(config: &LlamaConfig, ranks: usize) -> Result<Vec<ShardPlan>> {
        // `ranks.max(1)`: no ranks at all is refused by the first `new`.
        (0..ranks.max(1)).map(|r| ShardPlan::new(config, r, ranks)).collect()
    }

    /// This rank's rows of the query projection (its heads, `head_dim` rows each).
    pub fn q_rows(&self) -> Range<usize> {
        let n = self.heads * self.head_dim;
        self.rank * n..(self.rank + 1) * n
    }

    /// This rank's rows of the key and of the value projection.
    pub fn kv_rows(&self) -> Range<usize> {
        let n = self.kv_heads * self.head_dim;
        self.rank * n..(self.rank + 1) * n
    }

    /// This rank's rows of gate and up, and columns of down.
    pub fn intermediate(&self) -> Range<usize> {
        self.rank * self.intermediate..(self.rank + 1) * self.intermediate
    }

    /// The token ids whose embeddings and logits this rank holds.
    pub fn vocab_range(&self) -> Range<usize> {
        vocab_range(self.vocab, self.rank, self.ranks)
    }

    /// The shape a rank's model sees: its heads, KV heads, intermediate rows and vocabulary
    /// range; everything else (hidden size, head size, rotary, layers) as `full`.
    pub fn shard_config(&self, full: &LlamaConfig) -> LlamaConfig {
        LlamaConfig {
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            intermediate_size: self.intermediate,
            vocab_size: self.vocab_range().len(),
            ..full.clone()
        }
    }
}

/// Every rank's value, or the error to report when some rank failed: that of a rank that failed
/// first (`true`: before the group was aborted), else the first in rank order (the others'
/// errors only say that another rank failed).
pub(crate) fn first_failure<T>(outcomes: impl IntoIterator<Item = (Result<T>, bool)>) -> Result<Vec<T>> {
    let mut values = Vec::new();
    let mut failure: Option<(WorkerError, bool)> = None;
    for (outcome, first) in outcomes {
        match outcome {
            Ok(v) => values.push(v),
            Err(e) if failure.as_ref().is_none_or(|(_, f)| first && !f) => failure = Some((e, first)),
            Err(_) => {}
        }
    }
    match failure {
        Some((e, _)) => Err(e),
        None => Ok(values),
    }
}

/// Rank `rank`'s share of a vocabulary of `vocab` ids: contiguous, as even as possible (the
/// first `vocab % ranks` ranks hold one id more).
pub fn vocab_range(vocab: usize, rank: usize, ranks: usize) -> Range<usize> {
    split_range(vocab, rank, ranks, 1)
}

#[cfg(test)]
pub(crate) mod tests;
