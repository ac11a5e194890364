//! Membership: the task that registers this worker with the head and streams heartbeats.
//!
//! One session: dial the head's `Head` service, call `Register` (protocol version, worker id,
//! the address the head should dial back, resources, the replicas hosted right now, join token,
//! Lumen version), check the reply's protocol version, then send a `WorkerHeartbeat` with the
//! stats of every replica each `heartbeat_interval_ms` of the reply, reading the head's acks.
//! Any failure (head unreachable, refused, version mismatch, stream broken or ended) ends the
//! session; the task logs it and starts a new one after a backoff that doubles from
//! `initial_backoff` to `max_backoff` and resets once a session got registered. Every new
//! session re-registers with the replicas the worker still hosts, so a restarted head learns
//! them. The task ends only when its cancellation token is cancelled. An `https://` head is
//! dialed over TLS and must present a certificate signed by the config's roots; one that does
//! not is reported as such (`UntrustedHead`, naming `--ssl-ca-certs`). The config's client
//! certificate, if any, is presented to a head that asks for one; a head that refuses it (or
//! requires one and got none) is reported as such too (`ClientCertificateRefused`, naming the
//! head's `--ssl-cert-reqs` and this worker's `--ssl-certfile`).
//!
//! Draining: once [`WorkerNode::begin_drain`] is called, a heartbeat saying `draining` goes out
//! at once (and every later heartbeat and registration says so too); when the head has
//! acknowledged it (acks come in order, one per heartbeat; a registration that said draining
//! counts as acknowledged), the task calls [`WorkerNode::note_drain_acknowledged`].

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lumen_proto::PROTOCOL_VERSION;
use lumen_proto::tls::{CertificateFailure, ClientTls, certificate_failure};
use lumen_proto::v1 as pb;
use lumen_proto::v1::head_client::HeadClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::node::WorkerNode;

/// The heartbeat interval used when the head's reply gives none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The shortest heartbeat interval honoured, whatever the head asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// How long dialing and `Register` may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings that notice a head that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Where and how to register.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The head's gRPC URL, e.g. `http://head:50051`.
    pub head_url: String,
    /// The URL where the head reaches this worker's `Worker` service, e.g. `http://10.0.0.7:50061`.
    pub advertise_address: String,
    /// Sent as `join_token`; empty when the head requires none.
    pub join_token: String,
    /// Whom an `https://` head must prove to be (`--ssl-ca-certs`, else the system's roots), and
    /// the client certificate presented to it.
    pub tls: ClientTls,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RegistrationConfig {
    /// A config with the default backoff (1 s doubling to 10 s) and no join token.
    pub fn new(head_url: impl Into<String>, advertise_address: impl Into<String>) -> RegistrationConfig {
        RegistrationConfig {
            head_url: head_url.into(),
            advertise_address: advertise_address.into(),
            join_token: String::new(),
            tls: ClientTls::system(),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Why a registration session ended.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("invalid head URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the head at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "the head at {url} presented a certificate this worker does not trust ({reason}); pass the CA that \
         signed it with --ssl-ca-certs"
    )]
    UntrustedHead { url: String, reason: String },
    #[error(
        "the head at {url} refused the TLS handshake: {reason}; a head with --ssl-cert-reqs 1 or 2 needs this \
         worker's --ssl-certfile/--ssl-keyfile to be a certificate signed by a CA of its --ssl-ca-certs"
    )]
    ClientCertificateRefused { url: String, reason: String },
    #[error("cannot set up TLS to the head at {url}: {reason} (--ssl-ca-certs names the CA to trust)")]
    Tls { url: String, reason: String },
    #[error("the head refused the registration: {0}")]
    Refused(tonic::Status),
    #[error("the head did not answer the registration within {0:?}")]
    RegisterTimeout(Duration),
    #[error("protocol version mismatch: the head speaks {head}, this worker {worker}")]
    ProtocolMismatch { head: u32, worker: u32 },
    #[error("the heartbeat stream broke: {0}")]
    Heartbeat(tonic::Status),
    #[error("the head closed the heartbeat stream")]
    HeadClosed,
}

/// Spawns [`run_registration`] on the current runtime.
pub fn spawn_registration(node: WorkerNode, config: RegistrationConfig, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(run_registration(node, config, shutdown))
}

/// Registers and heartbeats until `shutdown` is cancelled (see the module docs).
pub async fn run_registration(node: WorkerNode, config: RegistrationConfig, shutdown: CancellationToken) {
    let mut backoff = config.initial_backoff;
    loop {
        let mut registered = false;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&node, &config, &mut registered) => r,
        };
        if registered {
            backoff = config.initial_backoff;
        }
        let Err(e) = result;
        tracing::warn!(head = %config.head_url, error = %e, retry_in_ms = backoff.as_millis() as u64, "head connection lost");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

