//! The cluster: desired deployments, worker membership, the controller that places replicas, and
//! the router that sends requests to them. [`Cluster`] implements [`crate::backend::Backend`].
//!
//! ```text
//! set_deployments ──▶ State (one mutex) ◀── Head service (Register, Heartbeat streams)
//!                       │      ▲
//!        run_controller ┘      └ router: pick a replica (power of two choices) ──▶ Worker gRPC
//!   (StartReplica / StopReplica / CheckHealth)
//! ```
//!
//! The controller (`controller`) reconciles on every pass: the autoscaler (`autoscaler`) moves
//! a deployment's target, the replica plan (`rollout`) scales or rolls a changed deployment one
//! replica at a time, placement (`placement`) finds a worker with room, and health checks
//! (`health`) turn a stuck replica into a failed one that is replaced. Replica phases:
//! `Starting -> Running -> Stopping -> gone`, with `Running -> Failed -> Stopping` for a failed
//! health check or a failure the worker reports; only `Running` replicas are routable, so a
//! drained (scale-down, rollout) or failed replica takes no new request from the moment it is
//! chosen.
//!
//! Invariants:
//! - All cluster state lives in one `registry::State` behind one `std::sync::Mutex`; the lock is
//!   never held across an `.await`, so every gRPC call is made after the lock is released.
//! - A replica is routable only while it is `Running`, its deployment exists, and its worker is
//!   alive (registered and heard from within [`MISSED_HEARTBEATS`] heartbeat intervals) and not
//!   draining. Worker states: alive, draining (it got SIGTERM and said so in a heartbeat: it
//!   finishes its requests, takes no new ones or replicas, and its replicas are replaced
//!   elsewhere at once), dead (silent past the deadline, or its stream ended after draining).
//! - Replica ids are `{deployment}-{8 hex digits}`, minted by the controller; a worker that
//!   re-registers reports the replicas it hosts and the head adopts them by that id.
//! - The head counts its own in-flight requests per replica with a guard that lives inside the
//!   returned event stream, so a dropped stream both cancels the gRPC call and releases the count.

mod affinity;
mod autoscaler;
mod controller;
mod forward;
mod head_service;
mod health;
mod loop_time;
mod metrics;
mod placement;
mod registry;
mod replica_client;
mod replica_table;
mod rollout;
mod router;
mod snapshot;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

pub use head_service::{serve_head, serve_head_tls};
pub use metrics::ClusterMetrics;
pub use registry::Deployment;
pub use snapshot::{
    ClusterSnapshot, DeploymentSnapshot, DeploymentStatus, ReplicaSnapshot, ReplicaState, WorkerSnapshot,
};

use registry::State;
use replica_client::ClientPool;

/// A worker silent for this many heartbeat intervals is marked dead.
pub const MISSED_HEARTBEATS: u32 = 3;

/// The shortest time a restored head waits for its workers to register again: a worker that
/// lost its head retries after 1 s, then 2 s more, so two of its attempts fall within it.
pub const REJOIN_GRACE_MIN: Duration = Duration::from_secs(5);

/// The head's cluster settings: membership, the controller's pace, replica start/stop timeouts.
#[derive(Clone, Debug, PartialEq, clap::Args, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// How often workers send heartbeats, in milliseconds; a worker silent for 3 intervals is
    /// marked dead and its replicas leave the routing set.
    #[arg(long, env = "LUMEN_HEARTBEAT_INTERVAL_MS", default_value_t = 2000)]
    pub heartbeat_interval_ms: u64,
    /// Shared secret a worker must present to register; without one any worker may join.
    #[arg(long, env = "LUMEN_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// How often the controller compares desired and live replicas, in milliseconds (it also
    /// runs whenever a deployment or a worker changes).
    #[arg(long, env = "LUMEN_RECONCILE_INTERVAL_MS", default_value_t = 1000)]
    pub reconcile_interval_ms: u64,
    /// How long a replica may take to load its model before the start counts as failed, in
    /// seconds.
    #[arg(long, env = "LUMEN_REPLICA_START_TIMEOUT_S", default_value_t = 1800)]
    pub replica_start_timeout_s: u64,
    /// How long a stopping replica may finish its requests before they are aborted, in
    /// milliseconds.
    #[arg(long, env = "LUMEN_REPLICA_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    pub replica_drain_timeout_ms: u64,
    /// How long a request for a deployed model with no running replica waits for one that is
    /// starting (or about to be placed), in seconds; 0 answers 503 at once.
    #[arg(long, env = "LUMEN_REPLICA_WAIT_TIMEOUT_S", default_value_t = 60)]
    pub replica_wait_timeout_s: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 2000,
            join_token: None,
            reconcile_interval_ms: 1000,
            replica_start_timeout_s: 1800,
            replica_drain_timeout_ms: 30_000,
            replica_wait_timeout_s: 60,
        }
    }
}

