//! A tensor-parallel model on the CPU: N ranks of [`CpuLlama`], each a thread for the length of
//! a step, meeting in a [`LocalGroup`]. It computes what one `CpuLlama` computes (to f32
//! rounding: see `tp`), so it is the reference the GPU ranks' sharding and collectives are
//! checked against, and it serves `--tensor-parallel-size N --device cpu`.
//!
//! Invariants: every rank gets the same batch each step (so all enter the same collectives);
//! rank 0's logits and hidden states are the model's (every rank's are equal); a rank that fails
//! aborts the group, so the step returns an error and never hangs. After a failed step the
//! group stays aborted and every later step fails: the replica must be replaced.

use std::sync::Arc;

use super::ShardPlan;
use super::comm::{AbortOnFailure, LocalGroup};
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
        let per_rank = CpuModelOptions { threads: (opts.threads / ranks).max(1), ..opts.clone() };
        let ranks = plans
            .into_iter()
            .map(|plan| CpuLlama::load_rank(&config, src, &per_rank, plan, group.clone()))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(ranks = ranks.len(), threads_per_rank = per_rank.threads, "tensor-parallel model on the CPU");
        Ok(TensorParallelCpu { config, ranks, group })
    }

    /// Runs the step on every rank (rank 0 on this thread).
    fn run(&mut self, batch: &ForwardBatch) -> Result<()> {
        if self.group.aborted() {
            return Err(WorkerError::Engine(
                "a tensor-parallel rank failed earlier: the model must be reloaded".into(),
            ));
        }
        // A bad batch fails here, for every rank alike, and leaves the group usable.
        self.ranks[0].validate(batch)?;
        let group = &self.group;
        let (first, rest) = self.ranks.split_first_mut().expect("at least one rank");
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let others: Vec<_> = rest
                .iter_mut()
                .map(|rank| {
                    s.spawn(move || {
                        let _abort = AbortOnFailure(group);
                        rank.forward(batch).map(|_| ())
                    })
                })
                .collect();
            let mine = {
                let _abort = AbortOnFailure(group);
                first.forward(batch).map(|_| ())
            };
            let mut all = vec![mine];
            for h in others {
                all.push(h.join().unwrap_or_else(|_| {
                    Err(WorkerError::Engine("a tensor-parallel rank panicked during the step".into()))
                }));
            }
            all
        });
        // A rank's own error (not "another rank failed") is the one worth reporting.
        let mut first_err = None;
        for e in results.into_iter().filter_map(|r| r.err()) {
            if first_err.is_none() || !e.to_string().contains("another tensor-parallel rank") {
                first_err = Some(e);
            }
        }
        match first_err {
            Some(e) => {
                self.group.abort();
                Err(e)
            }
            None => Ok(()),
        }
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
