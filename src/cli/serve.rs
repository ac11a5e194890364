//! `lumen serve`: a head and one worker in one process, talking the same gRPC over loopback, the
//! quick start and the single-machine deployment.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lumen_head::api::ModelApiOptions;
use lumen_head::cluster::Deployment;
use tokio_util::sync::CancellationToken;

use super::ServeArgs;
use super::head::{self, DeploymentPlan};

/// The deployment `--model` and its flags describe.
fn plan_from_flags(args: &ServeArgs) -> anyhow::Result<DeploymentPlan> {
    Ok(DeploymentPlan {
        deployment: Deployment {
            name: "default".into(),
            model_name: args.engine.served_name().to_string(),
            engine_options_json: serde_json::to_string(&args.engine)?,
            ..Deployment::default()
        },
        api: ModelApiOptions {
            reasoning_parser: args
                .reasoning_parser
                .as_deref()
                .map(|p| p.parse().map_err(anyhow::Error::msg))
                .transpose()?,
            admission: None,
        },
    })
}

/// How often the start-up wait looks at the head.
const DEPLOY_POLL: Duration = Duration::from_millis(50);
/// How long an application may stay `UNHEALTHY` after the worker joined before the wait gives
/// up on it (a model that fails to load; its status says why).
const UNHEALTHY_GRACE: Duration = Duration::from_secs(3);

/// Waits until the head serves what it deploys: the in-process worker has joined and every
/// application runs (or stays unhealthy, e.g. its model failed to load). The ready line then
/// means requests are served, not refused in the moment before the worker registers.
async fn wait_until_deployed(dashboard: SocketAddr, shutdown: &CancellationToken) {
    let host = if dashboard.ip().is_unspecified() { Ipv4Addr::LOCALHOST.into() } else { dashboard.ip() };
    let base = format!("http://{}", SocketAddr::new(host, dashboard.port()));
    let http = reqwest::Client::new();
    let mut joined_at = None;
    loop {
        match deployment_progress(&http, &base).await {
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
    /// No worker has registered yet (or the head does not answer yet).
    Joining,
    Deploying,
    Unhealthy,
    /// Every application is `RUNNING`.
    Serving,
}

async fn deployment_progress(http: &reqwest::Client, base: &str) -> Progress {
    let get = |path: &str| {
        let request = http.get(format!("{base}{path}")).send();
        async move { request.await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    let Some(cluster) = get("/api/cluster").await else { return Progress::Joining };
    if !cluster["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["alive"] == true)) {
        return Progress::Joining;
    }
    let Some(status) = get("/api/serve/applications/").await else { return Progress::Joining };
    let statuses: Vec<&str> = status["applications"]
        .as_object()
        .map(|apps| apps.values().filter_map(|app| app["status"].as_str()).collect())
        .unwrap_or_default();
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
    let shutdown = CancellationToken::new();
    super::shutdown::cancel_on_signal(shutdown.clone());
    // The worker stops only after the head has drained its HTTP requests (which it serves).
    let worker_shutdown = CancellationToken::new();
    let head = head::start(&args.head, plans, shutdown.clone()).await?;
    let head_url = format!("http://127.0.0.1:{}", head.grpc.port());
    let loopback = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
    let id = format!("{}-{}", super::hostname(), std::process::id());
    let join_token = args.head.cluster.join_token.clone();
    let mut worker = super::worker::start(loopback, None, id, head_url, join_token, worker_shutdown.clone()).await?;
    let stats_log = lumen_worker::service::spawn_stats_logger(
        worker.node.clone(),
        args.stats_log.interval(),
        worker_shutdown.clone(),
    );
    worker.tasks.extend(stats_log);
    wait_until_deployed(head.dashboard, &shutdown).await;
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
    tracing::info!("stopped");
    Ok(())
}