async fn connect(config: &RegistrationConfig) -> Result<Channel, RegistrationError> {
    let url = config.head_url.clone();
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| RegistrationError::BadUrl { url: url.clone(), reason: e.to_string() })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let endpoint =
        config.tls.apply(endpoint).map_err(|e| RegistrationError::Tls { url: url.clone(), reason: error_chain(&e) })?;
    endpoint.connect().await.map_err(|e| match certificate_failure(&e) {
        Some(failure) => refusal(&url, failure),
        None => RegistrationError::Connect { reason: error_chain(&e), url },
    })
}

/// A certificate problem with the head at `url` as a registration error.
fn refusal(url: &str, failure: CertificateFailure) -> RegistrationError {
    let url = url.to_owned();
    match failure {
        CertificateFailure::Refused(reason) => RegistrationError::UntrustedHead { url, reason },
        refused => RegistrationError::ClientCertificateRefused { url, reason: refused.as_seen_by_client() },
    }
}

/// Why `Register` failed: a certificate problem when the call ended at the TLS handshake (with
/// TLS 1.3 the head judges the client certificate after the worker's half of the handshake, so
/// a refusal surfaces on this first call; see [`ClientTls::call_failure`]), else the head's
/// answer.
async fn register_failure(config: &RegistrationConfig, status: tonic::Status) -> RegistrationError {
    match config.tls.call_failure(&config.head_url, &status).await {
        Some(failure) => refusal(&config.head_url, failure),
        None => RegistrationError::Refused(status),
    }
}

/// One register + heartbeat session; it ends only by failing (at shutdown the caller drops it).
/// Sets `registered` once the head accepted the worker.
async fn session(
    node: &WorkerNode,
    config: &RegistrationConfig,
    registered: &mut bool,
) -> Result<Infallible, RegistrationError> {
    let mut client = HeadClient::new(connect(config).await?);
    let request = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: node.worker_id().to_string(),
        address: config.advertise_address.clone(),
        resources: Some(node.resources().clone()),
        replicas: node.replicas(),
        join_token: config.join_token.clone(),
        lumen_version: env!("CARGO_PKG_VERSION").to_string(),
        draining: node.is_draining(),
    };
    let registered_draining = request.draining;
    let replicas = request.replicas.len();
    let reply = match tokio::time::timeout(REGISTER_TIMEOUT, client.register(request)).await {
        Err(_) => return Err(RegistrationError::RegisterTimeout(REGISTER_TIMEOUT)),
        Ok(Err(status)) => return Err(register_failure(config, status).await),
        Ok(Ok(reply)) => reply.into_inner(),
    };
    if reply.protocol_version != PROTOCOL_VERSION {
        return Err(RegistrationError::ProtocolMismatch { head: reply.protocol_version, worker: PROTOCOL_VERSION });
    }
    *registered = true;
    if registered_draining {
        node.note_drain_acknowledged();
    }
    let interval = match reply.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)).max(MIN_HEARTBEAT),
    };
    tracing::info!(head = %config.head_url, worker_id = node.worker_id(), replicas, interval_ms = interval.as_millis() as u64, "registered with the head");

    // The first heartbeat is queued before the call, so a head that waits for it before
    // answering cannot deadlock the stream.
    let (tx, rx) = mpsc::channel(4);
    let mut beats = Beats::default();
    beats.send(node, &tx).await?;
    let mut acks = client.heartbeat(ReceiverStream::new(rx)).await.map_err(RegistrationError::Heartbeat)?.into_inner();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => beats.send(node, &tx).await?,
            () = node.drain_started(), if beats.drain_seq.is_none() => beats.send(node, &tx).await?,
            ack = acks.message() => match ack {
                Ok(Some(_)) => beats.acked(node),
                Ok(None) => return Err(RegistrationError::HeadClosed),
                Err(status) => return Err(RegistrationError::Heartbeat(status)),
            },
        }
    }
}

/// The heartbeats of one session: how many went out and were acknowledged, and which one first
/// said draining.
#[derive(Default)]
struct Beats {
    sent: u64,
    acked: u64,
    drain_seq: Option<u64>,
}

impl Beats {
    async fn send(
        &mut self,
        node: &WorkerNode,
        tx: &mpsc::Sender<pb::WorkerHeartbeat>,
    ) -> Result<(), RegistrationError> {
        let beat = heartbeat(node).await;
        let draining = beat.draining;
        tx.send(beat).await.map_err(|_| RegistrationError::HeadClosed)?;
        self.sent += 1;
        if draining && self.drain_seq.is_none() {
            self.drain_seq = Some(self.sent);
        }
        Ok(())
    }

    fn acked(&mut self, node: &WorkerNode) {
        self.acked += 1;
        if self.drain_seq.is_some_and(|seq| self.acked >= seq) {
            node.note_drain_acknowledged();
        }
    }
}

async fn heartbeat(node: &WorkerNode) -> pb::WorkerHeartbeat {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    // Read before the stats, so a drain that starts meanwhile is sent by the next beat at least.
    let draining = node.is_draining();
    pb::WorkerHeartbeat { worker_id: node.worker_id().to_string(), unix_ms, replicas: node.stats().await, draining }
}

/// An error with its sources, for logs (tonic's transport errors hide the cause otherwise).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
