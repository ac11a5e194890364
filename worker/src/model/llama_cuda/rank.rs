//! What one rank of a tensor-parallel model adds to the GPU forward (`tp` has the sharding):
//! the rank's communicator, its [`ShardPlan`], the whole model's config, and the host-side
//! agreement the ranks need at start-up.
//!
//! A rank's [`CudaLlama`](super::CudaLlama) holds its shard's config (its heads, KV heads,
//! intermediate rows and vocabulary range) and meets the other ranks at four points of a step,
//! every rank at each, in the same order:
//! - the embeddings: each rank gathers the rows of the ids in its vocabulary range (zeros for the
//!   rest), then a sum all-reduce gives every rank every row (exact: one rank is nonzero);
//! - after `o` and after `down` in every layer: a sum all-reduce of the partial products;
//! - the logits: each rank's columns of the vocabulary, all-gathered and laid side by side.
//!
//! Rank 0 reads the step's outputs back and reduces them for the sampler; the other ranks only
//! take part in the collectives. At start-up each rank plans its own KV cache and the ranks
//! agree on the smallest block count, so every rank holds every block the scheduler hands out.

use std::sync::Arc;

use candle_core::Tensor;

use crate::kernels::cuda::{CudaKernels, gpu_error};
use crate::model::LlamaConfig;
use crate::tp::ShardPlan;
use crate::tp::comm::LocalGroup;
use crate::tp::gpu_comm::RankComm;
use crate::{Result, WorkerError};

/// One rank's part in a tensor-parallel model.
pub struct RankPart {
    pub comm: RankComm,
    pub plan: ShardPlan,
    /// The whole model's config (the rank's model holds its shard's).
    pub full: LlamaConfig,
    /// The ranks' host-side meeting point (start-up agreements).
    pub agree: Arc<LocalGroup>,
}

fn aborted() -> WorkerError {
    WorkerError::Engine("tensor parallelism: another rank failed while loading".into())
}

impl RankPart {
    /// Whether this rank reads the step's outputs back (rank 0 does).
    pub fn reads_outputs(&self) -> bool {
        self.plan.rank == 0
    }

    /// `out` (`[rows, hidden]`) becomes the embeddings of the ids at `ids`, from this rank's
    /// rows `embed` and the other ranks'.
    pub fn embed_into(&self, k: &CudaKernels, embed: &Tensor, ids: u64, out: &Tensor) -> Result<()> {
        k.gather_rows_from(embed, self.plan.vocab_range().start, ids, out)?;
        self.comm.all_reduce_sum(out)
    }

    /// `t` (a row-parallel projection's partial product) becomes the sum over the ranks.
    pub fn reduce(&self, t: &Tensor) -> Result<()> {
        self.comm.all_reduce_sum(t)
    }

    /// Every rank's logits columns (`local`: `[rows, vocab / ranks]`) side by side:
    /// `[rows, vocab]`, rank 0's columns first.
    pub fn gather_logits(&self, k: &CudaKernels, local: &Tensor) -> Result<Tensor> {
        let fail = |e| gpu_error("gathering the ranks' logits", e);
        let (rows, columns) = local.dims2().map_err(fail)?;
        let ranks = self.comm.ranks();
        let all = k.alloc_of((ranks, rows, columns).into(), local.dtype())?;
        self.comm.all_gather(local, &all)?;
        all.transpose(0, 1).and_then(|t| t.contiguous()).and_then(|t| t.reshape((rows, ranks * columns))).map_err(fail)
    }

    /// The smallest of every rank's `blocks` (each rank's KV plan), so every rank holds each
    /// block the scheduler may hand out.
    pub fn agree_blocks(&self, blocks: usize) -> Result<usize> {
        // Block counts stay far below 2^24, where f32 holds every integer.
        Ok(self.everyone(blocks as f32)?.into_iter().fold(blocks, |m, b| m.min(b as usize)))
    }

    /// Whether `ok` holds on every rank (e.g. every rank captured its graphs), so the ranks take
    /// the same path after.
    pub fn all(&self, ok: bool) -> Result<bool> {
        Ok(self.everyone(f32::from(u8::from(ok)))?.iter().all(|&v| v == 1.0))
    }

    /// Every rank's `mine`, in rank order (a start-up agreement on the host).
    fn everyone(&self, mine: f32) -> Result<Vec<f32>> {
        let mut all = vec![0f32; self.agree.ranks()];
        self.agree.all_gather_columns(self.plan.rank, &[mine], 1, |r| r..r + 1, &mut all).map_err(|_| aborted())?;
        Ok(all)
    }
}
