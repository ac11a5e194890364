//! Where a new replica goes: which live workers (not draining) have room for one replica of a deployment, and
//! what to say when none has.
//!
//! Contract:
//! - A replica needing GPUs (`gpus_per_replica > 0`) takes `ceil(gpus_per_replica)` whole
//!   devices of a CUDA worker; it never goes to a CPU worker.
//! - A CPU replica (0 GPUs) goes to a CPU worker, which hosts any number of them unless they
//!   reserve cores (`num_cpus`): then their reservations fit in the worker's cores; failing
//!   that, it takes a free device of a CUDA worker (whose engines run on its GPUs).
//! - `max_replicas_per_node` caps the replicas of one deployment on one worker, whatever the
//!   device.
//! - On a CUDA worker every replica it hosts holds its devices until it is gone, whatever its
//!   phase (a stopping or failed engine still holds the GPU memory).
//! - Among the workers that fit: CPU workers first for CPU replicas, then the fewest replicas of
//!   the same deployment (spread), then the fewest replicas overall.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::registry::{Deployment, State, WorkerEntry};

/// Devices one replica of `spec` holds on a CUDA worker.
fn devices_needed(spec: Option<&Deployment>) -> u32 {
    match spec {
        Some(d) if d.gpus_per_replica.is_finite() && d.gpus_per_replica > 0.0 => {
            (d.gpus_per_replica.ceil() as u32).max(1)
        }
        _ => 1,
    }
}

fn needs_gpus(spec: &Deployment) -> bool {
    spec.gpus_per_replica.is_finite() && spec.gpus_per_replica > 0.0
}

/// What one worker hosts: its replicas, those of the deployment being placed, the devices they
/// hold (on a CUDA worker) and the cores they reserve.
#[derive(Clone, Copy, Debug, Default)]
struct Hosted {
    replicas: usize,
    same: usize,
    devices: u32,
    cpus: f64,
}

/// Every worker's [`Hosted`] for placing a replica of `spec`, in one pass over the replicas:
/// placement looks at every worker, and a pass per worker would make it O(workers x replicas).
fn hosting<'a>(state: &'a State, spec: &Deployment) -> HashMap<&'a str, Hosted> {
    let mut by_worker: HashMap<&str, Hosted> = HashMap::new();
    for r in state.replicas.values() {
        let deployment = state.deployment(&r.deployment).map(|d| &d.spec);
        let hosted = by_worker.entry(r.worker_id.as_str()).or_default();
        hosted.replicas += 1;
        hosted.same += usize::from(r.deployment == spec.name);
        hosted.devices += devices_needed(deployment);
        hosted.cpus += deployment.map_or(0.0, |d| d.cpus_per_replica);
    }
    by_worker
}

fn hosted_by(hosting: &HashMap<&str, Hosted>, worker: &WorkerEntry) -> Hosted {
    hosting.get(worker.id.as_str()).copied().unwrap_or_default()
}

fn free_devices(worker: &WorkerEntry, hosted: Hosted) -> u32 {
    worker.resources.device_count.max(1).saturating_sub(hosted.devices)
}

fn cpus_free(worker: &WorkerEntry, hosted: Hosted) -> f64 {
    (f64::from(worker.resources.cpu_cores) - hosted.cpus).max(0.0)
}

/// Whether the worker already hosts as many replicas of `spec` as `max_replicas_per_node` allows.
fn at_node_cap(hosted: Hosted, spec: &Deployment) -> bool {
    spec.max_replicas_per_node.is_some_and(|cap| hosted.same >= cap as usize)
}

/// Whether `worker` can take one more replica of `spec`.
fn fits(worker: &WorkerEntry, hosted: Hosted, spec: &Deployment) -> bool {
    if at_node_cap(hosted, spec) {
        return false;
    }
    if worker.is_cuda() {
        free_devices(worker, hosted) >= devices_needed(Some(spec))
    } else {
        !needs_gpus(spec) && (spec.cpus_per_replica <= 0.0 || cpus_free(worker, hosted) >= spec.cpus_per_replica)
    }
}

