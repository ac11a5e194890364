//! The cluster's state: desired deployments, registered workers, and the replicas they host.
//!
//! Pure bookkeeping, no I/O: the head service, the controller and the router mutate it under the
//! cluster's one lock and do their gRPC calls after releasing it.
//!
//! Invariants:
//! - Deployment names and served model names are unique (checked by [`validate_deployments`]).
//! - Every replica entry names a worker present in `workers` (dead workers stay listed).
//! - A draining worker (it said so in a heartbeat or its registration: it got SIGTERM) is still
//!   alive but takes no new work: its replicas are neither routable nor counted as live (so the
//!   controller places replacements elsewhere at once), and no replica is placed on it. Its
//!   replicas still count towards the deployment's load while they finish their requests.
//! - A replica's `deployment` may name a deployment that no longer exists (an orphan); the
//!   controller stops orphans, but only after deployments were set at least once, so a restarted
//!   head does not stop replicas that workers report before the serve config is loaded.
//! - Placement (see `placement`): a replica needing GPUs takes whole devices of a CUDA worker; a
//!   CPU worker hosts any number of CPU replicas.
//! - A deployment's `version` hashes what its replicas run (served model name and engine
//!   options); a replica remembers the version it was started with, so a changed deployment is
//!   rolled replica by replica while a change of replica count only scales.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use tokio::sync::watch;

use crate::clock::{since_epoch, unix_ms, unix_s};
use crate::config::AutoscalingConfig;

use super::ClusterError;
use super::autoscaler::{Autoscaler, ScaleDirection};
use super::replica_table::ReplicaTable;

/// One desired deployment: a model, how many replicas serve it, and how they are run.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    /// Unique; replica ids start with it (`{application}-{deployment}` for a serve config).
    pub name: String,
    /// The Ray Serve application it belongs to ("" for `lumen serve --model`).
    pub application: String,
    /// Its name inside the application (the config's `deployments[].name`).
    pub deployment_name: String,
    /// The served model name clients send in `model`.
    pub model_name: String,
    /// The serve config's `model:` section as JSON, sent verbatim in `StartReplica`.
    pub engine_options_json: String,
    /// Replicas wanted (the autoscaler's starting point when `autoscaling` is set).
    pub num_replicas: u32,
    /// Scale between bounds on live load instead of a fixed count.
    pub autoscaling: Option<AutoscalingConfig>,
    /// Requests the head keeps in flight on one replica at most (0 = no limit).
    pub max_ongoing_requests: u32,
    /// GPUs a replica needs (0 = runs on the CPU).
    pub gpus_per_replica: f64,
    /// CPU cores a CPU replica reserves on its worker (0 = none: any number share a worker).
    pub cpus_per_replica: f64,
    /// At most this many of its replicas on one worker (Ray's `max_replicas_per_node`).
    pub max_replicas_per_node: Option<u32>,
    /// How long a stopping replica may finish its requests.
    pub graceful_shutdown_timeout: Duration,
    /// How often each replica's engine is probed, and how long a probe may take.
    pub health_check_period: Duration,
    pub health_check_timeout: Duration,
}

impl Default for Deployment {
    /// Ray Serve's defaults for everything but the names and the model.
    fn default() -> Self {
        Deployment {
            name: String::new(),
            application: String::new(),
            deployment_name: String::new(),
            model_name: String::new(),
            engine_options_json: String::new(),
            num_replicas: 1,
            autoscaling: None,
            max_ongoing_requests: 0,
            gpus_per_replica: 0.0,
            cpus_per_replica: 0.0,
            max_replicas_per_node: None,
            graceful_shutdown_timeout: Duration::from_secs(20),
            health_check_period: Duration::from_secs(10),
            health_check_timeout: Duration::from_secs(30),
        }
    }
}

/// Checks what [`super::Cluster::set_deployments`] promises: unique names and model names.
pub(super) fn validate_deployments(deployments: &[Deployment]) -> Result<(), ClusterError> {
    let mut names = BTreeMap::new();
    let mut models: BTreeMap<&str, &str> = BTreeMap::new();
    for d in deployments {
        let invalid = |reason: &str| ClusterError::InvalidDeployment { name: d.name.clone(), reason: reason.into() };
        if d.name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if d.model_name.is_empty() {
            return Err(invalid("the served model name is empty"));
        }
        if names.insert(d.name.as_str(), ()).is_some() {
            return Err(ClusterError::DuplicateDeployment { name: d.name.clone() });
        }
        if let Some(first) = models.insert(&d.model_name, &d.name) {
            return Err(ClusterError::DuplicateModelName {
                model_name: d.model_name.clone(),
                first: first.to_owned(),
                second: d.name.clone(),
            });
        }
    }
    Ok(())
}

