//! Starting a worker: its gRPC service, and the registration loop that joins it to a head;
//! `lumen worker` adds its own `/metrics` port and the periodic engine log line.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use lumen_worker::service::{
    RegistrationConfig, WorkerNode, detect_resources, serve_metrics, serve_worker, spawn_registration,
    spawn_stats_logger,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::WorkerArgs;

/// A running worker.
pub struct RunningWorker {
    pub address: SocketAddr,
    pub node: WorkerNode,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Binds the worker's gRPC port, serves it and registers with `head_url`.
pub async fn start(
    bind: SocketAddr,
    advertise: Option<String>,
    worker_id: String,
    head_url: String,
    join_token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningWorker> {
    let listener = TcpListener::bind(bind).await.with_context(|| format!("binding the worker port {bind}"))?;
    let address = listener.local_addr()?;
    let advertise = advertise.unwrap_or_else(|| {
        let host = if address.ip().is_unspecified() { super::hostname() } else { address.ip().to_string() };
        format!("http://{host}:{}", address.port())
    });
    let node = WorkerNode::new(worker_id, detect_resources());
    let mut tasks = Vec::new();
    let (serving, stop) = (node.clone(), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serve_worker(listener, serving, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the worker's gRPC server failed");
        }
    }));
    let mut registration = RegistrationConfig::new(head_url, advertise);
    registration.join_token = join_token.unwrap_or_default();
    tasks.push(spawn_registration(node.clone(), registration, shutdown));
    Ok(RunningWorker { address, node, tasks })
}

/// `lumen worker`: joins the head and serves until a signal, then drains its replicas.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    super::shutdown::cancel_on_signal(shutdown.clone());
    let id = args.worker_id.clone().unwrap_or_else(|| format!("{}-{}", super::hostname(), std::process::id()));
    let bind = SocketAddr::new(args.host, args.port);
    let mut worker =
        start(bind, args.advertise_address.clone(), id, args.head.clone(), args.join_token.clone(), shutdown.clone())
            .await?;
    let mut listening = vec![("grpc", worker.address)];
    if !args.no_metrics {
        let bind = SocketAddr::new(args.host, args.metrics_port);
        let listener =
            TcpListener::bind(bind).await.with_context(|| format!("binding the worker's metrics port {bind}"))?;
        listening.push(("metrics", listener.local_addr()?));
        let (node, stop) = (worker.node.clone(), shutdown.clone());
        worker.tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_metrics(listener, node, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the worker's metrics server failed");
            }
        }));
    }
    worker.tasks.extend(spawn_stats_logger(worker.node.clone(), args.stats_log.interval(), shutdown.clone()));
    super::print_ready("worker", &listening);
    shutdown.cancelled().await;
    let drain = Duration::from_secs(args.drain_timeout_s);
    worker.node.stop_all(drain).await;
    super::shutdown::drain(worker.tasks, drain).await;
    Ok(())
}
