//! A tensor-parallel model on GPUs: N ranks of [`CudaLlama`], rank i on GPU `first + i`, meeting
//! over NCCL (or, for ranks that share one GPU, through the host: how a one-GPU machine runs
//! and tests a split model). One process, one thread per rank (architecture.md says why).
//!
//! Each step runs rank 0 on the calling thread (it reads the outputs back, reduces them for the
//! sampler and calls the engine's overlapped host work) and every other rank on a thread of its
//! own, all on the same batch, so all enter the same collectives.
//!
//! Invariants: as `tp::cpu` — every rank gets every step; a batch is validated once, before any
//! rank starts (a bad batch fails the step and nothing else); a rank that fails or panics
//! aborts every rank's end of the collectives and the start-up agreement (an NCCL abort
//! releases only its own communicator's kernels, so all are aborted), so the step or the load
//! returns the first rank's error instead of hanging. A staged group is reset once every rank
//! has returned; NCCL communicators, once aborted, are gone, so after a rank failed in a step
//! every later step fails too and the replica is replaced (its requests end with an error
//! event, as for any failed engine). Ranks are threads started per step (a persistent thread
//! per rank would save their start: not yet measured).

use std::sync::Arc;

use super::comm::LocalGroup;
use super::gpu_comm::{CommHandle, RankComm};
use super::{ShardPlan, first_failure};
use crate::model::llama_cuda::weights::WeightOrigin;
use crate::model::llama_cuda::{CudaLlama, CudaModelOptions, RankPart};
use crate::model::{ForwardBatch, LlamaConfig, Model};
use crate::sampling::reduce::{ReducedRows, RowPlan};
use crate::{Result, WorkerError};

/// `ranks` [`CudaLlama`] shards of one model.
pub struct TensorParallelCuda {
    ranks: Vec<CudaLlama>,
    /// The ranks' start-up agreements, and every rank's end of the collectives: aborted
    /// together when a rank fails.
    stop: Stop,
}

/// What releases every rank when one fails.
struct Stop {
    agree: Arc<LocalGroup>,
    comms: Vec<CommHandle>,
}

impl Stop {
    fn abort(&self) {
        self.agree.abort();
        self.comms.iter().for_each(CommHandle::abort);
    }

    /// Once every rank has left: staged groups meet again (NCCL's stay aborted).
    fn reset(&self) {
        self.agree.reset();
        self.comms.iter().for_each(CommHandle::reset);
    }

    /// Runs `work` for one rank; its failure or panic aborts every rank. Also says whether this
    /// rank failed first (before any abort), for [`first_failure`].
    fn guard<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> (Result<T>, bool) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(WorkerError::Engine(format!("a tensor-parallel rank panicked {what}"))));
        let first = outcome.is_err() && !self.agree.aborted();
        if outcome.is_err() {
            self.abort();
        }
        (outcome, first)
    }
}

impl TensorParallelCuda {
    /// Loads rank i on GPU `opts.ordinal + i` (or every rank on `opts.ordinal` when `shared`,
    /// each with its share of `gpu_memory_utilization`), all at once, each on a thread of its
    /// own.
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
        let stop = Stop { agree: agree.clone(), comms: comms.iter().map(RankComm::handle).collect() };
        let utilization = if shared { opts.gpu_memory_utilization / ranks as f64 } else { opts.gpu_memory_utilization };
        let parts = plans.into_iter().zip(comms).map(|(plan, comm)| RankPart {
            comm,
            plan,
            full: config.clone(),
            agree: agree.clone(),
        });
        let loaded: Vec<(Result<CudaLlama>, bool)> = std::thread::scope(|s| {
            let stop = &stop;
            let handles: Vec<_> = parts
                .zip(&devices)
                .map(|(part, &ordinal)| {
                    let config = config.clone();
                    let opts = CudaModelOptions { ordinal, gpu_memory_utilization: utilization, ..opts.clone() };
                    s.spawn(move || stop.guard("while loading", || CudaLlama::load_rank(config, origin, &opts, part)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("guarded")).collect()
        });
        let models = first_failure(loaded)?;
        tracing::info!(ranks, shared, "tensor-parallel model on GPUs");
        Ok(TensorParallelCuda { ranks: models, stop })
    }

    /// Runs `first` on rank 0 here and `rest` on every other rank, each on a thread of its own.
    fn run(
        &mut self,
        batch: &ForwardBatch,
        first: impl FnOnce(&mut CudaLlama) -> Result<()>,
        rest: impl Fn(&mut CudaLlama) -> Result<()> + Sync,
    ) -> Result<()> {
        let TensorParallelCuda { ranks, stop } = self;
        let (head, tail) = ranks.split_first_mut().expect("at least one rank");
        // A bad batch fails here, for every rank alike, before any collective (and without
        // aborting the group: the next step is fine).
        head.validate(batch)?;
        let outcomes: Vec<(Result<()>, bool)> = std::thread::scope(|s| {
            let (rest, stop) = (&rest, &*stop);
            let handles: Vec<_> =
                tail.iter_mut().map(|rank| s.spawn(move || stop.guard("during a step", || rest(rank)))).collect();
            let mut all = vec![stop.guard("during a step", || first(head))];
            all.extend(handles.into_iter().map(|h| h.join().expect("guarded")));
            all
        });
        let result = first_failure(outcomes).map(|_| ());
        if result.is_err() {
            stop.reset();
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
        self.run(batch, |m| m.forward(batch).map(|_| ()), |m| m.forward(batch).map(|_| ()))?;
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
            batch,
            |m| m.forward_overlapped(batch, plans, out, meanwhile),
            |m| m.forward_reduced(batch, &[], &mut ReducedRows::default()),
        )
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
