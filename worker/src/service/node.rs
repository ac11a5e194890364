//! [`WorkerNode`]: the replicas one worker process hosts, by replica id.
//!
//! Contracts:
//! - A replica id is in exactly one state: starting (its engine is loading on a blocking
//!   thread), running, or stopping (draining; it still serves the requests it has but takes no
//!   new ones). Failed starts leave nothing behind.
//! - `start_replica` is idempotent: a second call for an id that is starting waits for the same
//!   load; one for a running id returns its info. The load runs in its own task, so a caller
//!   that gives up (a cancelled RPC) does not cancel it: a retry finds the replica running.
//! - `stop_replica` waits until the replica has no running or waiting request or the drain
//!   timeout passes, then stops the engine (aborting what is left) and forgets the replica.
//!   Stopping an unknown id succeeds (stop is idempotent).
//! - The node is cheap to clone (an `Arc`); its lock is never held across an `.await`.
//! - Draining (a SIGTERM): [`WorkerNode::begin_drain`] sets a flag the registration task sends
//!   the head at once (`WorkerHeartbeat.draining`); once the head acknowledged that heartbeat
//!   ([`WorkerNode::drain_acknowledged`]) the head routes nothing new here, and the caller stops
//!   the replicas (each finishes its in-flight requests). The flag is never cleared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::ServiceError;
use super::convert::{replica_stats, wire_u32};
use super::devices::DevicePool;
use crate::WorkerError;
use crate::engine::simulated::{SimTokenizers, SimulatedEngine};
use crate::engine::{EngineHandle, EngineOptions, EngineStats, build_engine};

/// How long `stop_replica` waits for the engine thread to exit after stopping it.
const ENGINE_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a draining replica's load is checked.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// One running engine and what the head knows about it.
pub struct Replica {
    handle: EngineHandle,
    info: pb::ReplicaInfo,
    options: EngineOptions,
    actor: Mutex<Option<JoinHandle<()>>>,
    stopping: AtomicBool,
    /// Response streams not yet finished or dropped (the engine's own counts lag a step behind).
    in_flight: Arc<AtomicUsize>,
}

