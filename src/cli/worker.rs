//! Starting a worker: its gRPC service, and the registration loop that joins it to a head;
//! `lumen worker` adds its own `/metrics` port and the periodic engine log line. With
//! `--ssl-certfile`/`--ssl-keyfile` both ports speak TLS and the worker advertises `https://`;
//! `--ssl-ca-certs` is whom an `https://` head must prove to be.
//!
//! `lumen worker` on SIGTERM or Ctrl-C drains: it tells the head (a heartbeat saying `draining`,
//! so the head routes nothing new here and places replacement replicas elsewhere), waits for the
//! head's acknowledgement (at most [`DRAIN_NOTICE_TIMEOUT`]), lets every replica finish its
//! in-flight requests (at most `--drain-timeout-s`) while its gRPC server keeps serving them, and
//! only then stops its servers and the registration task and exits.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use lumen_proto::tls::{ClientTls, ServerTls};
use lumen_worker::service::grpc::serve_worker_tls;
use lumen_worker::service::metrics_http::serve_metrics_tls;
use lumen_worker::service::{RegistrationConfig, WorkerNode, detect_resources, spawn_registration, spawn_stats_logger};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::WorkerArgs;

/// How long a draining worker waits for the head to acknowledge its drain before it stops its
/// replicas anyway (a head that is down or does not know the field never acknowledges).
const DRAIN_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running worker.
pub struct RunningWorker {
    pub address: SocketAddr,
    pub node: WorkerNode,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Where a worker listens, whom it joins, and its TLS.
pub struct WorkerSetup {
    pub bind: SocketAddr,
    /// The URL the head dials; default `http(s)://<host>:<port>` of `bind`.
    pub advertise: Option<String>,
    pub worker_id: String,
    pub head_url: String,
    pub join_token: Option<String>,
    /// Serve gRPC over TLS (advertised as `https://`).
    pub tls: Option<ServerTls>,
    /// Whom an `https://` head must prove to be.
    pub trust: ClientTls,
}

/// Binds the worker's gRPC port, serves it and registers with the head.
pub async fn start(setup: WorkerSetup, shutdown: CancellationToken) -> anyhow::Result<RunningWorker> {
    let bind = setup.bind;
    let listener = TcpListener::bind(bind).await.with_context(|| format!("binding the worker port {bind}"))?;
    let address = listener.local_addr()?;
    let advertise = setup.advertise.unwrap_or_else(|| {
        let host = if address.ip().is_unspecified() { super::hostname() } else { address.ip().to_string() };
        let scheme = if setup.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{host}:{}", address.port())
    });
    let node = WorkerNode::new(setup.worker_id, detect_resources());
    let mut tasks = Vec::new();
    let (serving, stop, tls) = (node.clone(), shutdown.clone(), setup.tls);
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serve_worker_tls(listener, serving, tls.as_ref(), stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the worker's gRPC server failed");
        }
    }));
    let mut registration = RegistrationConfig::new(setup.head_url, advertise);
    registration.join_token = setup.join_token.unwrap_or_default();
    registration.tls = setup.trust;
    tasks.push(spawn_registration(node.clone(), registration, shutdown));
    Ok(RunningWorker { address, node, tasks })
}

/// `lumen worker`: joins the head and serves until a signal, then drains its replicas.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    args.otlp.init("lumen-worker")?;
    // `signal` starts the drain; `shutdown` stops the servers and the registration after it.
    let signal = CancellationToken::new();
    super::shutdown::cancel_on_signal(signal.clone());
    let shutdown = CancellationToken::new();
    let id = args.worker_id.clone().unwrap_or_else(|| format!("{}-{}", super::hostname(), std::process::id()));
    let tls = args.tls.server()?;
    let setup = WorkerSetup {
        bind: SocketAddr::new(args.host, args.port),
        advertise: args.advertise_address.clone(),
        worker_id: id,
        head_url: args.head.clone(),
        join_token: args.join_token.clone(),
        tls: tls.clone(),
        trust: args.tls.client()?,
    };
    let mut worker = start(setup, shutdown.clone()).await?;
    let mut listening = vec![("grpc", worker.address)];
    if !args.no_metrics {
        let bind = SocketAddr::new(args.host, args.metrics_port);
        let listener =
            TcpListener::bind(bind).await.with_context(|| format!("binding the worker's metrics port {bind}"))?;
        listening.push(("metrics", listener.local_addr()?));
        let (node, stop) = (worker.node.clone(), shutdown.clone());
        worker.tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_metrics_tls(listener, node, tls.as_ref(), stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the worker's metrics server failed");
            }
        }));
    }
    worker.tasks.extend(spawn_stats_logger(worker.node.clone(), args.stats_log.interval(), shutdown.clone()));
    super::print_ready("worker", &listening);
    signal.cancelled().await;
    let drain = Duration::from_secs(args.drain_timeout_s);
    worker.node.begin_drain();
    if tokio::time::timeout(DRAIN_NOTICE_TIMEOUT, worker.node.drain_acknowledged()).await.is_err() {
        tracing::warn!(timeout = ?DRAIN_NOTICE_TIMEOUT, "the head did not acknowledge the drain; stopping the replicas anyway");
    }
    worker.node.stop_all(drain).await;
    shutdown.cancel();
    super::shutdown::drain(worker.tasks, drain).await;
    super::flush_traces().await;
    Ok(())
}
