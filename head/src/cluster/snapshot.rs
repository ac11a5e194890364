//! A read-only copy of the cluster state for status APIs, metrics and the dashboard.
//!
//! Taken under the state lock in one go, so workers, deployments and replicas agree with each
//! other. Status names follow Ray Serve's strings (`as_ray_str`) where Ray has one.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::registry::{Deployment, Phase, State};

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
}

/// A deployment's health, as Ray Serve names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeploymentStatus {
    /// Replicas are being started or stopped towards the target.
    Updating,
    /// As many replicas run as desired.
    Healthy,
    /// Fewer replicas run than desired and nothing is starting to fix it (see `message`).
    Unhealthy,
}

impl DeploymentStatus {
    pub fn as_ray_str(self) -> &'static str {
        match self {
            Self::Updating => "UPDATING",
            Self::Healthy => "HEALTHY",
            Self::Unhealthy => "UNHEALTHY",
        }
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
    let workers = state
        .workers
        .values()
        .map(|w| WorkerSnapshot {
            id: w.id.clone(),
            address: w.address.clone(),
            resources: w.resources.clone(),
            lumen_version: w.lumen_version.clone(),
            alive: w.is_live(now, deadline),
            registered_unix_ms: w.registered_unix_ms,
            since_last_heartbeat: now.saturating_duration_since(w.last_seen),
            replica_ids: state.replicas.values().filter(|r| r.worker_id == w.id).map(|r| r.id.clone()).collect(),
        })
        .collect();
    let deployments = state
        .deployments()
        .map(|d| {
            let running = state.routable_replicas(&d.spec.name, now, deadline).count();
            let live = state.live_replicas(&d.spec.name, now, deadline).count();
            let desired = d.spec.num_replicas as usize;
            let status = if running == desired && live == desired {
                DeploymentStatus::Healthy
            } else if running < desired && live == running && d.message.is_some() {
                DeploymentStatus::Unhealthy
            } else {
                DeploymentStatus::Updating
            };
            DeploymentSnapshot {
                spec: d.spec.clone(),
                status,
                message: d.message.clone(),
                created_unix_s: d.created_unix_s,
                running_replicas: u32::try_from(running).unwrap_or(u32::MAX),
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
                Phase::Starting => ReplicaState::Starting,
                Phase::Running => ReplicaState::Running,
            },
            message: r.message.clone(),
            in_flight: r.in_flight.load(Ordering::Relaxed),
            info: r.info.clone(),
            stats: r.stats.clone(),
        })
        .collect();
    ClusterSnapshot { workers, deployments, replicas }
}
