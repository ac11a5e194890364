//! Test support for the cluster tests: a head (gRPC `Head` service + controller) on an ephemeral
//! port, and fake workers: tonic `Worker` servers on 127.0.0.1:0 with scripted behaviour that
//! record every call they receive, plus a registration and heartbeat client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use lumen_head::backend::{BackendError, EventStream};
use lumen_head::cluster::{Cluster, ClusterSettings, Deployment, serve_head};
use lumen_proto::PROTOCOL_VERSION;
use lumen_proto::v1 as pb;
use pb::head_client::HeadClient;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

pub const HEARTBEAT_MS: u64 = 100;

/// A head serving `Head` on an ephemeral port with its controller running; both stop on drop.
pub struct TestHead {
    pub cluster: Cluster,
    pub addr: SocketAddr,
    _stop_server: oneshot::Sender<()>,
    _stop_controller: oneshot::Sender<()>,
}

pub fn settings() -> ClusterSettings {
    ClusterSettings { heartbeat_interval_ms: HEARTBEAT_MS, reconcile_interval_ms: 50, ..Default::default() }
}

pub async fn start_head(settings: ClusterSettings, deployments: Vec<Deployment>) -> TestHead {
    let cluster = Cluster::new(settings);
    cluster.set_deployments(deployments).expect("valid deployments");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind head");
    let addr = listener.local_addr().expect("head address");
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let (stop_controller, controller_stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_head(listener, cluster.clone(), async {
        let _ = server_stopped.await;
    }));
    tokio::spawn(cluster.clone().run_controller(async {
        let _ = controller_stopped.await;
    }));
    TestHead { cluster, addr, _stop_server: stop_server, _stop_controller: stop_controller }
}

pub fn deployment(name: &str, model: &str, num_replicas: u32) -> Deployment {
    Deployment {
        name: name.into(),
        model_name: model.into(),
        engine_options_json:
            serde_json::json!({ "source": "fake.gguf", "served_model_name": model, "max_model_len": 2048 }).to_string(),
        num_replicas,
        ..Deployment::default()
    }
}

/// What a fake worker does when asked to generate.
#[derive(Clone, Debug)]
pub enum GenerateScript {
    /// `started`, `deltas` deltas, `finished`.
    Finish { deltas: u32 },
    /// `started` and one delta, then wait until the caller goes away.
    Hold,
    /// Answer with this status before any event; `param` goes to `lumen-param` metadata.
    Refuse { code: Code, message: String, param: Option<String> },
    /// `started` and one delta, then fail with this status.
    FailMidStream(Code),
    /// `started`, then `deltas` deltas `every` apart, then `finished` (a slow stream); if the
    /// replica is stopped before the end (drain timeout passed), an UNAVAILABLE error instead.
    Slow { deltas: u32, every: Duration },
}

/// What a fake worker answers to `CheckHealth`.
#[derive(Clone, Debug)]
pub enum HealthScript {
    Healthy,
    /// `healthy: false` with this message (a stuck engine).
    Stuck(String),
    /// Never answers.
    Hang,
}

/// What a fake worker does when asked to start a replica.
#[derive(Clone, Debug)]
pub enum StartScript {
    Run,
    ReportFailure(String),
    /// Run, but only once the gate is open (a replica slow to load its model).
    RunWhenOpened(Gate),
}

/// A gate a fake worker waits at until the test opens it; stays open.
#[derive(Clone, Debug)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    pub fn closed() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub async fn passed(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

