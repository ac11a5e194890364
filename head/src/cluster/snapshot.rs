//! A read-only copy of the cluster state for status APIs, metrics and the dashboard.
//!
//! Taken under the state lock in one go, so workers, deployments and replicas agree with each
//! other. Status names follow Ray Serve's strings (`as_ray_str`) where Ray has one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::autoscaler::ScaleDirection;
use super::registry::{Deployment, DeploymentEntry, Phase, State};

#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub workers: Vec<WorkerSnapshot>,
    /// In the order they were set.
    pub deployments: Vec<DeploymentSnapshot>,
    /// Every replica the head knows, including those of removed deployments still stopping and
    /// those on dead workers.
    pub replicas: Vec<ReplicaSnapshot>,
}

#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    pub id: String,
    pub address: String,
    pub resources: pb::Resources,
    pub lumen_version: String,
    pub alive: bool,
    /// Alive but shutting down: finishing its requests, taking no new ones.
    pub draining: bool,
    pub registered_unix_ms: u64,
    pub since_last_heartbeat: Duration,
    pub replica_ids: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DeploymentSnapshot {
    pub spec: Deployment,
    pub status: DeploymentStatus,
    /// Why it is not fully running (placement or start failures), if it is not.
    pub message: Option<String>,
    pub created_unix_s: u64,
    /// Replicas that can take requests now.
    pub running_replicas: u32,
    /// Replicas wanted now: `num_replicas`, or the autoscaler's latest decision.
    pub target_replicas: u32,
}

/// A deployment's health, as Ray Serve names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeploymentStatus {
    /// Replicas are being started towards a new deployment's target, or replicas of an older
    /// version are being replaced (a rolling update; see `message`).
    Updating,
    /// As many replicas run as desired.
    Healthy,
    /// Fewer replicas run than desired and nothing is starting to fix it (see `message`).
    Unhealthy,
    /// The target went up (autoscaler or `num_replicas`) and replicas are being added, or wait
    /// for capacity (see `message`).
    Upscaling,
    /// The target went down and replicas are being drained.
    Downscaling,
}

impl DeploymentStatus {
    pub fn as_ray_str(self) -> &'static str {
        match self {
            Self::Updating => "UPDATING",
            Self::Healthy => "HEALTHY",
            Self::Unhealthy => "UNHEALTHY",
            Self::Upscaling => "UPSCALING",
            Self::Downscaling => "DOWNSCALING",
        }
    }
}

/// Replica counts of one deployment, as the status is decided from them.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    target: usize,
    /// Routable now.
    running: usize,
    /// Starting or running on live workers.
    live: usize,
    /// Live replicas on an older version.
    outdated: usize,
}

/// The status of a deployment with `counts`, the direction of its last target change (kept by
/// the controller until the target runs and no replica is draining) and whether the controller
/// recorded a problem.
fn status(counts: Counts, scaling: Option<ScaleDirection>, has_message: bool) -> DeploymentStatus {
    let Counts { target, running, live, outdated } = counts;
    if outdated > 0 {
        DeploymentStatus::Updating
    } else if let Some(direction) = scaling {
        match direction {
            ScaleDirection::Up => DeploymentStatus::Upscaling,
            ScaleDirection::Down => DeploymentStatus::Downscaling,
        }
    } else if running == target && live == target {
        DeploymentStatus::Healthy
    } else if running < target && live == running && has_message {
        DeploymentStatus::Unhealthy
    } else {
        DeploymentStatus::Updating
    }
}

fn counts(state: &State, d: &DeploymentEntry, now: Instant, deadline: Duration) -> Counts {
    let name = &d.spec.name;
    Counts {
        target: d.target_replicas as usize,
        running: state.routable_replicas(name, now, deadline).count(),
        live: state.live_replicas(name, now, deadline).count(),
        outdated: state.live_replicas(name, now, deadline).filter(|r| !d.is_current(r)).count(),
    }
}

