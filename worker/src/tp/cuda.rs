//! A tensor-parallel model on GPUs: N ranks of [`CudaLlama`], rank i on GPU `first + i`, meeting
//! over NCCL (or, for ranks that share one GPU, through the host: how a one-GPU machine runs
//! and tests a split model). One process, one thread per rank (architecture.md says why).
//!
//! Each step runs rank 0 on the calling thread (it reads the outputs back, reduces them for the
//! sampler and calls the engine's overlapped host work) and every other rank on a thread of its
//! own, all on the same batch, so all enter the same collectives.
//!
//! Invariants: as `tp::cpu` — every rank gets every step; a batch is validated once, before any
//! rank starts; a rank that fails aborts the group (its collectives and the start-up
//! agreement), so the step or the load returns the first rank's error instead of hanging. A
//! staged group is reset once every rank has returned; an NCCL communicator, once aborted, is
//! gone, so a step that failed on a rank fails every later step too and the replica is
//! replaced (its requests end with an error event, as for any failed engine).

use std::sync::Arc;

use super::ShardPlan;
use super::comm::LocalGroup;
use super::gpu_comm::RankComm;
use crate::model::llama_cuda::weights::WeightOrigin;
use crate::model::llama_cuda::{CudaLlama, CudaModelOptions, RankPart};
use crate::model::{ForwardBatch, LlamaConfig, Model};
use crate::sampling::reduce::{ReducedRows, RowPlan};
use crate::{Result, WorkerError};

/// `ranks` [`CudaLlama`] shards of one model.
pub struct TensorParallelCuda {
    ranks: Vec<CudaLlama>,
    agree: Arc<LocalGroup>,
}

/// The first error of the ranks', preferring a rank's own failure over "another rank failed".
fn first_error(outcomes: Vec<Result<()>>) -> Result<()> {
    let mut errors: Vec<WorkerError> = outcomes.into_iter().filter_map(|r| r.err()).collect();
    errors.sort_by_key(|e| e.to_string().contains("another rank failed"));
    errors.into_iter().next().map_or(Ok(()), Err)
}

impl TensorParallelCuda {
    /// Loads rank i on GPU `opts.ordinal + i` (or every rank on `opts.ordinal` when `shared`),
    /// all at once, each on a thread of its own.
    pub fn load(
        config: LlamaConfig,
        origin: &WeightOrigin<'_>,
        opts: &CudaModelOptions,
        ranks: usize,
        shared: bool,
    ) -> Result<Self> {
        if config.quantization.is_some() {
            return Err(WorkerError::invalid(
                "tensor_parallel_size",
                "a quantized checkpoint cannot be split over GPUs yet (float checkpoints can, also with --quantization fp8)",
            ));
        }
        let plans = ShardPlan::all(&config, ranks)?;
        if !config.vocab_size.is_multiple_of(ranks) {
            return Err(WorkerError::invalid(
                "tensor_parallel_size",
                format!("{ranks} GPUs do not divide the vocabulary of {} tokens evenly", config.vocab_size),
            ));
        }
        let devices: Vec<usize> = (0..ranks).map(|i| opts.ordinal + if shared { 0 } else { i }).collect();
        let comms = RankComm::group(&devices)?;
        let agree = Arc::new(LocalGroup::new(ranks));
        let parts = plans.into_iter().zip(comms).map(|(plan, comm)| RankPart {
            comm,
            plan,
            full: config.clone(),
            agree: agree.clone(),
        });
        let loaded: Vec<Result<CudaLlama>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .zip(&devices)
                .map(|(part, &ordinal)| {
                    let (config, agree) = (config.clone(), agree.clone());
                    let opts = CudaModelOptions { ordinal, ..opts.clone() };
                    s.spawn(move || {
                        let loaded = CudaLlama::load_rank(config, origin, &opts, part);
                        if loaded.is_err() {
                            // The others may wait for this rank in a forward or the agreement.
                            agree.abort();
                        }
                        loaded
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        agree.abort();
                        Err(WorkerError::Engine("a tensor-parallel rank panicked while loading".into()))
                    })
                })
                .collect()
        });
        let mut ranks = Vec::with_capacity(loaded.len());
        let mut failures = Vec::new();
        for result in loaded {
            match result {
                Ok(model) => ranks.push(model),
                Err(e) => failures.push(Err(e)),
            }
        }
        if !failures.is_empty() {
            for rank in &mut ranks {
                rank.abort_rank();
            }
            return Err(first_error(failures).expect_err("a rank failed"));
        }
        agree.reset();
        tracing::info!(ranks = ranks.len(), shared, "tensor-parallel model on GPUs");
        Ok(TensorParallelCuda { ranks, agree })
    }

    /// Runs `first` on rank 0 here and `rest` on every other rank, each on a thread of its own.
    fn run(
        &mut self,
        first: impl FnOnce(&mut CudaLlama) -> Result<()>,
        rest: impl Fn(&mut CudaLlama) -> Result<()> + Sync,
    ) -> Result<()> {
        // Every rank validates the batch first thing in its step, alike, so a bad batch fails
        // every rank before any collective.
        let (head, tail) = self.ranks.split_first_mut().expect("at least one rank");
        let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
            let rest = &rest;
            let handles: Vec<_> = tail
                .iter_mut()
                .map(|rank| {
                    s.spawn(move || {
                        let result = rest(rank);
                        if result.is_err() {
                            rank.abort_rank();
                        }
                        result
                    })
                })
                .collect();
            let mine = first(head);
            if mine.is_err() {
                head.abort_rank();
            }
            let mut all = vec![mine];
            all.extend(handles.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| Err(WorkerError::Engine("a tensor-parallel rank panicked".into())))
            }));
            all
        });
        let result = first_error(outcomes);
        if result.is_err() {
            // Staged groups can meet again once every rank has left; NCCL's stay aborted.
            self.agree.reset();
        }
        result
    }
}

impl Model for TensorParallelCuda {
    fn config(&self) -> &LlamaConfig {
        self.ranks[0].config()
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
        self.run(|m| m.forward(batch).map(|_| ()), |m| m.forward(batch).map(|_| ()))?;
        Ok(self.ranks[0].logits())
    }

    fn reduces_on_device(&self) -> bool {
        true
    }

    fn hidden_states(&self) -> &[f32] {
        self.ranks[0].hidden_states()
    }

    fn forward_reduced(&mut self, batch: &ForwardBatch, plans: &[RowPlan], out: &mut ReducedRows) -> Result<()> {
        self.forward_overlapped(batch, plans, out, &mut || {})
    }

    fn forward_overlapped(
        &mut self,
        batch: &ForwardBatch,
        plans: &[RowPlan],
        out: &mut ReducedRows,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<()> {
        self.run(
            |m| m.forward_overlapped(batch, plans, out, meanwhile),
            |m| m.forward_reduced(batch, &[], &mut ReducedRows::default()),
        )
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