/// Everything a fake worker was asked, and its script.
pub struct FakeState {
    pub starts: Mutex<Vec<pb::StartReplicaRequest>>,
    pub stops: Mutex<Vec<pb::StopReplicaRequest>>,
    pub generates: Mutex<Vec<pb::GenerateRequest>>,
    pub tokenizes: Mutex<Vec<String>>,
    /// Generate streams whose caller went away before the stream ended.
    pub cancelled: AtomicUsize,
    pub hosted: Mutex<Vec<pb::ReplicaInfo>>,
    /// Per replica: (running, waiting) reported in heartbeats.
    pub reported_load: Mutex<HashMap<String, (u32, u32)>>,
    pub generate_script: Mutex<GenerateScript>,
    pub start_script: Mutex<StartScript>,
    pub health_script: Mutex<HealthScript>,
    /// Replica ids of the `CheckHealth` calls received.
    pub health_checks: Mutex<Vec<String>>,
    /// When set, `StopReplica` waits at this gate before draining.
    pub stop_gate: Mutex<Option<Gate>>,
    /// Generate streams not yet ended, per replica (what a stop drains).
    pub active_streams: Mutex<HashMap<String, usize>>,
    /// Replicas being stopped: they refuse new requests with UNAVAILABLE, as a real worker does.
    pub draining: Mutex<Vec<String>>,
    /// Replicas whose drain timeout passed: their slow streams end with an error.
    pub killed: tokio::sync::watch::Sender<Vec<String>>,
    /// Per stopped replica: its generate streams still open when `StopReplica` arrived.
    pub active_at_stop: Mutex<HashMap<String, usize>>,
}

impl FakeState {
    pub fn active_streams(&self, replica_id: &str) -> usize {
        self.active_streams.lock().unwrap().get(replica_id).copied().unwrap_or(0)
    }
}

/// Counts one generate stream of a replica in [`FakeState::active_streams`] while it lives.
struct ActiveStream {
    state: Arc<FakeState>,
    replica_id: String,
}

impl ActiveStream {
    fn new(state: Arc<FakeState>, replica_id: String) -> Self {
        *state.active_streams.lock().unwrap().entry(replica_id.clone()).or_default() += 1;
        Self { state, replica_id }
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        if let Some(n) = self.state.active_streams.lock().unwrap().get_mut(&self.replica_id) {
            *n -= 1;
        }
    }
}

pub struct FakeWorker {
    pub id: String,
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    stop_server: Option<oneshot::Sender<()>>,
    /// Set to make the current heartbeat stream go silent (it stays open, sending nothing).
    silenced: Arc<AtomicBool>,
}

impl FakeWorker {
    pub async fn start(id: &str) -> Self {
        let state = Arc::new(FakeState {
            starts: Mutex::default(),
            stops: Mutex::default(),
            generates: Mutex::default(),
            tokenizes: Mutex::default(),
            cancelled: AtomicUsize::new(0),
            hosted: Mutex::default(),
            reported_load: Mutex::default(),
            generate_script: Mutex::new(GenerateScript::Finish { deltas: 3 }),
            start_script: Mutex::new(StartScript::Run),
            health_script: Mutex::new(HealthScript::Healthy),
            health_checks: Mutex::default(),
            stop_gate: Mutex::default(),
            active_streams: Mutex::default(),
            draining: Mutex::default(),
            killed: tokio::sync::watch::channel(Vec::new()).0,
            active_at_stop: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind worker");
        let addr = listener.local_addr().expect("worker address");
        let (stop_server, stopped) = oneshot::channel::<()>();
        let service = pb::worker_server::WorkerServer::new(FakeService { state: state.clone() });
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ));
        Self { id: id.into(), addr, state, stop_server: Some(stop_server), silenced: Arc::default() }
    }

    pub fn script_generate(&self, script: GenerateScript) {
        *self.state.generate_script.lock().unwrap() = script;
    }

    pub fn script_start(&self, script: StartScript) {
        *self.state.start_script.lock().unwrap() = script;
    }

    pub fn script_health(&self, script: HealthScript) {
        *self.state.health_script.lock().unwrap() = script;
    }

    /// Makes every later `StopReplica` wait at `gate` (None: stop at once).
    pub fn gate_stops(&self, gate: Option<Gate>) {
        *self.state.stop_gate.lock().unwrap() = gate;
    }

