//! The controller: a reconcile loop that makes the live replicas match the desired deployments.
//!
//! Each pass (every `reconcile_interval_ms`, at least once per heartbeat interval, and whenever
//! deployments or membership change):
//! 1. marks workers that missed their heartbeats dead (their replicas stop being routable and
//!    stop counting as live);
//! 2. per deployment with fewer live (starting or running) replicas than desired, places new
//!    replicas on live workers with room and calls `StartReplica` with a fresh id; a deployment
//!    that cannot be placed or whose start failed gets a `message` saying why, and failed starts
//!    back off exponentially;
//! 3. per deployment with more, stops the least busy running ones;
//! 4. stops replicas whose deployment was removed, and clears failed ones.
//!
//! Planning happens under the state lock and records its intent (a `Starting` or `Stopping`
//! replica) before the lock is released, so a pass never places the same replica twice; the
//! gRPC calls run in their own tasks and report back into the state.

use std::future::Future;
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::registry::{Phase, ReplicaEntry, State};
use super::{Cluster, random_u64};

/// The longest wait between retries of a failing deployment.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A gRPC call the pass decided on.
enum Action {
    Start {
        replica_id: String,
        worker_id: String,
        engine_options_json: String,
    },
    /// `restore`: the phase to go back to if the call fails, so the next pass decides again.
    Stop {
        replica_id: String,
        worker_id: String,
        restore: Phase,
    },
}

impl Cluster {
    /// Runs the reconcile loop until `shutdown` completes. Spawn it once per head.
    pub async fn run_controller(self, shutdown: impl Future<Output = ()> + Send) {
        let settings = self.settings();
        let period = Duration::from_millis(settings.reconcile_interval_ms.max(1)).min(settings.heartbeat_interval());
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
                () = self.inner.changed.notified() => {}
            }
            self.reconcile_once();
        }
    }

    /// One reconcile pass: plans under the lock, then spawns the calls.
    fn reconcile_once(&self) {
        let actions = {
            let mut state = self.state();
            let now = Instant::now();
            let deadline = self.settings().heartbeat_deadline();
            for worker_id in state.mark_silent_workers_dead(now, deadline) {
                tracing::warn!(worker = %worker_id, "worker missed its heartbeats; marked dead");
            }
            let mut actions = Vec::new();
            scale(&mut state, now, deadline, &mut actions);
            remove_orphans_and_failures(&mut state, now, deadline, &mut actions);
            actions
        };
        for action in actions {
            let cluster = self.clone();
            match action {
                Action::Start { replica_id, worker_id, engine_options_json } => {
                    tokio::spawn(
                        async move { cluster.start_replica(replica_id, worker_id, engine_options_json).await },
                    );
                }
                Action::Stop { replica_id, worker_id, restore } => {
                    tokio::spawn(async move { cluster.stop_replica(replica_id, worker_id, restore).await });
                }
            }
        }
    }

    async fn start_replica(&self, replica_id: String, worker_id: String, engine_options_json: String) {
        tracing::info!(replica = %replica_id, worker = %worker_id, "starting replica");
        let timeout = Duration::from_secs(self.settings().replica_start_timeout_s);
        let request = pb::StartReplicaRequest { replica_id: replica_id.clone(), engine_options_json };
        let outcome = match self.worker_client(&worker_id) {
            Err(message) => Err(message),
            Ok(mut client) => match tokio::time::timeout(timeout, client.start_replica(request)).await {
                Err(_) => Err(format!("it did not start within {timeout:?}")),
                Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                Ok(Ok(reply)) => {
                    let info = reply.into_inner();
                    if info.state == pb::ReplicaState::Failed as i32 { Err(info.message) } else { Ok(info) }
                }
            },
        };
        let mut state = self.state();
        match outcome {
            Ok(info) => record_started(&mut state, &replica_id, info),
            Err(message) => {
                tracing::warn!(replica = %replica_id, worker = %worker_id, error = %message, "replica failed to start");
                record_start_failure(&mut state, &replica_id, &worker_id, &message);
                drop(state);
                self.wake_controller();
            }
        }
    }

    async fn stop_replica(&self, replica_id: String, worker_id: String, restore: Phase) {
        tracing::info!(replica = %replica_id, worker = %worker_id, "stopping replica");
        let drain = self.settings().replica_drain_timeout_ms;
        let request = pb::StopReplicaRequest {
            replica_id: replica_id.clone(),
            drain_timeout_ms: u32::try_from(drain).unwrap_or(u32::MAX),
        };
        let grace = Duration::from_millis(drain) + Duration::from_secs(30);
        let result = match self.worker_client(&worker_id) {
            Err(message) => Err(message),
            Ok(mut client) => match tokio::time::timeout(grace, client.stop_replica(request)).await {
                Err(_) => Err(format!("no answer within {grace:?}")),
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(()),
                Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                Ok(Ok(_)) => Ok(()),
            },
        };
        let mut state = self.state();
        match result {
            Ok(()) => {
                state.replicas.remove(&replica_id);
            }
            Err(message) => {
                tracing::warn!(replica = %replica_id, worker = %worker_id, error = %message, "stopping replica failed");
                if let Some(replica) = state.replicas.get_mut(&replica_id)
                    && replica.phase == Phase::Stopping
                {
                    replica.phase = restore;
                    replica.message = Some(format!("stopping failed: {message}"));
                }
            }
        }
    }

    fn worker_client(
        &self,
        worker_id: &str,
    ) -> Result<pb::worker_client::WorkerClient<tonic::transport::Channel>, String> {
        let address = self.state().workers.get(worker_id).map(|w| w.address.clone());
        let address = address.ok_or_else(|| format!("worker `{worker_id}` is no longer registered"))?;
        self.inner.clients.client(worker_id, &address).map_err(|e| format!("worker address `{address}`: {e}"))
    }
}