#[derive(Clone, Debug)]
pub struct ReplicaSnapshot {
    pub replica_id: String,
    pub deployment: String,
    pub worker_id: String,
    pub state: ReplicaState,
    pub message: Option<String>,
    /// Requests the head has in flight on it.
    pub in_flight: u32,
    /// What the worker said when it started (model name, max_model_len, description).
    pub info: Option<pb::ReplicaInfo>,
    /// The latest heartbeat's numbers.
    pub stats: Option<pb::ReplicaStats>,
    /// When the head placed it (or adopted it from a worker's report), Unix seconds.
    pub start_time_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    Starting,
    Running,
    Stopping,
    Failed,
    /// Its worker missed its heartbeats; not routable.
    Unhealthy,
}

impl ReplicaState {
    /// Ray's replica state names (`FAILED` and `UNHEALTHY` are Lumen's: Ray replaces such replicas
    /// silently).
    pub fn as_ray_str(self) -> &'static str {
        match self {
            Self::Starting => "STARTING",
            Self::Running => "RUNNING",
            Self::Stopping => "STOPPING",
            Self::Failed => "FAILED",
            Self::Unhealthy => "UNHEALTHY",
        }
    }
}

pub(super) fn build(state: &State, deadline: Duration) -> ClusterSnapshot {
    let now = Instant::now();
    // Each worker's replicas, gathered in one pass (not one pass over the replicas per worker).
    let mut hosted: HashMap<&str, Vec<String>> = HashMap::new();
    for r in state.replicas.values() {
        hosted.entry(r.worker_id.as_str()).or_default().push(r.id.clone());
    }
    let workers = state
        .workers
        .values()
        .map(|w| WorkerSnapshot {
            id: w.id.clone(),
            address: w.address.clone(),
            resources: w.resources.clone(),
            lumen_version: w.lumen_version.clone(),
            alive: w.is_live(now, deadline),
            draining: w.is_live(now, deadline) && w.draining,
            registered_unix_ms: w.registered_unix_ms,
            since_last_heartbeat: now.saturating_duration_since(w.last_seen),
            replica_ids: hosted.remove(w.id.as_str()).unwrap_or_default(),
        })
        .collect();
    let deployments = state
        .deployments()
        .map(|d| {
            let counts = counts(state, d, now, deadline);
            DeploymentSnapshot {
                spec: d.spec.clone(),
                status: status(counts, d.scaling, d.message.is_some()),
                message: d.message.clone(),
                created_unix_s: d.created_unix_s,
                running_replicas: u32::try_from(counts.running).unwrap_or(u32::MAX),
                target_replicas: d.target_replicas,
            }
        })
        .collect();
    let replicas = state
        .replicas
        .values()
        .map(|r| ReplicaSnapshot {
            replica_id: r.id.clone(),
            deployment: r.deployment.clone(),
            worker_id: r.worker_id.clone(),
            state: match r.phase {
                Phase::Stopping => ReplicaState::Stopping,
                Phase::Failed => ReplicaState::Failed,
                _ if !state.worker_is_live(&r.worker_id, now, deadline) => ReplicaState::Unhealthy,
                _ if state.worker_is_draining(&r.worker_id) => ReplicaState::Stopping,
                Phase::Starting => ReplicaState::Starting,
                Phase::Running => ReplicaState::Running,
            },
            message: r.message.clone(),
            in_flight: r.in_flight.load(Ordering::Relaxed),
            info: r.info.clone(),
            stats: r.stats.clone(),
            start_time_s: r.created_unix_s,
        })
        .collect();
    ClusterSnapshot { workers, deployments, replicas }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(target: usize, running: usize, live: usize, outdated: usize) -> Counts {
        Counts { target, running, live, outdated }
    }

    #[test]
    fn statuses_follow_ray_serve() {
        use DeploymentStatus::*;
        assert_eq!(status(counts(2, 2, 2, 0), None, false), Healthy);
        assert_eq!(status(counts(2, 2, 2, 1), None, true), Updating, "a rolling update is in progress");
        assert_eq!(status(counts(3, 2, 3, 0), Some(ScaleDirection::Up), false), Upscaling);
        assert_eq!(status(counts(3, 2, 2, 0), Some(ScaleDirection::Up), true), Upscaling, "waiting for capacity");
        assert_eq!(status(counts(1, 1, 1, 0), Some(ScaleDirection::Down), false), Downscaling, "draining");
        assert_eq!(status(counts(2, 1, 1, 0), None, true), Unhealthy, "a lost replica cannot be placed");
        assert_eq!(status(counts(2, 1, 2, 0), None, false), Updating, "a replacement is starting");
    }
}