/// What a deployment's replicas run: a hash of the served model name and the engine options.
/// Stable within one head process (it is never persisted or sent).
pub(super) fn spec_version(spec: &Deployment) -> u64 {
    version_of(&spec.model_name, &spec.engine_options_json)
}

fn version_of(model_name: &str, engine_options_json: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    model_name.hash(&mut hasher);
    engine_options_json.hash(&mut hasher);
    hasher.finish()
}

/// The version of a replica a worker reported: from the options its start carried, which the
/// worker echoes (`None` from a worker that does not).
fn reported_version(info: &pb::ReplicaInfo) -> Option<u64> {
    (!info.engine_options_json.is_empty()).then(|| version_of(&info.model_name, &info.engine_options_json))
}

/// A deployment with what the controller learnt about it.
#[derive(Debug)]
pub(super) struct DeploymentEntry {
    pub spec: Deployment,
    /// [`spec_version`] of `spec`.
    pub version: u64,
    pub created_unix_s: u64,
    /// Why the deployment is not fully running, for status APIs; cleared by a successful start.
    pub message: Option<String>,
    /// Consecutive failed starts, for the retry backoff.
    pub failures: u32,
    pub retry_at: Option<Instant>,
    /// Replicas wanted now: `num_replicas`, or the autoscaler's latest decision.
    pub target_replicas: u32,
    /// Present when the deployment has an `autoscaling_config`.
    pub autoscaler: Option<Autoscaler>,
    /// Set when the target moved (autoscaler or a new `num_replicas`) until it is reached.
    pub scaling: Option<ScaleDirection>,
    /// Requests waiting at the head because no replica of it is routable yet (part of the
    /// autoscaler's load, so a deployment scaled to zero comes back up).
    pub queued: Arc<AtomicU32>,
}

impl DeploymentEntry {
    fn new(spec: Deployment) -> Self {
        let autoscaler = spec.autoscaling.clone().map(|config| Autoscaler::new(&spec.name, config));
        let target_replicas = autoscaler.as_ref().map_or(spec.num_replicas, |a| a.clamp(spec.num_replicas));
        DeploymentEntry {
            version: spec_version(&spec),
            created_unix_s: unix_s(),
            message: None,
            failures: 0,
            retry_at: None,
            target_replicas,
            autoscaler,
            scaling: None,
            queued: Arc::new(AtomicU32::new(0)),
            spec,
        }
    }

    /// Applies a new spec to an existing deployment: failures are forgiven when it changed, an
    /// autoscaled deployment keeps its current target (clamped to the new bounds), a fixed one
    /// takes the new `num_replicas`.
    fn update(&mut self, spec: Deployment) {
        if self.spec == spec {
            return;
        }
        self.failures = 0;
        self.retry_at = None;
        let target = match (&spec.autoscaling, &mut self.autoscaler) {
            (None, _) => {
                self.autoscaler = None;
                spec.num_replicas
            }
            (Some(config), Some(autoscaler)) => {
                autoscaler.reconfigure(config.clone());
                autoscaler.clamp(self.target_replicas)
            }
            (Some(config), None) => {
                let autoscaler = Autoscaler::new(&spec.name, config.clone());
                let target = autoscaler.clamp(self.target_replicas);
                self.autoscaler = Some(autoscaler);
                target
            }
        };
        self.set_target(target);
        self.version = spec_version(&spec);
        self.spec = spec;
    }

    /// Moves the target, remembering the direction for the status until it is reached.
    pub fn set_target(&mut self, target: u32) {
        if target != self.target_replicas {
            self.scaling = Some(if target > self.target_replicas { ScaleDirection::Up } else { ScaleDirection::Down });
            self.target_replicas = target;
        }
    }

    /// Whether `replica` runs this deployment's current version. A replica adopted from a worker
    /// (e.g. after a head restart) has the version of the options the worker echoes; one whose
    /// version is unknown counts as current when it serves the deployment's model name.
    pub fn is_current(&self, replica: &ReplicaEntry) -> bool {
        match replica.spec_version {
            Some(version) => version == self.version,
            None => replica.info.as_ref().is_none_or(|info| info.model_name == self.spec.model_name),
        }
    }
}

