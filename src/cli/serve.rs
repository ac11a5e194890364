//! `lumen serve`: a head and one worker in one process, talking the same gRPC over loopback, the
//! quick start and the single-machine deployment. The public ports follow the TLS flags; the
//! in-process worker and the head's loopback gRPC port it registers at stay plain text (they
//! never leave 127.0.0.1).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lumen_head::api::ModelApiOptions;
use lumen_head::cluster::Deployment;
use lumen_head::control::Applications;
use lumen_proto::tls::ClientTls;
use tokio_util::sync::CancellationToken;

use super::ServeArgs;
use super::head::{self, DeploymentPlan};
use super::worker::WorkerSetup;

/// The deployment `--model` and its flags describe.
fn plan_from_flags(args: &ServeArgs) -> anyhow::Result<DeploymentPlan> {
    let reasoning_parser =
        args.reasoning_parser.as_deref().map(|p| p.parse().map_err(anyhow::Error::msg)).transpose()?;
    if let Some(structured) = &args.head.structured_outputs_config {
        structured
            .check_reasoning_parser(reasoning_parser)
            .map_err(|e| anyhow::anyhow!("--structured-outputs-config: reasoning_parser {e} (--reasoning-parser)"))?;
    }
    Ok(DeploymentPlan {
        deployment: Deployment {
            name: "default".into(),
            model_name: args.engine.served_name().to_string(),
            engine_options_json: serde_json::to_string(&args.engine)?,
            ..Deployment::default()
        },
        api: ModelApiOptions { reasoning_parser, ..ModelApiOptions::default() },
    })
}

/// How often the start-up wait looks at the head.
const DEPLOY_POLL: Duration = Duration::from_millis(50);
/// How long an application may stay `UNHEALTHY` after the worker joined before the wait gives
/// up on it (a model that fails to load; its status says why).
const UNHEALTHY_GRACE: Duration = Duration::from_secs(3);

/// Waits until the head serves what it deploys: the in-process worker has joined and every
/// application runs (or stays unhealthy, e.g. its model failed to load). The ready line then
/// means requests are served, not refused in the moment before the worker registers. Reads the
/// head's state in process, so it works the same whether the ports speak TLS or not.
async fn wait_until_deployed(applications: &Applications, shutdown: &CancellationToken) {
    let mut joined_at = None;
    loop {
        match deployment_progress(applications) {
            Progress::Serving => return,
            Progress::Unhealthy if joined_at.is_some_and(|t: Instant| t.elapsed() >= UNHEALTHY_GRACE) => {
                tracing::warn!("an application is unhealthy; see `lumen status`");
                return;
            }
            Progress::Joining => {}
            Progress::Deploying | Progress::Unhealthy => {
                if joined_at.is_none() {
                    tracing::info!("waiting for the deployments to start (loading the model)");
                    joined_at = Some(Instant::now());
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DEPLOY_POLL) => {}
        }
    }
}

enum Progress {
    /// No worker has registered yet.
    Joining,
    Deploying,
    Unhealthy,
    /// Every application is `RUNNING`.
    Serving,
}

fn deployment_progress(applications: &Applications) -> Progress {
    if !applications.cluster().snapshot().workers.iter().any(|w| w.alive) {
        return Progress::Joining;
    }
    let status = applications.status();
    let statuses: Vec<&str> = status.applications.values().map(|app| app.status.as_str()).collect();
    if statuses.iter().all(|s| *s == "RUNNING") {
        Progress::Serving
    } else if statuses.contains(&"UNHEALTHY") {
        Progress::Unhealthy
    } else {
        Progress::Deploying
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Deployed unless `--config` or the state directory say otherwise.
    let plans = vec![plan_from_flags(&args)?];
    // The head and the in-process worker share one exporter.
    args.head.otlp.init("lumen")?;
    let shutdown = CancellationToken::new();
    super::shutdown::cancel_on_signal(shutdown.clone());
    // The worker stops only after the head has drained its HTTP requests (which it serves).
    let worker_shutdown = CancellationToken::new();
    let head = head::start(&args.head, plans, true, shutdown.clone()).await?;
    // The in-process worker speaks plain gRPC on loopback only, whatever the public ports do.
    let setup = WorkerSetup {
        bind: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
        advertise: None,
        worker_id: format!("{}-{}", super::hostname(), std::process::id()),
        head_url: head.local_grpc_url.clone(),
        join_token: args.head.cluster.join_token.clone(),
        tls: None,
        trust: ClientTls::system(),
        simulated: None,
    };
    let mut worker = super::worker::start(setup, worker_shutdown.clone()).await?;
    let stats_log = lumen_worker::service::spawn_stats_logger(
        worker.node.clone(),
        args.stats_log.interval(),
        worker_shutdown.clone(),
    );
    worker.tasks.extend(stats_log);
    wait_until_deployed(&head.applications, &shutdown).await;
    super::print_ready(
        "serve",
        &[("api", head.api), ("dashboard", head.dashboard), ("grpc", head.grpc), ("worker", worker.address)],
    );
    shutdown.cancelled().await;
    let drain = Duration::from_secs(args.head.drain_timeout_s);
    head.drain(drain).await;
    worker_shutdown.cancel();
    worker.node.stop_all(Duration::from_secs(1)).await;
    super::shutdown::drain(worker.tasks, Duration::from_secs(5)).await;
    super::flush_traces().await;
    tracing::info!("stopped");
    Ok(())
}
