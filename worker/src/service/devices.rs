//! Which of this worker's GPUs each replica runs on.
//!
//! The head places a GPU replica on a worker that has enough free devices (it counts them from
//! the worker's advertised `device_count`) but does not say which: a replica whose `device` is
//! plain `cuda` gets the lowest-numbered run of free GPUs here (`tensor_parallel_size` of them,
//! one today), and its engine loads on `cuda:K`, the first of them. So several single-GPU
//! replicas on a multi-GPU node (four 8B replicas on a g5.12xlarge) each get their own GPU
//! instead of all loading on GPU 0.
//!
//! Contracts: a replica holds its GPUs from its start until it is forgotten (stopped, or its
//! start failed): `release` is idempotent. A `device` naming an ordinal (`cuda:N`) is taken as
//! given, holding `N..` (the operator decided; sharing a GPU that way is allowed). A worker that
//! advertised no GPUs assigns nothing (the load then fails with the engine's own message). When
//! no run of free GPUs is long enough, the start fails naming the GPUs and who holds them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use lumen_proto::v1 as pb;

use crate::WorkerError;
use crate::engine::EngineOptions;
use crate::engine::options::ComputeDevice;

/// This worker's GPUs and the replicas holding them.
pub struct DevicePool {
    count: usize,
    held: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl DevicePool {
    /// The GPUs `resources` advertise (none for a CPU worker).
    pub fn new(resources: &pb::Resources) -> DevicePool {
        let count =
            if resources.device_kind.eq_ignore_ascii_case("cuda") { resources.device_count as usize } else { 0 };
        DevicePool { count, held: Mutex::new(BTreeMap::new()) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<usize>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives replica `id` its GPUs, writing the first into `options.device` when it is plain
    /// `cuda`; a CPU replica gets none.
    pub fn assign(&self, id: &str, options: &mut EngineOptions) -> Result<(), WorkerError> {
        let wanted = options.tensor_parallel_size.max(1);
        let first = match options.compute_device()? {
            ComputeDevice::Cpu => return Ok(()),
            ComputeDevice::Cuda(_) if self.count == 0 => return Ok(()),
            ComputeDevice::Cuda(n) if options.device != "cuda" => n,
            ComputeDevice::Cuda(_) => {
                let held = self.held();
                let busy = |g: usize| held.values().any(|gpus| gpus.contains(&g));
                let free_run = (0..=self.count.saturating_sub(wanted)).find(|&k| (k..k + wanted).all(|g| !busy(g)));
                let Some(k) = free_run else {
                    let holders: Vec<String> = held.iter().map(|(r, g)| format!("{r} holds {g:?}")).collect();
                    return Err(WorkerError::invalid(
                        "device",
                        format!(
                            "this worker's {} GPU(s) have no {wanted} free in a row ({})",
                            self.count,
                            if holders.is_empty() { "none held".to_string() } else { holders.join(", ") }
                        ),
                    ));
                };
                options.device = format!("cuda:{k}");
                k
            }
        };
        self.held().insert(id.to_string(), (first..first + wanted).collect());
        Ok(())
    }

    /// Frees replica `id`'s GPUs (nothing if it holds none).
    pub fn release(&self, id: &str) {
        self.held().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(kind: &str, count: u32) -> DevicePool {
        DevicePool::new(&pb::Resources { device_kind: kind.into(), device_count: count, ..Default::default() })
    }

    fn on(device: &str, ranks: usize) -> EngineOptions {
        EngineOptions { device: device.into(), tensor_parallel_size: ranks, ..EngineOptions::default() }
    }

    #[test]
    fn plain_cuda_replicas_get_a_gpu_each_and_freed_gpus_are_reused() {
        let p = pool("cuda", 4);
        let mut got = Vec::new();
        for id in ["a", "b", "c", "d"] {
            let mut o = on("cuda", 1);
            p.assign(id, &mut o).unwrap();
            got.push(o.device);
        }
        assert_eq!(got, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
        let err = p.assign("e", &mut on("cuda", 1)).unwrap_err().to_string();
        assert!(err.contains("`device`") && err.contains("4 GPU(s)") && err.contains("b holds [1]"), "{err}");
        p.release("b");
        p.release("b");
        let mut o = on("cuda", 1);
        p.assign("e", &mut o).unwrap();
        assert_eq!(o.device, "cuda:1");
    }

    #[test]
    fn a_tensor_parallel_replica_takes_a_run_of_free_gpus() {
        let p = pool("cuda", 4);
        p.assign("one", &mut on("cuda", 1)).unwrap(); // GPU 0
        let mut o = on("cuda", 2);
        p.assign("pair", &mut o).unwrap();
        assert_eq!(o.device, "cuda:1", "GPUs 1 and 2");
        assert!(p.assign("pair2", &mut on("cuda", 2)).is_err(), "only GPU 3 is left");
        let mut o = on("cuda", 1);
        p.assign("last", &mut o).unwrap();
        assert_eq!(o.device, "cuda:3");
    }

    #[test]
    fn explicit_ordinals_cpu_replicas_and_gpu_less_workers_are_left_alone() {
        let p = pool("cuda", 2);
        let mut o = on("cuda:1", 1);
        p.assign("pinned", &mut o).unwrap();
        assert_eq!(o.device, "cuda:1");
        let mut o = on("cuda", 1);
        p.assign("auto", &mut o).unwrap();
        assert_eq!(o.device, "cuda:0", "GPU 1 is held by the pinned replica");
        let mut o = on("cpu", 1);
        p.assign("cpu", &mut o).unwrap();
        assert_eq!(o.device, "cpu");
        let cpu_worker = pool("cpu", 1);
        let mut o = on("cuda", 1);
        cpu_worker.assign("x", &mut o).unwrap();
        assert_eq!(o.device, "cuda", "nothing to assign: the engine's own error follows");
    }
}
