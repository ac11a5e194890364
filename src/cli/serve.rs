//! `lumen serve`: a head and one worker in one process, talking the same gRPC over loopback, the
//! quick start and the single-machine deployment.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

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
    let worker = super::worker::start(loopback, None, id, head_url, join_token, worker_shutdown.clone()).await?;
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
