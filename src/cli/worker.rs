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
//!
//! `lumen worker --simulate STEP_MS` runs the simulated engine instead of loading models
//! (`lumen_worker::engine::simulated`: each running request gets a time-stamped token every
//! STEP_MS), and with `--simulated-workers N` one process stands for N workers (ids
//! `<worker-id>-<i>`, each with its own gRPC port and registration, no metrics port): what
//! `lumen bench head` and the head's scale tests run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use lumen_proto::tls::{ClientTls, ServerTls};
use lumen_worker::engine::simulated::{SimTokenizers, SimulatedEngine};
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
/// The most workers one `--simulate` process stands for.
const MAX_SIMULATED_WORKERS: usize = 4096;

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
    /// Run this simulated engine instead of loading models (see the module docs).
    pub simulated: Option<(SimulatedEngine, SimTokenizers)>,
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
    let node = match setup.simulated {
        None => WorkerNode::new(setup.worker_id, detect_resources()),
        Some((engine, tokenizers)) => WorkerNode::simulated(setup.worker_id, detect_resources(), engine, tokenizers),
    };
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
    let simulated = simulation(&args)?;
    let count = if simulated.is_some() { args.simulated_workers } else { 1 };
    let mut workers = Vec::with_capacity(count);
    for i in 0..count {
        let (worker_id, port) = match count {
            1 => (id.clone(), args.port),
            _ => (format!("{id}-{i}"), if args.port == 0 { 0 } else { simulated_port(args.port, i)? }),
        };
        let setup = WorkerSetup {
            bind: SocketAddr::new(args.host, port),
            advertise: args.advertise_address.clone(),
            worker_id,
            head_url: args.head.clone(),
            join_token: args.join_token.clone(),
            tls: tls.clone(),
            trust: args.tls.client()?,
            simulated: simulated.clone(),
        };
        workers.push(start(setup, shutdown.clone()).await?);
    }
    let names: Vec<String> = (0..count).map(|i| if i == 0 { "grpc".into() } else { format!("grpc-{i}") }).collect();
    let mut listening: Vec<(&str, SocketAddr)> =
        names.iter().map(String::as_str).zip(workers.iter().map(|w| w.address)).collect();
    let first = &mut workers[0];
    if !args.no_metrics && count == 1 {
        let bind = SocketAddr::new(args.host, args.metrics_port);
        let listener =
            TcpListener::bind(bind).await.with_context(|| format!("binding the worker's metrics port {bind}"))?;
        listening.push(("metrics", listener.local_addr()?));
        let (node, stop) = (first.node.clone(), shutdown.clone());
        first.tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_metrics_tls(listener, node, tls.as_ref(), stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the worker's metrics server failed");
            }
        }));
    }
    if count == 1 {
        first.tasks.extend(spawn_stats_logger(first.node.clone(), args.stats_log.interval(), shutdown.clone()));
    }
    super::print_ready("worker", &listening);
    signal.cancelled().await;
    let drain = Duration::from_secs(args.drain_timeout_s);
    futures::future::join_all(workers.iter().map(|w| drain_node(&w.node, drain))).await;
    shutdown.cancel();
    super::shutdown::drain(workers.into_iter().flat_map(|w| w.tasks).collect(), drain).await;
    super::flush_traces().await;
    Ok(())
}

/// The simulated engine `--simulate` asks for, checked against the other flags.
fn simulation(args: &WorkerArgs) -> anyhow::Result<Option<(SimulatedEngine, SimTokenizers)>> {
    let Some(step_ms) = args.simulate else {
        if args.simulated_workers != 1 {
            anyhow::bail!("--simulated-workers needs --simulate");
        }
        return Ok(None);
    };
    let step = Duration::try_from_secs_f64(step_ms / 1e3).ok().filter(|s| !s.is_zero());
    let Some(step) = step else {
        anyhow::bail!("--simulate takes a step time in milliseconds above 0, got {step_ms}");
    };
    if args.simulated_workers == 0 || args.simulated_workers > MAX_SIMULATED_WORKERS {
        anyhow::bail!(
            "--simulated-workers must be between 1 and {MAX_SIMULATED_WORKERS}, got {}",
            args.simulated_workers
        );
    }
    if args.simulated_workers > 1 && args.advertise_address.is_some() {
        anyhow::bail!("--advertise-address names one worker; with --simulated-workers each advertises its own port");
    }
    if args.port != 0 {
        simulated_port(args.port, args.simulated_workers - 1)?;
    }
    let engine = SimulatedEngine { step, ..SimulatedEngine::default() };
    Ok(Some((engine, SimTokenizers::default())))
}

/// The gRPC port of simulated worker `i` when the first takes `first`.
fn simulated_port(first: u16, i: usize) -> anyhow::Result<u16> {
    u16::try_from(i).ok().and_then(|i| first.checked_add(i)).ok_or_else(|| {
        anyhow::anyhow!("--port {first} leaves no port for simulated worker {i}: give --port 0 or a lower one")
    })
}

/// Drains one node: tells the head, waits for its acknowledgement (bounded), lets every replica
/// finish its requests (at most `drain`).
async fn drain_node(node: &WorkerNode, drain: Duration) {
    node.begin_drain();
    if tokio::time::timeout(DRAIN_NOTICE_TIMEOUT, node.drain_acknowledged()).await.is_err() {
        tracing::warn!(timeout = ?DRAIN_NOTICE_TIMEOUT, "the head did not acknowledge the drain; stopping the replicas anyway");
    }
    node.stop_all(drain).await;
}