    pub fn report_load(&self, replica_id: &str, running: u32, waiting: u32) {
        self.state.reported_load.lock().unwrap().insert(replica_id.into(), (running, waiting));
    }

    pub fn host(&self, replica_id: &str, model: &str) {
        self.state.hosted.lock().unwrap().push(running_info(replica_id, model));
    }

    pub fn hosted_ids(&self) -> Vec<String> {
        self.state.hosted.lock().unwrap().iter().map(|r| r.replica_id.clone()).collect()
    }

    pub fn generates_for(&self, replica_id: &str) -> usize {
        self.state.generates.lock().unwrap().iter().filter(|g| g.replica_id == replica_id).count()
    }

    pub fn register_request(&self, kind: &str, devices: u32) -> pb::RegisterRequest {
        pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_id: self.id.clone(),
            address: self.addr.to_string(),
            resources: Some(pb::Resources { device_kind: kind.into(), device_count: devices, ..Default::default() }),
            replicas: self.state.hosted.lock().unwrap().clone(),
            join_token: String::new(),
            lumen_version: "test".into(),
            draining: false,
        }
    }

    /// Registers as a CPU worker and keeps heartbeating until [`Self::stop_heartbeats`].
    pub async fn join(&mut self, head: &TestHead) {
        self.join_as(head, "cpu", 1).await;
    }

    pub async fn join_as(&mut self, head: &TestHead, kind: &str, devices: u32) {
        let mut client = HeadClient::connect(format!("http://{}", head.addr)).await.expect("connect head");
        let reply = client.register(self.register_request(kind, devices)).await.expect("register").into_inner();
        let interval = Duration::from_millis(u64::from(reply.heartbeat_interval_ms));
        self.stop_heartbeats();
        self.silenced = Arc::default();
        tokio::spawn(heartbeat(client, self.id.clone(), self.state.clone(), interval, self.silenced.clone()));
    }

    /// Goes silent, as a hung or partitioned worker does: the stream stays open, beats stop.
    pub fn stop_heartbeats(&mut self) {
        self.silenced.store(true, Ordering::SeqCst);
    }

    /// Stops serving gRPC (heartbeats go on): calls to it fail to connect.
    pub fn stop_server(&mut self) {
        self.stop_server.take();
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}

async fn heartbeat(
    mut client: HeadClient<tonic::transport::Channel>,
    id: String,
    state: Arc<FakeState>,
    every: Duration,
    silenced: Arc<AtomicBool>,
) {
    let beats = futures::stream::unfold(tokio::time::interval(every), move |mut ticker| {
        let (id, state, silenced) = (id.clone(), state.clone(), silenced.clone());
        async move {
            ticker.tick().await;
            if silenced.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let load = state.reported_load.lock().unwrap().clone();
            let replicas = state
                .hosted
                .lock()
                .unwrap()
                .iter()
                .map(|r| {
                    let (running, waiting) = load.get(&r.replica_id).copied().unwrap_or_default();
                    pb::ReplicaStats {
                        replica_id: r.replica_id.clone(),
                        model_name: r.model_name.clone(),
                        running,
                        waiting,
                        state: pb::ReplicaState::Running as i32,
                        ..Default::default()
                    }
                })
                .collect();
            Some((pb::WorkerHeartbeat { worker_id: id, unix_ms: 0, replicas, draining: false }, ticker))
        }
    });
    if let Ok(acks) = client.heartbeat(beats).await {
        let mut acks = acks.into_inner();
        while let Ok(Some(_)) = acks.message().await {}
    }
}

pub fn running_info(replica_id: &str, model: &str) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        replica_id: replica_id.into(),
        model_name: model.into(),
        max_model_len: 2048,
        state: pb::ReplicaState::Running as i32,
        ..Default::default()
    }
}

struct FakeService {
    state: Arc<FakeState>,
}