impl ClusterSettings {
    fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }

    /// Silence longer than this marks a worker dead.
    fn heartbeat_deadline(&self) -> Duration {
        self.heartbeat_interval() * MISSED_HEARTBEATS
    }
}

/// Errors of the cluster layer itself (request-path errors are [`crate::backend::BackendError`]).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("two deployments are named `{name}`")]
    DuplicateDeployment { name: String },
    #[error("deployments `{first}` and `{second}` both serve the model name `{model_name}`")]
    DuplicateModelName { model_name: String, first: String, second: String },
    #[error("deployment `{name}` is invalid: {reason}")]
    InvalidDeployment { name: String, reason: String },
    #[error("the head's gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The head's view of the cluster; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ClusterSettings,
    state: Mutex<State>,
    /// Wakes the controller when deployments or membership change.
    changed: Notify,
    clients: ClientPool,
    /// The router's prefix -> replica hints (see [`affinity`]); locked after `state`, never
    /// held across an `.await`.
    affinity: Mutex<affinity::PrefixAffinity>,
    /// What the controller's passes and the heartbeats cost (see [`loop_time`]).
    loops: loop_time::LoopTimes,
}

impl Cluster {
    pub fn new(settings: ClusterSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                clients: ClientPool::default(),
                affinity: Mutex::default(),
                loops: loop_time::LoopTimes::default(),
            }),
        }
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.inner.settings
    }

    /// Sets whom `https://` workers must prove to be (before any is dialed; the system's roots
    /// otherwise). `false` when set already.
    pub fn trust_workers(&self, tls: lumen_proto::tls::ClientTls) -> bool {
        self.inner.clients.set_tls(tls)
    }

    /// Replaces the desired deployments (declarative: deployments absent from `deployments` are
    /// removed and their replicas stopped by the controller). Names and served model names must
    /// be unique; on error nothing changes.
    pub fn set_deployments(&self, deployments: Vec<Deployment>) -> Result<(), ClusterError> {
        registry::validate_deployments(&deployments)?;
        self.state().set_deployments(deployments);
        self.wake_controller();
        Ok(())
    }

    /// The desired deployments, in the order they were set.
    pub fn deployments(&self) -> Vec<Deployment> {
        self.state().deployments().map(|d| d.spec.clone()).collect()
    }

    /// A consistent, read-only picture of workers, deployments and replicas.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let settings = &self.inner.settings;
        snapshot::build(&self.state(), settings.heartbeat_deadline())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters
        // more than losing the whole head would, so keep serving.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A head that restored its applications calls this at start: for the first heartbeat
    /// deadline (at least [`REJOIN_GRACE_MIN`]) a request with no routable replica waits for the
    /// workers to register again (bounded by `replica_wait_timeout_s`) instead of a 503.
    pub fn expect_workers_back(&self) {
        let grace = self.settings().heartbeat_deadline().max(REJOIN_GRACE_MIN);
        self.state().rejoin_until = std::time::Instant::now().checked_add(grace);
    }

    fn wake_controller(&self) {
        self.inner.changed.notify_one();
    }
}

/// A short random hex string (replica ids, power-of-two-choices draws), from std's randomly keyed
/// SipHash: no RNG dependency, different on every call.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}