/// The live worker to place one more replica of `spec` on, if any has room.
pub(super) fn choose_worker(state: &State, spec: &Deployment, now: Instant, deadline: Duration) -> Option<String> {
    let hosting = hosting(state, spec);
    state
        .workers
        .values()
        .filter(|w| w.takes_work(now, deadline))
        .map(|w| (w, hosted_by(&hosting, w)))
        .filter(|&(w, hosted)| fits(w, hosted, spec))
        .map(|(w, hosted)| ((w.is_cuda(), hosted.same, hosted.replicas), &w.id))
        .min()
        .map(|(_, id)| id.clone())
}

/// Why no more replicas of `spec` could be placed (`placed` of `target` are).
pub(super) fn no_room_message(
    state: &State,
    spec: &Deployment,
    now: Instant,
    deadline: Duration,
    placed: usize,
    target: usize,
) -> String {
    let live: Vec<&WorkerEntry> = state.workers.values().filter(|w| w.takes_work(now, deadline)).collect();
    let hosting = hosting(state, spec);
    let prefix = format!("waiting for capacity: {placed} of {target} replicas placed");
    if live.is_empty() {
        return format!("{prefix}; no live worker is registered");
    }
    if let Some(cap) = spec.max_replicas_per_node
        && live.iter().all(|w| at_node_cap(hosted_by(&hosting, w), spec))
    {
        return format!(
            "{prefix}; max_replicas_per_node is {cap} and each of the {} live workers has that many",
            live.len()
        );
    }
    let cuda: Vec<&&WorkerEntry> = live.iter().filter(|w| w.is_cuda()).collect();
    if needs_gpus(spec) {
        let needed = devices_needed(Some(spec));
        if cuda.is_empty() {
            return format!(
                "{prefix}; each replica needs {needed} GPU device(s) and none of the {} live workers has GPUs",
                live.len()
            );
        }
        let free: u32 = cuda.iter().map(|w| free_devices(w, hosted_by(&hosting, w))).sum();
        return format!(
            "{prefix}; each replica needs {needed} free GPU device(s) on one worker and the {} live CUDA \
             workers have {free} free (a device hosts one replica)",
            cuda.len()
        );
    }
    let cpu_workers = live.len() - cuda.len();
    if cpu_workers > 0 && spec.cpus_per_replica > 0.0 {
        let most_free =
            live.iter().filter(|w| !w.is_cuda()).map(|w| cpus_free(w, hosted_by(&hosting, w))).fold(0.0, f64::max);
        return format!(
            "{prefix}; each replica reserves {} CPU cores and the most any of the {cpu_workers} live CPU \
             workers has free is {most_free}",
            spec.cpus_per_replica
        );
    }
    format!(
        "{prefix}; no live CPU worker, and none of the {} live CUDA workers has a free device \
         (a device hosts one replica)",
        cuda.len()
    )
}

#[cfg(test)]
mod tests {
    use lumen_proto::v1 as pb;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(3);

    fn deployment(name: &str, model: &str, gpus: f64) -> Deployment {
        Deployment {
            name: name.into(),
            model_name: model.into(),
            engine_options_json: "{}".into(),
            gpus_per_replica: gpus,
            ..Deployment::default()
        }
    }