#[derive(Debug)]
pub(super) struct WorkerEntry {
    pub id: String,
    pub address: String,
    pub resources: pb::Resources,
    pub lumen_version: String,
    pub registered_unix_ms: u64,
    pub last_seen: Instant,
    /// False once the worker missed its heartbeats; set again when it registers or heartbeats.
    pub alive: bool,
    /// True while it is marked dead for missed heartbeats (`!alive` but for a drain that
    /// finished): streams from it end once they fall silent too (see `forward`). Kept across
    /// registrations, so streams opened before one still hear that it is back.
    pub silent: watch::Sender<bool>,
    /// The worker is shutting down: it finishes its requests but takes no new ones.
    pub draining: bool,
}

impl WorkerEntry {
    pub fn is_live(&self, now: Instant, deadline: Duration) -> bool {
        self.alive && now.saturating_duration_since(self.last_seen) <= deadline
    }

    /// Live and not draining: may take new requests and new replicas.
    pub fn takes_work(&self, now: Instant, deadline: Duration) -> bool {
        self.is_live(now, deadline) && !self.draining
    }

    /// Whether it runs replicas on GPUs (one device each) rather than the CPU.
    pub fn is_cuda(&self) -> bool {
        self.resources.device_kind.eq_ignore_ascii_case("cuda")
    }
}

/// Where a replica is in its life, as the head sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// `StartReplica` is in flight.
    Starting,
    Running,
    /// `StopReplica` is in flight; no longer routable.
    Stopping,
    /// The worker reported it failed; the controller removes it.
    Failed,
}

#[derive(Debug)]
pub(super) struct ReplicaEntry {
    pub id: String,
    pub deployment: String,
    pub worker_id: String,
    pub phase: Phase,
    pub info: Option<pb::ReplicaInfo>,
    pub stats: Option<pb::ReplicaStats>,
    pub message: Option<String>,
    /// Requests the head has in flight on this replica (see `forward::InFlight`).
    pub in_flight: Arc<AtomicU32>,
    /// `in_flight` when `stats` arrived: how much of the reported load was the head's own.
    pub in_flight_at_report: u32,
    /// The deployment version it was started with (`None`: adopted from a worker's report).
    pub spec_version: Option<u64>,
    /// When the next health check is due (set once it runs).
    pub next_health_check: Option<Instant>,
    /// A `CheckHealth` call is in flight.
    pub health_check_in_flight: bool,
    /// When the head created the entry (placed it, or adopted it from a worker's report).
    pub created_unix_s: f64,
}

impl ReplicaEntry {
    pub fn new(id: String, deployment: String, worker_id: String, phase: Phase) -> Self {
        Self {
            id,
            deployment,
            worker_id,
            phase,
            info: None,
            stats: None,
            message: None,
            in_flight: Arc::new(AtomicU32::new(0)),
            in_flight_at_report: 0,
            spec_version: None,
            next_health_check: None,
            health_check_in_flight: false,
            created_unix_s: since_epoch().as_secs_f64(),
        }
    }

    /// Routable: running, not draining, not failed (the worker's liveness is checked apart).
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// The head's requests in flight on the replica now, plus the running and waiting requests
    /// it last reported beyond the head's own at that moment (load from elsewhere). The head's
    /// count is exact and current, so a report up to a heartbeat old no longer makes a replica
    /// whose requests just finished look busy, nor counts the head's requests twice.
    pub fn load(&self) -> u64 {
        let reported = self.stats.as_ref().map_or(0, |s| u64::from(s.running) + u64::from(s.waiting));
        let others = reported.saturating_sub(u64::from(self.in_flight_at_report));
        u64::from(self.in_flight.load(Ordering::Relaxed)) + others
    }
}

/// A heartbeat named a worker that is not registered (e.g. the head restarted).
#[derive(Debug)]
pub(super) struct UnknownWorker;

#[derive(Debug, Default)]
pub(super) struct State {
    deployments: Vec<DeploymentEntry>,
    pub workers: BTreeMap<String, WorkerEntry>,
    pub replicas: ReplicaTable,
    /// Whether `set_deployments` was called yet (see the module invariants).
    pub deployments_set: bool,
    /// Until then, a head restored from its state directory expects its workers to register
    /// again: a request with no routable replica waits instead of being refused.
    pub rejoin_until: Option<Instant>,
}

impl State {
    pub fn set_deployments(&mut self, specs: Vec<Deployment>) {
        let mut old: BTreeMap<String, DeploymentEntry> =
            self.deployments.drain(..).map(|d| (d.spec.name.clone(), d)).collect();
        self.deployments = specs
            .into_iter()
            .map(|spec| match old.remove(&spec.name) {
                Some(mut entry) => {
                    entry.update(spec);
                    entry
                }
                None => DeploymentEntry::new(spec),
            })
            .collect();
        self.deployments_set = true;
    }

