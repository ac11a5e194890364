//! The controller: a reconcile loop that makes the live replicas match the desired deployments.
//!
//! Each pass (every `reconcile_interval_ms`, at least once per heartbeat interval, and whenever
//! deployments, membership or a replica's health change):
//! 1. marks workers that missed their heartbeats dead (their replicas stop being routable and
//!    stop counting as live);
//! 2. runs each autoscaled deployment's [`Autoscaler`](super::autoscaler) on its ongoing
//!    requests, which may move the deployment's target;
//! 3. per deployment, plans with [`rollout::plan`]: starts missing replicas on live workers with
//!    room ([`placement`]), drains surplus ones, and rolls replicas of an older version one at a
//!    time; a deployment that cannot be placed or whose start failed gets a `message` saying
//!    why, and failed starts back off exponentially;
//! 4. stops replicas whose deployment was removed, and failed ones (worker-reported or failed
//!    health checks), which step 3 of the next pass replaces;
//! 5. sends the health checks that are due ([`health`]).
//!
//! A replica's life, as the head sees it:
//!
//! ```text
//!   placed ──▶ Starting ──StartReplica ok──▶ Running ──scale-down / rollout──▶ Stopping ──▶ (gone)
//!                 │ start failed                │   (not routable; StopReplica drains for
//!                 ▼                             │    graceful_shutdown_timeout)
//!              (gone, backoff)                  ├─health check failed / worker reports failure─▶ Failed
//!                                               │                      (not routable) ──▶ Stopping (no drain)
//!                                               └─worker dead─▶ not live (not routable; forgotten
//!                                                               when the worker re-registers without it)
//! ```
//!
//! Planning happens under the state lock and records its intent (a `Starting` or `Stopping`
//! replica) before the lock is released, so a pass never places or stops the same replica twice;
//! the gRPC calls run in their own tasks and report back into the state.