    fn register(state: &mut State, id: &str, kind: &str, devices: u32, replicas: &[(&str, &str)]) {
        let req = pb::RegisterRequest {
            worker_id: id.into(),
            address: format!("http://{id}"),
            resources: Some(pb::Resources { device_kind: kind.into(), device_count: devices, ..Default::default() }),
            replicas: replicas
                .iter()
                .map(|(rid, model)| pb::ReplicaInfo {
                    replica_id: (*rid).into(),
                    model_name: (*model).into(),
                    state: pb::ReplicaState::Running as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        state.register_worker(&req, Instant::now());
    }

    fn choose(state: &State, spec: &Deployment) -> Option<String> {
        choose_worker(state, spec, Instant::now(), DEADLINE)
    }

    #[test]
    fn a_gpu_replica_takes_a_free_device_of_a_cuda_worker_only() {
        let llm = deployment("llm", "m", 1.0);
        let mut state = State::default();
        state.set_deployments(vec![llm.clone()]);
        register(&mut state, "cpu", "cpu", 1, &[]);
        assert_eq!(choose(&state, &llm), None, "a CPU worker has no GPU");
        let message = no_room_message(&state, &llm, Instant::now(), DEADLINE, 0, 1);
        assert!(message.starts_with("waiting for capacity: 0 of 1") && message.contains("GPU"), "{message}");
        register(&mut state, "gpu", "cuda", 2, &[("llm-1", "m")]);
        assert_eq!(choose(&state, &llm).as_deref(), Some("gpu"), "one of two devices is free");
        register(&mut state, "gpu", "cuda", 2, &[("llm-1", "m"), ("llm-2", "m")]);
        assert_eq!(choose(&state, &llm), None);
        let message = no_room_message(&state, &llm, Instant::now(), DEADLINE, 2, 3);
        assert!(message.contains("have 0 free"), "{message}");
    }

    #[test]
    fn a_two_gpu_replica_needs_two_free_devices_on_one_worker() {
        let big = deployment("big", "b", 2.0);
        let mut state = State::default();
        state.set_deployments(vec![big.clone()]);
        register(&mut state, "one", "cuda", 1, &[]);
        assert_eq!(choose(&state, &big), None);
        register(&mut state, "two", "cuda", 2, &[]);
        assert_eq!(choose(&state, &big).as_deref(), Some("two"));
    }

    #[test]
    fn cpu_replicas_share_a_cpu_worker_and_fall_back_to_a_free_gpu_device() {
        let small = deployment("llm", "m", 0.0);
        let mut state = State::default();
        state.set_deployments(vec![small.clone()]);
        register(&mut state, "gpu", "cuda", 1, &[]);
        assert_eq!(choose(&state, &small).as_deref(), Some("gpu"), "no CPU worker: a free device serves");
        register(&mut state, "cpu", "cpu", 1, &[("llm-2", "m"), ("llm-3", "m")]);
        assert_eq!(choose(&state, &small).as_deref(), Some("cpu"), "CPU workers first, however busy");
        register(&mut state, "gpu", "cuda", 1, &[("llm-1", "m")]);
        state.workers.remove("cpu");
        assert_eq!(choose(&state, &small), None, "the device is taken");
    }

    #[test]
    fn cpu_replicas_that_reserve_cores_fit_in_the_workers_cores() {
        let llm = Deployment { cpus_per_replica: 3.0, ..deployment("llm", "m", 0.0) };
        let mut state = State::default();
        state.set_deployments(vec![llm.clone()]);
        register(&mut state, "a", "cpu", 1, &[("llm-1", "m"), ("llm-2", "m")]);
        state.workers.get_mut("a").unwrap().resources.cpu_cores = 8;
        assert_eq!(choose(&state, &llm), None, "6 of 8 cores are reserved; a third replica needs 3");
        let message = no_room_message(&state, &llm, Instant::now(), DEADLINE, 2, 3);
        assert!(message.contains("reserves 3 CPU cores") && message.contains("free is 2"), "{message}");
        state.workers.get_mut("a").unwrap().resources.cpu_cores = 9;
        assert_eq!(choose(&state, &llm).as_deref(), Some("a"));
    }

    #[test]
    fn max_replicas_per_node_caps_a_deployment_on_each_worker() {
        let llm = Deployment { max_replicas_per_node: Some(1), ..deployment("llm", "m", 0.0) };
        let mut state = State::default();
        state.set_deployments(vec![llm.clone(), deployment("other", "o", 0.0)]);
        register(&mut state, "a", "cpu", 1, &[("llm-1", "m")]);
        register(&mut state, "b", "cpu", 1, &[("other-1", "o")]);
        assert_eq!(choose(&state, &llm).as_deref(), Some("b"), "other deployments do not count");
        register(&mut state, "b", "cpu", 1, &[("other-1", "o"), ("llm-2", "m")]);
        assert_eq!(choose(&state, &llm), None);
        let message = no_room_message(&state, &llm, Instant::now(), DEADLINE, 2, 3);
        assert!(message.contains("max_replicas_per_node is 1"), "{message}");
    }

    #[test]
    fn placement_spreads_a_deployment_across_workers() {
        let llm = deployment("llm", "m", 0.0);
        let mut state = State::default();
        state.set_deployments(vec![llm.clone(), deployment("other", "o", 0.0)]);
        register(&mut state, "a", "cpu", 1, &[("llm-1", "m")]);
        register(&mut state, "b", "cpu", 1, &[("other-1", "o"), ("other-2", "o")]);
        assert_eq!(choose(&state, &llm).as_deref(), Some("b"));
    }
}