/// Counts one response stream in [`Replica`]'s in-flight requests while it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn track_request(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(&self.in_flight))
    }

    pub fn id(&self) -> &str {
        &self.info.replica_id
    }

    pub fn handle(&self) -> &EngineHandle {
        &self.handle
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// How the replica pools its prompts; `None` when it serves generation (the options were
    /// checked when it started).
    pub fn pooling(&self) -> Option<crate::engine::PoolingParams> {
        self.options.pooling().ok().flatten()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn state(&self) -> pb::ReplicaState {
        if self.is_stopping() { pb::ReplicaState::Stopping } else { pb::ReplicaState::Running }
    }

    /// The replica's info with its current state.
    pub fn info(&self) -> pb::ReplicaInfo {
        pb::ReplicaInfo { state: self.state() as i32, ..self.info.clone() }
    }

    /// Live statistics; a replica whose engine is gone reports FAILED with zero load.
    pub async fn stats(&self) -> pb::ReplicaStats {
        match self.handle.stats().await {
            Ok(s) => replica_stats(self.id(), &self.info.model_name, &s, self.state()),
            Err(_) => {
                replica_stats(self.id(), &self.info.model_name, &EngineStats::default(), pb::ReplicaState::Failed)
            }
        }
    }
}

/// The outcome of a start, shared with every caller waiting on it.
type StartOutcome = Option<Result<Arc<Replica>, Arc<WorkerError>>>;

#[derive(Clone)]
enum Slot {
    Starting(watch::Receiver<StartOutcome>),
    Running(Arc<Replica>),
}

struct NodeInner {
    worker_id: String,
    resources: pb::Resources,
    slots: Mutex<HashMap<String, Slot>>,
    /// Set by [`WorkerNode::begin_drain`]; sent with every heartbeat and registration.
    draining: AtomicBool,
    /// Wakes the registration task to send a draining heartbeat now.
    drain_started: Notify,
    /// True once the head acknowledged a heartbeat that said draining.
    drain_acked: watch::Sender<bool>,
    /// Replicas run this simulated engine instead of loading their model (`lumen bench head`).
    simulated: Option<(SimulatedEngine, SimTokenizers)>,
    /// Which GPUs each replica runs on.
    devices: DevicePool,
}

/// The replicas this worker hosts, its id and its resources.
#[derive(Clone)]
pub struct WorkerNode {
    inner: Arc<NodeInner>,
}

impl WorkerNode {
    /// An empty node; see `detect_resources` for `resources`.
    pub fn new(worker_id: impl Into<String>, resources: pb::Resources) -> WorkerNode {
        WorkerNode::with_engines(worker_id.into(), resources, None)
    }

    /// An empty node whose replicas run `engine` (reading only their model's tokenizer, shared
    /// through `tokenizers`) instead of loading their model: see `engine::simulated`.
    pub fn simulated(
        worker_id: impl Into<String>,
        resources: pb::Resources,
        engine: SimulatedEngine,
        tokenizers: SimTokenizers,
    ) -> WorkerNode {
        WorkerNode::with_engines(worker_id.into(), resources, Some((engine, tokenizers)))
    }

    fn with_engines(
        worker_id: String,
        resources: pb::Resources,
        simulated: Option<(SimulatedEngine, SimTokenizers)>,
    ) -> WorkerNode {
        WorkerNode {
            inner: Arc::new(NodeInner {
                worker_id,
                devices: DevicePool::new(&resources),
                resources,
                slots: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                drain_started: Notify::new(),
                drain_acked: watch::Sender::new(false),
                simulated,
            }),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    pub fn resources(&self) -> &pb::Resources {
        &self.inner.resources
    }

    /// Starts draining: the next heartbeat (sent at once) tells the head (see the module docs).
    pub fn begin_drain(&self) {
        if !self.inner.draining.swap(true, Ordering::AcqRel) {
            tracing::info!(worker_id = self.worker_id(), "draining: telling the head to route nothing new here");
        }
        self.inner.drain_started.notify_one();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Completes when [`Self::begin_drain`] was called (at once if it was already).
    pub async fn drain_started(&self) {
        let notified = self.inner.drain_started.notified();
        if !self.is_draining() {
            notified.await;
        }
    }

    /// Records that the head acknowledged a heartbeat saying this worker drains.
    pub fn note_drain_acknowledged(&self) {
        self.inner.drain_acked.send_replace(true);
    }

    /// Completes once the head acknowledged the drain (never, if no head does: bound it).
    pub async fn drain_acknowledged(&self) {
        let mut rx = self.inner.drain_acked.subscribe();
        let _ = rx.wait_for(|acked| *acked).await;
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a model and starts its engine under `replica_id`; returns its info once it serves.
    pub async fn start_replica(
        &self,
        replica_id: &str,
        options: EngineOptions,
    ) -> Result<pb::ReplicaInfo, ServiceError> {
        self.start(replica_id, options, String::new()).await
    }

    /// [`Self::start_replica`]; `options_json` (what the head sent) is echoed in the info.
    async fn start(
        &self,
        replica_id: &str,
        options: EngineOptions,
        options_json: String,
    ) -> Result<pb::ReplicaInfo, ServiceError> {
        if replica_id.is_empty() {
            return Err(ServiceError::invalid("replica_id", "must not be empty"));
        }
        let mut rx = {
            let mut slots = self.slots();
            match slots.get(replica_id) {
                Some(Slot::Running(r)) => {
                    if r.options != options {
                        tracing::warn!(replica_id, "replica already runs with other options; keeping it");
                    }
                    return Ok(r.info());
                }
                Some(Slot::Starting(rx)) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    slots.insert(replica_id.to_string(), Slot::Starting(rx.clone()));
                    tokio::spawn(self.clone().load(replica_id.to_string(), options, options_json, tx));
                    rx
                }
            }
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ServiceError::Internal(format!("the start of replica `{replica_id}` was abandoned")))?
            .clone();
        match outcome {
            Some(Ok(replica)) => Ok(replica.info()),
            Some(Err(source)) => Err(ServiceError::LoadFailed { replica_id: replica_id.to_string(), source }),
            None => Err(ServiceError::Internal("start outcome missing".into())),
        }
    }

    /// Like [`Self::start_replica`], with the options as the serve config's JSON.
    pub async fn start_replica_json(
        &self,
        replica_id: &str,
        options_json: &str,
    ) -> Result<pb::ReplicaInfo, ServiceError> {
        let options = super::convert::engine_options(options_json)?;
        self.start(replica_id, options, options_json.to_string()).await
    }

    /// The load task: builds the engine off the runtime, starts it, publishes the outcome.
    async fn load(
        self,
        replica_id: String,
        options: EngineOptions,
        options_json: String,
        tx: watch::Sender<StartOutcome>,
    ) {
        let started = Instant::now();
        tracing::info!(replica_id, model = %options.model, "loading replica");
        let outcome = self.build(&replica_id, options, options_json).await.map(Arc::new).map_err(Arc::new);
        {
            let mut slots = self.slots();
            match &outcome {
                Ok(replica) => {
                    slots.insert(replica_id.clone(), Slot::Running(Arc::clone(replica)));
                    tracing::info!(replica_id, model = %replica.info.model_name, seconds = started.elapsed().as_secs_f32(), "replica running");
                }
                Err(e) => {
                    slots.remove(&replica_id);
                    self.inner.devices.release(&replica_id);
                    tracing::error!(replica_id, error = %e, "replica failed to load");
                }
            }
        }
        let _ = tx.send(Some(outcome));
    }

    async fn build(
        &self,
        replica_id: &str,
        options: EngineOptions,
        engine_options_json: String,
    ) -> Result<Replica, WorkerError> {
        // The engine loads on the GPUs assigned here (`options` stays as the head sent it).
        let mut opts = options.clone();
        self.inner.devices.assign(replica_id, &mut opts)?;
        let (handle, actor) = match &self.inner.simulated {
            None => {
                let core = tokio::task::spawn_blocking(move || build_engine(&opts))
                    .await
                    .map_err(|e| WorkerError::Engine(format!("the model loader panicked: {e}")))??;
                EngineHandle::start(core, replica_id).await?
            }
            Some((engine, tokenizers)) => {
                let tokenizers = tokenizers.clone();
                let tokenizer = tokio::task::spawn_blocking(move || tokenizers.get(&opts))
                    .await
                    .map_err(|e| WorkerError::Engine(format!("the tokenizer loader panicked: {e}")))??;
                engine.start(&options, tokenizer, replica_id).await?
            }
        };
        let limits = handle.limits();
        let info = pb::ReplicaInfo {
            replica_id: replica_id.to_string(),
            model_name: options.served_name().to_string(),
            max_model_len: wire_u32(limits.max_model_len),
            vocab_size: wire_u32(limits.vocab_size),
            description: handle.description().to_string(),
            state: pb::ReplicaState::Running as i32,
            message: String::new(),
            engine_options_json,
            runner: if options.pooling()?.is_some() { "pooling" } else { "generate" }.to_string(),
        };
        Ok(Replica {
            handle,
            info,
            options,
            actor: Mutex::new(Some(actor)),
            stopping: AtomicBool::new(false),
            in_flight: Arc::default(),
        })
    }

    /// The replica `replica_id` if it can take requests: NOT_FOUND if unknown, UNAVAILABLE
    /// while starting or stopping.
    pub fn replica(&self, replica_id: &str) -> Result<Arc<Replica>, ServiceError> {
        let unavailable = |state| ServiceError::ReplicaUnavailable { replica_id: replica_id.to_string(), state };
        match self.slots().get(replica_id) {
            None => Err(ServiceError::ReplicaNotFound { replica_id: replica_id.to_string() }),
            Some(Slot::Starting(_)) => Err(unavailable("starting")),
            Some(Slot::Running(r)) if r.is_stopping() => Err(unavailable("stopping")),
            Some(Slot::Running(r)) => Ok(Arc::clone(r)),
        }
    }

    /// Every replica's info (starting ones with only their id and state).
    pub fn replicas(&self) -> Vec<pb::ReplicaInfo> {
        let mut infos: Vec<pb::ReplicaInfo> = self
            .slots()
            .iter()
            .map(|(id, slot)| match slot {
                Slot::Running(r) => r.info(),
                Slot::Starting(_) => pb::ReplicaInfo {
                    replica_id: id.clone(),
                    state: pb::ReplicaState::Starting as i32,
                    ..Default::default()
                },
            })
            .collect();
        infos.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        infos
    }

    /// Live statistics of every replica (starting ones with zero load).
    pub async fn stats(&self) -> Vec<pb::ReplicaStats> {
        let slots: Vec<(String, Slot)> = self.slots().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut out = Vec::with_capacity(slots.len());
        for (id, slot) in slots {
            out.push(match slot {
                Slot::Running(r) => r.stats().await,
                Slot::Starting(_) => replica_stats(&id, "", &EngineStats::default(), pb::ReplicaState::Starting),
            });
        }
        out.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
        out
    }

    /// Drains and stops a replica, then forgets it (see the module docs).
    pub async fn stop_replica(&self, replica_id: &str, drain_timeout: Duration) -> Result<(), ServiceError> {
        let replica = loop {
            let slot = self.slots().get(replica_id).cloned();
            match slot {
                None => {
                    tracing::debug!(replica_id, "stop of an unknown replica: nothing to do");
                    return Ok(());
                }
                Some(Slot::Starting(mut rx)) => {
                    // Let the load finish, then stop what it produced.
                    let _ = rx.wait_for(Option::is_some).await;
                }
                Some(Slot::Running(r)) => break r,
            }
        };
        replica.stopping.store(true, Ordering::Release);
        tracing::info!(replica_id, drain_ms = drain_timeout.as_millis() as u64, "stopping replica");
        drain(&replica, drain_timeout).await;
        replica.handle.stop();
        let actor = replica.actor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(actor) = actor
            && tokio::time::timeout(ENGINE_EXIT_TIMEOUT, actor).await.is_err()
        {
            tracing::warn!(replica_id, "the engine did not exit in time; forgetting it anyway");
        }
        let mut slots = self.slots();
        if let Some(Slot::Running(r)) = slots.get(replica_id)
            && Arc::ptr_eq(r, &replica)
        {
            slots.remove(replica_id);
            self.inner.devices.release(replica_id);
        }
        tracing::info!(replica_id, "replica stopped");
        Ok(())
    }

    /// Stops every replica, draining each for at most `drain_timeout` (in parallel).
    pub async fn stop_all(&self, drain_timeout: Duration) {
        let ids: Vec<String> = self.slots().keys().cloned().collect();
        let stops = ids.iter().map(|id| self.stop_replica(id, drain_timeout));
        for result in futures::future::join_all(stops).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "stopping a replica failed");
            }
        }
    }
}

/// Waits until the replica is idle or `timeout` passes.
async fn drain(replica: &Replica, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let Ok(stats) = replica.handle.stats().await else {
            return;
        };
        let busy = (stats.running + stats.waiting).max(replica.in_flight.load(Ordering::Acquire));
        if busy == 0 {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!(replica_id = replica.id(), requests = busy, "drain timeout passed; aborting what is left");
            return;
        }
        tokio::time::sleep(DRAIN_POLL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_wakes_the_heartbeat_and_its_acknowledgement_is_remembered() {
        let node = WorkerNode::new("w", pb::Resources::default());
        assert!(!node.is_draining());
        let waiting = tokio::spawn({
            let node = node.clone();
            async move { node.drain_started().await }
        });
        tokio::task::yield_now().await;
        node.begin_drain();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("joined");
        assert!(node.is_draining());
        // Already draining: completes at once, however often it is asked.
        tokio::time::timeout(Duration::from_secs(1), node.drain_started()).await.expect("at once");
        assert!(tokio::time::timeout(Duration::from_millis(50), node.drain_acknowledged()).await.is_err());
        node.note_drain_acknowledged();
        tokio::time::timeout(Duration::from_secs(1), node.drain_acknowledged()).await.expect("acknowledged");
    }

    /// Two simulated GPUs: plain `cuda` replicas get one each; a third waits for a stop; a
    /// failed start gives its GPU back.
    #[tokio::test]
    async fn replicas_hold_their_gpus_until_stopped() {
        let resources = pb::Resources { device_kind: "cuda".into(), device_count: 2, ..Default::default() };
        let node = WorkerNode::simulated("w", resources, SimulatedEngine::default(), SimTokenizers::default());
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let on_cuda = EngineOptions { model: model.into(), device: "cuda".into(), ..EngineOptions::default() };
        node.start_replica("a", on_cuda.clone()).await.unwrap();
        node.start_replica("b", on_cuda.clone()).await.unwrap();
        let err = node.start_replica("c", on_cuda.clone()).await.unwrap_err().to_string();
        assert!(err.contains("2 GPU(s)") && err.contains("a holds [0]") && err.contains("b holds [1]"), "{err}");
        // A start that fails after its GPU was assigned (no such model) gives it back.
        let missing = EngineOptions { model: "/nonexistent/model.gguf".into(), ..on_cuda.clone() };
        node.stop_replica("a", Duration::from_millis(10)).await.unwrap();
        assert!(node.start_replica("bad", missing).await.is_err());
        node.start_replica("c", on_cuda.clone()).await.expect("GPU 0 is free again");
    }
}