/// Steps 2 and 3: start missing replicas, stop surplus ones.
fn scale(state: &mut State, now: Instant, deadline: Duration, actions: &mut Vec<Action>) {
    let specs: Vec<_> = state.deployments().map(|d| (d.spec.clone(), d.retry_at)).collect();
    for (spec, retry_at) in specs {
        let live = state.live_replicas(&spec.name, now, deadline).count();
        let running = state.routable_replicas(&spec.name, now, deadline).count();
        let desired = spec.num_replicas as usize;
        if running == desired
            && live == desired
            && let Some(d) = state.deployment_mut(&spec.name)
        {
            d.message = None;
            d.failures = 0;
        }
        if live < desired && retry_at.is_none_or(|at| now >= at) {
            for _ in live..desired {
                let Some(worker_id) = state.choose_worker(&spec.name, now, deadline) else {
                    let message = no_room_message(state, now, deadline, live, desired);
                    if let Some(d) = state.deployment_mut(&spec.name) {
                        d.message = Some(message);
                    }
                    break;
                };
                let replica_id = format!("{}-{:08x}", spec.name, random_u64() as u32);
                state.replicas.insert(
                    replica_id.clone(),
                    ReplicaEntry::new(replica_id.clone(), spec.name.clone(), worker_id.clone(), Phase::Starting),
                );
                actions.push(Action::Start {
                    replica_id,
                    worker_id,
                    engine_options_json: spec.engine_options_json.clone(),
                });
            }
        } else if live > desired {
            let mut surplus: Vec<(u64, String, String)> = state
                .routable_replicas(&spec.name, now, deadline)
                .map(|r| (r.load(), r.id.clone(), r.worker_id.clone()))
                .collect();
            surplus.sort();
            for (_, replica_id, worker_id) in surplus.into_iter().take(live - desired) {
                if let Some(replica) = state.replicas.get_mut(&replica_id) {
                    replica.phase = Phase::Stopping;
                }
                actions.push(Action::Stop { replica_id, worker_id, restore: Phase::Running });
            }
        }
    }
}

fn no_room_message(state: &State, now: Instant, deadline: Duration, live: usize, desired: usize) -> String {
    let workers = state.workers.values().filter(|w| w.is_live(now, deadline)).count();
    if workers == 0 {
        return format!("{live} of {desired} replicas placed: no live worker is registered");
    }
    format!(
        "{live} of {desired} replicas placed: none of the {workers} live workers has a free device \
         (a CUDA worker hosts one replica per device)"
    )
}

/// Step 4: stop replicas of removed deployments, clear failed replicas. Replicas on dead workers
/// are only forgotten (nobody to call); the worker reports them again if it comes back.
fn remove_orphans_and_failures(state: &mut State, now: Instant, deadline: Duration, actions: &mut Vec<Action>) {
    let doomed: Vec<(String, String, bool)> = state
        .replicas
        .values()
        .filter(|r| {
            let orphan = state.deployments_set && state.deployment(&r.deployment).is_none();
            r.phase == Phase::Failed || (orphan && matches!(r.phase, Phase::Running | Phase::Starting))
        })
        .map(|r| (r.id.clone(), r.worker_id.clone(), state.worker_is_live(&r.worker_id, now, deadline)))
        .collect();
    for (replica_id, worker_id, worker_live) in doomed {
        let Some(replica) = state.replicas.get(&replica_id) else { continue };
        if replica.phase == Phase::Failed {
            let reason = replica.message.clone().unwrap_or_else(|| "the replica failed".into());
            let deployment = replica.deployment.clone();
            if let Some(d) = state.deployment_mut(&deployment) {
                d.message = Some(format!("replica `{replica_id}` on worker `{worker_id}` failed: {reason}"));
            }
        }
        let Some(replica) = state.replicas.get_mut(&replica_id) else { continue };
        if worker_live && replica.phase != Phase::Starting {
            let restore = replica.phase;
            replica.phase = Phase::Stopping;
            actions.push(Action::Stop { replica_id, worker_id, restore });
        } else if !worker_live {
            state.replicas.remove(&replica_id);
        }
        // An orphan still starting is stopped once its start has answered.
    }
}

fn record_started(state: &mut State, replica_id: &str, info: pb::ReplicaInfo) {
    let Some(replica) = state.replicas.get_mut(replica_id) else { return };
    if replica.phase == Phase::Starting {
        replica.phase = Phase::Running;
    }
    replica.message = None;
    let deployment = replica.deployment.clone();
    if let Some(d) = state.deployment_mut(&deployment) {
        if d.spec.model_name != info.model_name {
            tracing::warn!(replica = %replica_id, deployment = %deployment, served = %info.model_name,
                expected = %d.spec.model_name, "replica serves another model name; routing by the deployment's");
        }
        d.failures = 0;
        d.retry_at = None;
    }
    if let Some(replica) = state.replicas.get_mut(replica_id) {
        replica.info = Some(info);
    }
}

fn record_start_failure(state: &mut State, replica_id: &str, worker_id: &str, message: &str) {
    let Some(replica) = state.replicas.remove(replica_id) else { return };
    let Some(d) = state.deployment_mut(&replica.deployment) else { return };
    d.failures = d.failures.saturating_add(1);
    d.retry_at = Some(Instant::now() + backoff(d.failures));
    d.message = Some(format!("replica `{replica_id}` failed to start on worker `{worker_id}`: {message}"));
}

/// 1 s, 2 s, 4 s, ... up to [`MAX_BACKOFF`] after `failures` consecutive failed starts.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