    pub fn deployments(&self) -> impl Iterator<Item = &DeploymentEntry> {
        self.deployments.iter()
    }

    pub fn deployment(&self, name: &str) -> Option<&DeploymentEntry> {
        self.deployments.iter().find(|d| d.spec.name == name)
    }

    pub fn deployments_mut(&mut self) -> impl Iterator<Item = &mut DeploymentEntry> {
        self.deployments.iter_mut()
    }

    pub fn deployment_mut(&mut self, name: &str) -> Option<&mut DeploymentEntry> {
        self.deployments.iter_mut().find(|d| d.spec.name == name)
    }

    pub fn deployment_for_model(&self, model_name: &str) -> Option<&DeploymentEntry> {
        self.deployments.iter().find(|d| d.spec.model_name == model_name)
    }

    /// Records a (re-)registration. The worker's report is the truth about what it hosts: reported
    /// replicas are adopted (a restarted head keeps serving them without a new `StartReplica`),
    /// and replicas the head believed it hosted are forgotten unless their start is still in
    /// flight. Returns whether the worker was already known.
    pub fn register_worker(&mut self, req: &pb::RegisterRequest, now: Instant) -> bool {
        let known = self.workers.contains_key(&req.worker_id);
        let silent = self.workers.get(&req.worker_id).map_or_else(|| watch::channel(false).0, |w| w.silent.clone());
        silent.send_replace(false);
        self.workers.insert(
            req.worker_id.clone(),
            WorkerEntry {
                id: req.worker_id.clone(),
                address: req.address.clone(),
                resources: req.resources.clone().unwrap_or_default(),
                lumen_version: req.lumen_version.clone(),
                registered_unix_ms: unix_ms(),
                last_seen: now,
                alive: true,
                silent,
                draining: req.draining,
            },
        );
        let reported: BTreeMap<&str, &pb::ReplicaInfo> =
            req.replicas.iter().map(|r| (r.replica_id.as_str(), r)).collect();
        self.replicas
            .retain(|id, r| r.worker_id != req.worker_id || r.phase == Phase::Starting || reported.contains_key(id));
        for info in req.replicas.iter().filter(|r| !r.replica_id.is_empty()) {
            self.adopt_replica(&req.worker_id, info);
        }
        known
    }

    fn adopt_replica(&mut self, worker_id: &str, info: &pb::ReplicaInfo) {
        let phase = match pb::ReplicaState::try_from(info.state) {
            Ok(pb::ReplicaState::Starting) => Phase::Starting,
            Ok(pb::ReplicaState::Stopping) => Phase::Stopping,
            Ok(pb::ReplicaState::Failed) => Phase::Failed,
            _ => Phase::Running,
        };
        let deployment = self.owning_deployment(info);
        let entry = self.replicas.get_or_insert_with(&info.replica_id, || {
            ReplicaEntry::new(info.replica_id.clone(), deployment, worker_id.to_owned(), phase)
        });
        entry.worker_id = worker_id.to_owned();
        entry.phase = phase;
        entry.message = (!info.message.is_empty()).then(|| info.message.clone());
        if entry.spec_version.is_none() {
            entry.spec_version = reported_version(info);
        }
        entry.info = Some(info.clone());
    }

    /// The deployment a reported replica belongs to: by its id's `{deployment}-` prefix, else by
    /// its served model name, else the id's prefix (an orphan the controller will stop).
    fn owning_deployment(&self, info: &pb::ReplicaInfo) -> String {
        let prefix = info.replica_id.rsplit_once('-').map_or(info.replica_id.as_str(), |(p, _)| p);
        if self.deployment(prefix).is_some() {
            return prefix.to_owned();
        }
        match self.deployment_for_model(&info.model_name) {
            Some(d) => d.spec.name.clone(),
            None => prefix.to_owned(),
        }
    }

