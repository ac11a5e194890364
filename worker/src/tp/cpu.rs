//! A tensor-parallel model on the CPU: N ranks of [`CpuLlama`], each a thread for the length of
//! a step, meeting in a [`LocalGroup`]. It computes what one `CpuLlama` computes (to f32
//! rounding: see `tp`), so it is the reference the GPU ranks' sharding and collectives are
//! checked against, and it serves `--tensor-parallel-size N --device cpu`.
//!
//! Invariants: every rank gets the same batch each step (so all enter the same collectives);
//! rank 0's logits and hidden states are the model's (every rank's are equal); a rank that fails
//! (an error or a panic) aborts the group, so the step returns an error and never hangs; once
//! every rank has returned, the group is reset, so a failed step fails only itself, as on one
//! rank (the engine fails that step's requests). A batch is validated once before the ranks
//! start, so a bad batch enters no collective.

use std::sync::Arc;

use super::comm::{AbortOnFailure, LocalGroup};
use super::{ShardPlan, first_failure};
use crate::kernels::cpu::pool::split_range;
use crate::model::llama_cpu::{CpuLlama, CpuModelOptions};
use crate::model::{ForwardBatch, LlamaConfig, Model, TensorSource};
use crate::{Result, WorkerError};

/// `ranks` [`CpuLlama`] shards of one model.
pub struct TensorParallelCpu {
    config: LlamaConfig,
    ranks: Vec<CpuLlama>,
    group: Arc<LocalGroup>,
}

impl TensorParallelCpu {
    /// Loads each rank's shard of `src` (`opts.threads` spread over the ranks, at least one
    /// each).
    pub fn load(config: LlamaConfig, src: &dyn TensorSource, opts: &CpuModelOptions, ranks: usize) -> Result<Self> {
        let plans = ShardPlan::all(&config, ranks)?;
        let group = Arc::new(LocalGroup::new(ranks));
        // `opts.threads` shared out (a rank gets one at least).
        let threads = |r: usize| split_range(opts.threads, r, ranks, 1).len().max(1);
        let ranks = plans
            .into_iter()
            .map(|plan| {
                let own = CpuModelOptions { threads: threads(plan.rank), ..opts.clone() };
                CpuLlama::load_rank(&config, src, &own, plan, group.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(ranks = ranks.len(), threads = opts.threads, "tensor-parallel model on the CPU");
        Ok(TensorParallelCpu { config, ranks, group })
    }

    /// Runs the step on every rank, each on a thread of its own.
    fn run(&mut self, batch: &ForwardBatch) -> Result<()> {
        // A bad batch fails here, for every rank alike, before any collective.
        self.ranks[0].validate(batch)?;
        let group = &self.group;
        // Each rank's outcome, and whether its failure came first (the group was not aborted
        // yet): that one is the cause, the others' are "another rank failed".
        let outcomes: Vec<(Result<()>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|rank| {
                    s.spawn(move || {
                        let _abort = AbortOnFailure(group);
                        let result = rank.forward(batch).map(|_| ());
                        let first = result.is_err() && !group.aborted();
                        if result.is_err() {
                            group.abort();
                        }
                        (result, first)
                    })
                })
                .collect();
            let panicked = || Err(WorkerError::Engine("a tensor-parallel rank panicked during the step".into()));
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| (panicked(), true))).collect()
        });
        // Every rank has returned: the group can start afresh whatever happened.
        self.group.reset();
        first_failure(outcomes).map(|_| ())
    }
}

impl Model for TensorParallelCpu {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.ranks[0].num_blocks()
    }

    fn block_size(&self) -> usize {
        self.ranks[0].block_size()
    }

    fn describe(&self) -> String {
        format!("{} x {} (tensor parallel)", self.ranks.len(), self.ranks[0].describe())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<&[f32]> {
        self.run(batch)?;
        Ok(self.ranks[0].logits())
    }

    fn hidden_states(&self) -> &[f32] {
        self.ranks[0].hidden_states()
    }
}
