//! Starting the head: the cluster (gRPC for workers + controller), the OpenAI API and the
//! control server, all stopping together on one cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lumen_head::api::admission::AdmissionLimits;
use lumen_head::api::{ApiConfig, ApiState, router};
use lumen_head::cluster::{Cluster, serve_head};
use lumen_head::config::ServeConfig;
pub use lumen_head::plan::DeploymentPlan;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::HeadArgs;

/// A running head.
pub struct RunningHead {
    pub api: SocketAddr,
    pub dashboard: SocketAddr,
    pub grpc: SocketAddr,
    /// The HTTP servers: on shutdown they stop accepting and finish their requests.
    pub http: Vec<JoinHandle<()>>,
    /// The gRPC server and the controller: stopped once the HTTP servers are done (workers'
    /// heartbeat streams would otherwise hold a graceful stop open).
    pub cluster: Vec<JoinHandle<()>>,
}

impl RunningHead {
    /// Lets in-flight HTTP requests finish (up to `timeout`), then stops the cluster side.
    pub async fn drain(self, timeout: Duration) {
        super::shutdown::drain(self.http, timeout).await;
        for task in self.cluster {
            task.abort();
        }
    }
}

/// The deployments of a serve config file.
pub fn plans_from_config(path: &std::path::Path) -> anyhow::Result<Vec<DeploymentPlan>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the serve config {}", path.display()))?;
    let config = ServeConfig::from_yaml(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(lumen_head::plan::plans_from_config(&config).with_context(|| format!("in {}", path.display()))?)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} port {addr}"))
}

/// Binds every listener, starts every server, and returns once they are accepting.
pub async fn start(
    args: &HeadArgs,
    plans: Vec<DeploymentPlan>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningHead> {
    let cluster = Cluster::new(args.cluster.clone());
    let mut config = ApiConfig {
        api_keys: args.api_keys.iter().filter(|k| !k.is_empty()).cloned().collect(),
        max_body_bytes: args.max_body_size.as_u64() as usize,
        admission: AdmissionLimits { max_in_flight: args.max_ongoing_requests, max_queued: args.max_queued_requests },
        ..ApiConfig::default()
    };
    let mut deployments = Vec::new();
    for plan in plans {
        config.models.insert(plan.deployment.model_name.clone(), plan.api);
        deployments.push(plan.deployment);
    }
    cluster.set_deployments(deployments)?;
    let registry = prometheus::Registry::new();
    let state = ApiState::new(Arc::new(cluster.clone()), config, registry.clone())?;

    let api_listener = bind(SocketAddr::new(args.host, args.port), "API").await?;
    let dashboard_listener = bind(SocketAddr::new(args.host, args.dashboard_port), "dashboard").await?;
    let grpc_listener = bind(SocketAddr::new(args.host, args.grpc_port), "gRPC").await?;
    let (api, dashboard, grpc) =
        (api_listener.local_addr()?, dashboard_listener.local_addr()?, grpc_listener.local_addr()?);

    let (mut http, mut tasks) = (Vec::new(), Vec::new());
    let stop = shutdown.clone();
    let head_cluster = cluster.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serve_head(grpc_listener, head_cluster, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the head's gRPC server failed");
        }
    }));
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(cluster.clone().run_controller(stop.cancelled_owned())));
    let stop = shutdown.clone();
    http.push(tokio::spawn(async move {
        let served = axum::serve(api_listener, router(state)).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the API server failed");
        }
    }));
    let stop = shutdown.clone();
    let control = lumen_head::control::router(lumen_head::control::ControlState { cluster: cluster.clone(), registry });
    http.push(tokio::spawn(async move {
        let served = axum::serve(dashboard_listener, control).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the dashboard server failed");
        }
    }));
    tracing::info!(%api, %dashboard, %grpc, "head listening");
    Ok(RunningHead { api, dashboard, grpc, http, cluster: tasks })
}

/// `lumen head`: serves until a signal, then drains.
pub async fn run(args: HeadArgs) -> anyhow::Result<()> {
    let plans = match &args.config {
        Some(path) => plans_from_config(path)?,
        None => Vec::new(),
    };
    let shutdown = CancellationToken::new();
    super::shutdown::cancel_on_signal(shutdown.clone());
    let head = start(&args, plans, shutdown.clone()).await?;
    super::print_ready("head", &[("api", head.api), ("dashboard", head.dashboard), ("grpc", head.grpc)]);
    shutdown.cancelled().await;
    head.drain(Duration::from_secs(args.drain_timeout_s)).await;
    Ok(())
}
