//! Replica health checks: every `health_check_period`, each running replica on a live worker is
//! probed with `Worker.CheckHealth`.
//!
//! Contract:
//! - The first probe of a replica comes one period after it started running (or was adopted);
//!   at most one probe per replica is in flight.
//! - A probe fails when the worker answers `healthy: false` (a stuck engine: busy but no step
//!   within `health_check_timeout`), answers an error, or does not answer within
//!   `health_check_timeout`. The replica then becomes `Failed` with the message
//!   `health check failed: ...`: it stops being routable at once, and the controller stops it
//!   (without draining: its requests are stuck) and places a replacement.
//! - A worker that does not implement `CheckHealth` (`UNIMPLEMENTED`) counts as healthy, so a
//!   head can manage workers of a release without it.

use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::Cluster;
use super::registry::{Phase, State};

/// A probe the controller decided on.
pub(super) struct Probe {
    replica_id: String,
    worker_id: String,
    period: Duration,
    timeout: Duration,
}

/// Marks the probes due at `now` as in flight and returns them; schedules the first probe of
/// replicas that just started running.
pub(super) fn due_probes(state: &mut State, now: Instant, deadline: Duration) -> Vec<Probe> {
    let mut due = Vec::new();
    let live: Vec<String> = state
        .replicas
        .values()
        .filter(|r| r.phase == Phase::Running && !r.health_check_in_flight)
        .filter(|r| state.worker_takes_work(&r.worker_id, now, deadline))
        .map(|r| r.id.clone())
        .collect();
    for id in live {
        let Some(replica) = state.replicas.get(&id) else { continue };
        let Some(spec) = state.deployment(&replica.deployment).map(|d| d.spec.clone()) else { continue };
        let Some(replica) = state.replicas.get_mut(&id) else { continue };
        match replica.next_health_check {
            None => replica.next_health_check = Some(later(now, spec.health_check_period)),
            Some(at) if at <= now => {
                replica.health_check_in_flight = true;
                due.push(Probe {
                    replica_id: id,
                    worker_id: replica.worker_id.clone(),
                    period: spec.health_check_period,
                    timeout: spec.health_check_timeout,
                });
            }
            Some(_) => {}
        }
    }
    due
}

/// `period` after `now`; a period too long to represent means "not in the next year".
fn later(now: Instant, period: Duration) -> Instant {
    now.checked_add(period).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl Cluster {
    /// Runs one probe and records its outcome.
    pub(super) async fn run_probe(&self, probe: Probe) {
        let outcome = self.check_health(&probe).await;
        let mut state = self.state();
        // A draining worker stops its replicas on purpose: not a failure to replace.
        let draining = state.worker_is_draining(&probe.worker_id);
        let Some(replica) = state.replicas.get_mut(&probe.replica_id) else { return };
        replica.health_check_in_flight = false;
        replica.next_health_check = Some(later(Instant::now(), probe.period));
        if let Err(reason) = outcome
            && replica.phase == Phase::Running
            && replica.worker_id == probe.worker_id
            && !draining
        {
            tracing::warn!(replica = %probe.replica_id, worker = %probe.worker_id, %reason,
                "health check failed; replacing the replica");
            replica.phase = Phase::Failed;
            replica.message = Some(format!("health check failed: {reason}"));
            drop(state);
            self.wake_controller();
        }
    }

    /// `Ok` when the replica is healthy, else why not.
    async fn check_health(&self, probe: &Probe) -> Result<(), String> {
        let mut client = self.worker_client(&probe.worker_id)?;
        let request = pb::CheckHealthRequest {
            replica_id: probe.replica_id.clone(),
            stall_timeout_ms: u32::try_from(probe.timeout.as_millis()).unwrap_or(u32::MAX),
        };
        match tokio::time::timeout(probe.timeout, client.check_health(request)).await {
            Err(_) => Err(format!("no answer within {} ms", probe.timeout.as_millis())),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!(worker = %probe.worker_id, "the worker does not implement CheckHealth");
                Ok(())
            }
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.healthy { Ok(()) } else { Err(reply.message) }
            }
        }
    }
}