    /// Applies one heartbeat: the worker is alive, draining if it says so, and its replicas'
    /// stats are current. Returns whether the controller should act now: a replica newly
    /// reported failure, or the worker started draining (its replicas need replacements).
    pub fn record_heartbeat(&mut self, hb: &pb::WorkerHeartbeat, now: Instant) -> Result<bool, UnknownWorker> {
        let worker = self.workers.get_mut(&hb.worker_id).ok_or(UnknownWorker)?;
        worker.last_seen = now;
        worker.alive = true;
        worker.silent.send_if_modified(|silent| std::mem::replace(silent, false));
        let mut act = hb.draining && !worker.draining;
        worker.draining = hb.draining;
        for stats in &hb.replicas {
            let Some(replica) = self.replicas.get_mut(&stats.replica_id) else { continue };
            if replica.worker_id != hb.worker_id {
                continue;
            }
            if stats.state == pb::ReplicaState::Failed as i32 && replica.phase != Phase::Failed {
                replica.phase = Phase::Failed;
                replica.message = Some(format!("worker `{}` reported the replica failed", hb.worker_id));
                act = true;
            }
            replica.stats = Some(stats.clone());
            replica.in_flight_at_report = replica.in_flight.load(Ordering::Relaxed);
        }
        Ok(act)
    }

    /// Marks workers silent for longer than `deadline` dead; returns their ids.
    pub fn mark_silent_workers_dead(&mut self, now: Instant, deadline: Duration) -> Vec<String> {
        let mut dead = Vec::new();
        for worker in self.workers.values_mut() {
            if worker.alive && !worker.is_live(now, deadline) {
                worker.alive = false;
                worker.silent.send_replace(true);
                dead.push(worker.id.clone());
            }
        }
        dead
    }

    pub fn worker_is_live(&self, worker_id: &str, now: Instant, deadline: Duration) -> bool {
        self.workers.get(worker_id).is_some_and(|w| w.is_live(now, deadline))
    }

    /// Whether the worker is live and not draining.
    pub fn worker_takes_work(&self, worker_id: &str, now: Instant, deadline: Duration) -> bool {
        self.workers.get(worker_id).is_some_and(|w| w.takes_work(now, deadline))
    }

    pub fn worker_is_draining(&self, worker_id: &str) -> bool {
        self.workers.get(worker_id).is_some_and(|w| w.draining && w.alive)
    }

    /// A draining worker's heartbeat stream ended: it has finished its requests and exits (or
    /// lost the head, and then registers again). Marks it dead and forgets its replicas, which
    /// it stopped before leaving. Returns whether it was draining (a non-draining worker is left
    /// to its heartbeat deadline).
    pub fn finish_drain(&mut self, worker_id: &str) -> bool {
        let Some(worker) = self.workers.get_mut(worker_id).filter(|w| w.draining) else { return false };
        worker.alive = false;
        self.replicas.retain(|_, r| r.worker_id != worker_id);
        true
    }

    /// Whether a replica of `deployment` sits on a draining worker (its replacement is coming).
    pub fn has_draining_replica(&self, deployment: &str) -> bool {
        self.replicas.of_deployment(deployment).any(|r| self.worker_is_draining(&r.worker_id))
    }

    /// Replicas of `deployment` that are starting or running on a live worker that is not
    /// draining.
    pub fn live_replicas<'a>(
        &'a self,
        deployment: &'a str,
        now: Instant,
        deadline: Duration,
    ) -> impl Iterator<Item = &'a ReplicaEntry> + 'a {
        self.replicas.of_deployment(deployment).filter(move |r| {
            matches!(r.phase, Phase::Starting | Phase::Running) && self.worker_takes_work(&r.worker_id, now, deadline)
        })
    }

    /// The autoscaler's load signal for `deployment` (Ray Serve's ongoing requests): the
    /// requests waiting at the head for a replica, plus each replica's load as the router counts
    /// it ([`ReplicaEntry::load`]: the head's requests in flight there, running or queued in its
    /// engine, and reported ones beyond them) over live workers, draining ones included (their
    /// requests are still being served).
    pub fn ongoing_requests(&self, deployment: &str, now: Instant, deadline: Duration) -> u64 {
        let queued = self.deployment(deployment).map_or(0, |d| u64::from(d.queued.load(Ordering::Relaxed)));
        queued
            + self
                .replicas
                .of_deployment(deployment)
                .filter(|r| r.phase != Phase::Failed)
                .filter(|r| self.worker_is_live(&r.worker_id, now, deadline))
                .map(ReplicaEntry::load)
                .sum::<u64>()
    }

    /// Replicas of `deployment` that can take a request now.
    pub fn routable_replicas<'a>(
        &'a self,
        deployment: &'a str,
        now: Instant,
        deadline: Duration,
    ) -> impl Iterator<Item = &'a ReplicaEntry> + 'a {
        self.live_replicas(deployment, now, deadline).filter(|r| r.phase == Phase::Running)
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