use std::future::Future;
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::health::{self, Probe};
use super::placement;
use super::registry::{Phase, ReplicaEntry, State};
use super::rollout::{self, ReplicaView, RolloutProgress, Situation};
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
    /// `drain`: how long the worker lets the replica's requests finish.
    Stop {
        replica_id: String,
        worker_id: String,
        restore: Phase,
        drain: Duration,
    },
    Probe(Probe),
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
        let started = Instant::now();
        let actions = {
            let mut state = self.state();
            let now = Instant::now();
            let deadline = self.settings().heartbeat_deadline();
            for worker_id in state.mark_silent_workers_dead(now, deadline) {
                tracing::warn!(worker = %worker_id, "worker missed its heartbeats; marked dead");
            }
            autoscale(&mut state, now, deadline);
            let mut actions = Vec::new();
            let names: Vec<String> = state.deployments().map(|d| d.spec.name.clone()).collect();
            for name in names {
                reconcile_deployment(&mut state, &name, now, deadline, &mut actions);
            }
            let orphan_drain = Duration::from_millis(self.settings().replica_drain_timeout_ms);
            remove_orphans_and_failures(&mut state, now, deadline, orphan_drain, &mut actions);
            actions.extend(health::due_probes(&mut state, now, deadline).into_iter().map(Action::Probe));
            actions
        };
        self.inner.loops.reconciled(started);
        for action in actions {
            let cluster = self.clone();
            match action {
                Action::Start { replica_id, worker_id, engine_options_json } => {
                    tokio::spawn(
                        async move { cluster.start_replica(replica_id, worker_id, engine_options_json).await },
                    );
                }
                Action::Stop { replica_id, worker_id, restore, drain } => {
                    tokio::spawn(async move { cluster.stop_replica(replica_id, worker_id, restore, drain).await });
                }
                Action::Probe(probe) => {
                    tokio::spawn(async move { cluster.run_probe(probe).await });
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
                Ok(Err(status)) => Err(self.inner.clients.describe_failure(&worker_id, &status).await),
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

    async fn stop_replica(&self, replica_id: String, worker_id: String, restore: Phase, drain: Duration) {
        tracing::info!(replica = %replica_id, worker = %worker_id, drain_ms = drain.as_millis() as u64, "stopping replica");
        let request = pb::StopReplicaRequest {
            replica_id: replica_id.clone(),
            drain_timeout_ms: u32::try_from(drain.as_millis()).unwrap_or(u32::MAX),
        };
        let grace = drain.saturating_add(Duration::from_secs(30));
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

    pub(super) fn worker_client(
        &self,
        worker_id: &str,
    ) -> Result<pb::worker_client::WorkerClient<tonic::transport::Channel>, String> {
        let address = self.state().workers.get(worker_id).map(|w| w.address.clone());
        let address = address.ok_or_else(|| format!("worker `{worker_id}` is no longer registered"))?;
        self.inner.clients.client(worker_id, &address).map_err(|e| format!("worker address `{address}`: {e}"))
    }
}

/// Step 2: feeds each autoscaler its deployment's load and applies its decision.
fn autoscale(state: &mut State, now: Instant, deadline: Duration) {
    let loads: Vec<u64> = state.deployments().map(|d| state.ongoing_requests(&d.spec.name, now, deadline)).collect();
    for (entry, load) in state.deployments_mut().zip(loads) {
        let current = entry.target_replicas;
        let Some(autoscaler) = entry.autoscaler.as_mut() else { continue };
        autoscaler.observe(now, load as f64);
        let target = autoscaler.decide(now, current);
        entry.set_target(target);
    }
}

/// Step 3 for one deployment: plan, place the starts, drain the stops, explain the state.
fn reconcile_deployment(state: &mut State, name: &str, now: Instant, deadline: Duration, actions: &mut Vec<Action>) {
    let Some(entry) = state.deployment(name) else { return };
    let spec = entry.spec.clone();
    let version = entry.version;
    let target = entry.target_replicas as usize;
    let backing_off = entry.retry_at.is_some_and(|at| now < at);
    let views: Vec<ReplicaView> = state
        .live_replicas(name, now, deadline)
        .map(|r| ReplicaView {
            id: r.id.clone(),
            current: entry.is_current(r),
            running: r.is_running(),
            load: r.load(),
        })
        .collect();
    let situation = Situation {
        target,
        may_start: !backing_off,
        room_for_one: placement::choose_worker(state, &spec, now, deadline).is_some(),
        stopping: state.replicas.of_deployment(name).filter(|r| r.phase == Phase::Stopping).count(),
    };
    let plan = rollout::plan(&views, situation);

    let reason = if plan.rollout.is_some() { "rolling update" } else { "scale-down" };
    for replica_id in &plan.stop {
        drain_replica(state, replica_id, spec.graceful_shutdown_timeout, reason, actions);
    }
    let mut unplaced = None;
    for _ in 0..plan.start {
        let Some(worker_id) = placement::choose_worker(state, &spec, now, deadline) else {
            let placed = state.live_replicas(name, now, deadline).count();
            unplaced = Some(placement::no_room_message(state, &spec, now, deadline, placed, target));
            break;
        };
        let replica_id = format!("{}-{:08x}", spec.name, random_u64() as u32);
        let mut replica = ReplicaEntry::new(replica_id.clone(), spec.name.clone(), worker_id.clone(), Phase::Starting);
        replica.spec_version = Some(version);
        state.replicas.insert(replica);
        actions.push(Action::Start { replica_id, worker_id, engine_options_json: spec.engine_options_json.clone() });
    }

    let running = state.routable_replicas(name, now, deadline).count();
    let live = state.live_replicas(name, now, deadline).count();
    let draining = state.replicas.of_deployment(name).any(|r| r.phase == Phase::Stopping);
    let Some(entry) = state.deployment_mut(name) else { return };
    if let Some(message) = unplaced {
        entry.message = Some(message);
    } else if let Some(progress) = plan.rollout {
        if !backing_off {
            entry.message = Some(rollout_message(progress, target));
        }
    } else if running == target && live == target {
        entry.message = None;
        entry.failures = 0;
        if !draining {
            entry.scaling = None;
        }
    }
}

/// Takes a running replica out of routing and asks its worker to drain and stop it.
fn drain_replica(state: &mut State, replica_id: &str, drain: Duration, reason: &str, actions: &mut Vec<Action>) {
    let Some(replica) = state.replicas.get_mut(replica_id) else { return };
    if replica.phase != Phase::Running {
        return;
    }
    tracing::info!(replica = %replica_id, worker = %replica.worker_id, reason,
        in_flight = replica.in_flight.load(std::sync::atomic::Ordering::Relaxed), "draining replica");
    replica.phase = Phase::Stopping;
    actions.push(Action::Stop {
        replica_id: replica_id.to_owned(),
        worker_id: replica.worker_id.clone(),
        restore: Phase::Running,
        drain,
    });
}

fn rollout_message(progress: RolloutProgress, target: usize) -> String {
    let mut message = format!(
        "updating to a new version: {} of {target} replicas updated, {} still on an old version",
        progress.updated, progress.outdated
    );
    if progress.in_place {
        message.push_str("; no worker has room for an extra replica, so an old one is stopped first");
    }
    message
}

/// Step 4: stop replicas of removed deployments (draining them for `orphan_drain`), stop failed
/// replicas (no drain: their requests are stuck or gone). Replicas on dead workers are only
/// forgotten (nobody to call); the worker reports them again if it comes back.
fn remove_orphans_and_failures(
    state: &mut State,
    now: Instant,
    deadline: Duration,
    orphan_drain: Duration,
    actions: &mut Vec<Action>,
) {
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
            let drain = if restore == Phase::Failed { Duration::ZERO } else { orphan_drain };
            replica.phase = Phase::Stopping;
            actions.push(Action::Stop { replica_id, worker_id, restore, drain });
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