impl FakeService {
    fn check_hosted(&self, replica_id: &str) -> Result<(), Status> {
        let hosted = self.state.hosted.lock().unwrap().iter().any(|r| r.replica_id == replica_id);
        if !hosted {
            return Err(Status::not_found(format!("no replica `{replica_id}`")));
        }
        if self.state.draining.lock().unwrap().iter().any(|id| id == replica_id) {
            return Err(Status::unavailable(format!("replica `{replica_id}` is stopping")));
        }
        Ok(())
    }
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for FakeService {
    async fn start_replica(
        &self,
        request: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let req = request.into_inner();
        self.state.starts.lock().unwrap().push(req.clone());
        let options: serde_json::Value = serde_json::from_str(&req.engine_options_json)
            .map_err(|e| Status::invalid_argument(format!("engine options: {e}")))?;
        let model = options["served_model_name"].as_str().unwrap_or("unnamed").to_owned();
        let script = self.state.start_script.lock().unwrap().clone();
        if let StartScript::RunWhenOpened(gate) = &script {
            gate.passed().await;
        }
        let info = match script {
            StartScript::Run | StartScript::RunWhenOpened(_) => {
                let mut info = running_info(&req.replica_id, &model);
                info.max_model_len = options["max_model_len"].as_u64().unwrap_or(0) as u32;
                self.state.hosted.lock().unwrap().push(info.clone());
                info
            }
            StartScript::ReportFailure(message) => pb::ReplicaInfo {
                replica_id: req.replica_id,
                model_name: model,
                state: pb::ReplicaState::Failed as i32,
                message,
                ..Default::default()
            },
        };
        Ok(Response::new(info))
    }

    async fn stop_replica(
        &self,
        request: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaReply>, Status> {
        // Like a real worker: refuse new requests, let the streams finish for the drain timeout,
        // then end what is left and forget the replica.
        let req = request.into_inner();
        let active = self.state.active_streams(&req.replica_id);
        self.state.active_at_stop.lock().unwrap().insert(req.replica_id.clone(), active);
        self.state.stops.lock().unwrap().push(req.clone());
        self.state.draining.lock().unwrap().push(req.replica_id.clone());
        let gate = self.state.stop_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.passed().await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(req.drain_timeout_ms));
        while self.state.active_streams(&req.replica_id) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.state.killed.send_modify(|killed| killed.push(req.replica_id.clone()));
        self.state.hosted.lock().unwrap().retain(|r| r.replica_id != req.replica_id);
        self.state.draining.lock().unwrap().retain(|id| *id != req.replica_id);
        Ok(Response::new(pb::StopReplicaReply {}))
    }

    type GenerateStream = Events;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Events>, Status> {
        let req = request.into_inner();
        self.state.generates.lock().unwrap().push(req.clone());
        self.check_hosted(&req.replica_id)?;
        let script = self.state.generate_script.lock().unwrap().clone();
        if let GenerateScript::Refuse { code, message, param } = &script {
            let mut status = Status::new(*code, message.clone());
            if let Some(param) = param {
                status.metadata_mut().insert("lumen-param", param.parse().expect("ascii param"));
            }
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(8);
        let state = self.state.clone();
        let active = ActiveStream::new(state.clone(), req.replica_id.clone());
        tokio::spawn(async move {
            let _active = active;
            let mut killed = state.killed.subscribe();
            let finished = tokio::select! {
                finished = play(&tx, script) => finished,
                () = async { drop(killed.wait_for(|k| k.contains(&req.replica_id)).await) } => {
                    let _ = tx.send(Err(Status::unavailable("the replica was stopped"))).await;
                    true
                }
            };
            if !finished {
                tx.closed().await;
            }
            if tx.is_closed() && !finished {
                state.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(&self, _request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortReply>, Status> {
        Ok(Response::new(pb::AbortReply {}))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeReply>, Status> {
        let req = request.into_inner();
        self.check_hosted(&req.replica_id)?;
        self.state.tokenizes.lock().unwrap().push(req.replica_id.clone());
        let text = match req.input {
            Some(pb::tokenize_request::Input::Text(t)) => t.text,
            _ => return Err(Status::invalid_argument("text only")),
        };
        let token_ids: Vec<u32> = text.bytes().map(u32::from).collect();
        Ok(Response::new(pb::TokenizeReply {
            count: token_ids.len() as u32,
            token_ids,
            max_model_len: 2048,
            token_strs: vec![],
        }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeReply>, Status> {
        let req = request.into_inner();
        self.check_hosted(&req.replica_id)?;
        let text = req.token_ids.iter().filter_map(|&t| char::from_u32(t)).collect();
        Ok(Response::new(pb::DetokenizeReply { text }))
    }

    async fn stats(&self, _request: Request<pb::StatsRequest>) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(pb::WorkerStats::default()))
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthReply>, Status> {
        let req = request.into_inner();
        self.state.health_checks.lock().unwrap().push(req.replica_id.clone());
        self.check_hosted(&req.replica_id)?;
        let script = self.state.health_script.lock().unwrap().clone();
        let reply = match script {
            HealthScript::Healthy => pb::CheckHealthReply { healthy: true, ..Default::default() },
            HealthScript::Stuck(message) => pb::CheckHealthReply { healthy: false, message, ..Default::default() },
            HealthScript::Hang => std::future::pending().await,
        };
        Ok(Response::new(reply))
    }
}

/// Sends the scripted events; returns whether the stream reached its natural end.
async fn play(tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>, script: GenerateScript) -> bool {
    use pb::generate_event::Event;
    let started =
        pb::GenerateEvent { event: Some(Event::Started(pb::Started { prompt_tokens: 4, ..Default::default() })) };
    let delta = |i: u32| pb::GenerateEvent {
        event: Some(Event::Delta(pb::Delta { text: format!("t{i}"), token_ids: vec![i], ..Default::default() })),
    };
    if tx.send(Ok(started)).await.is_err() {
        return false;
    }
    match script {
        GenerateScript::Finish { deltas } => {
            for i in 0..deltas {
                if tx.send(Ok(delta(i))).await.is_err() {
                    return false;
                }
            }
            let finished = pb::GenerateEvent { event: Some(Event::Finished(pb::Finished::default())) };
            tx.send(Ok(finished)).await.is_ok()
        }
        GenerateScript::Hold => {
            let _ = tx.send(Ok(delta(0))).await;
            false
        }
        GenerateScript::FailMidStream(code) => {
            let _ = tx.send(Ok(delta(0))).await;
            tx.send(Err(Status::new(code, "engine failed"))).await.is_ok()
        }
        GenerateScript::Refuse { .. } => true,
        GenerateScript::Slow { deltas, every } => {
            for i in 0..deltas {
                tokio::time::sleep(every).await;
                if tx.send(Ok(delta(i))).await.is_err() {
                    return false;
                }
            }
            let finished = pb::GenerateEvent { event: Some(Event::Finished(pb::Finished::default())) };
            tx.send(Ok(finished)).await.is_ok()
        }
    }
}

pub fn chat_request(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt: Some(pb::generate_request::Prompt::Text(pb::TextPrompt {
            text: "hi".into(),
            add_special_tokens: true,
        })),
        n: 1,
        ..Default::default()
    }
}

/// Collects a stream to its end (bounded, so a hang fails the test instead of stalling it).
pub async fn collect(stream: EventStream) -> Vec<Result<pb::GenerateEvent, BackendError>> {
    tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>()).await.expect("stream ended in time")
}

/// Polls `condition` until it holds, failing after 10 s with `what`.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running replica of `model` is routable.
pub async fn until_routable(head: &TestHead, deployment: &str, count: usize) {
    eventually(&format!("{count} replicas of `{deployment}` run"), || {
        head.cluster
            .snapshot()
            .deployments
            .iter()
            .any(|d| d.spec.name == deployment && d.running_replicas as usize == count)
    })
    .await;
}
