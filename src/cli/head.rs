//! Starting the head: the cluster (gRPC for workers + controller), the OpenAI API and the
//! control server, all stopping together on one cancellation token. With `--ssl-certfile` and
//! `--ssl-keyfile` all three ports speak TLS; `--ssl-ca-certs` is whom `https://` workers must
//! prove to be.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lumen_head::api::edge::keys::{self, KeyEntry};
use lumen_head::api::generate::admission::AdmissionLimits;
use lumen_head::api::tools::ToolSettings;
use lumen_head::api::{ApiConfig, ApiState, router};
use lumen_head::cluster::{Cluster, ClusterMetrics, serve_head_tls};
use lumen_head::control::usage_store::UsageStore;
use lumen_head::control::{Applications, ControlState, KeysOrigin, ServeDocument, StartingPoint};
use lumen_head::observe::{History, history, run_sampler};
pub use lumen_head::plan::DeploymentPlan;
use lumen_head::state_store::StateStore;
use lumen_proto::tls::{ServerTls, serve_http};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::HeadArgs;

/// A running head.
pub struct RunningHead {
    pub api: SocketAddr,
    pub dashboard: SocketAddr,
    pub grpc: SocketAddr,
    /// Where an in-process worker registers: `http://` on loopback (`grpc` itself unless it
    /// speaks TLS, then a plain loopback-only listener of its own).
    pub local_grpc_url: String,
    /// The deployed applications and the cluster they run on.
    pub applications: Applications,
    /// The HTTP servers: on shutdown they stop accepting and finish their requests.
    pub http: Vec<JoinHandle<()>>,
    /// The gRPC server and the controller: stopped once the HTTP servers are done (workers'
    /// heartbeat streams would otherwise hold a graceful stop open).
    pub cluster: Vec<JoinHandle<()>>,
    /// The tenants' usage saved in `--state-dir`: saved a last time once the HTTP servers are done.
    pub usage: Option<Arc<UsageStore>>,
}

impl RunningHead {
    /// Lets in-flight HTTP requests finish (up to `timeout`), then stops the cluster side.
    pub async fn drain(self, timeout: Duration) {
        super::shutdown::drain(self.http, timeout).await;
        for task in self.cluster {
            task.abort();
        }
        if let Some(usage) = &self.usage {
            usage.save_logged().await;
        }
    }
}

/// Reads and validates a serve config file (YAML).
pub fn read_serve_config(path: &std::path::Path) -> anyhow::Result<ServeDocument> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the serve config {}", path.display()))?;
    ServeDocument::from_yaml(&text).with_context(|| format!("in {}", path.display()))
}

/// Reads `--config` for the head: the serve config, and its `api_keys:` section (if any) split
/// off (hashed, and never persisted with the config).
fn read_head_config(path: &std::path::Path) -> anyhow::Result<(ServeDocument, Option<Vec<KeyEntry>>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the serve config {}", path.display()))?;
    let mut value = lumen_head::config::parse_yaml(&text).with_context(|| format!("in {}", path.display()))?;
    let keys = keys::take_section(&mut value).with_context(|| format!("in {}", path.display()))?;
    let document = ServeDocument::from_value(value).with_context(|| format!("in {}", path.display()))?;
    Ok((document, keys))
}

/// The named API keys the head is given: `--api-keys-file`, or the `--config` file's section;
/// `None` without either (the state directory's are restored then).
fn named_keys(args: &HeadArgs, from_config: Option<Vec<KeyEntry>>) -> anyhow::Result<Option<Vec<KeyEntry>>> {
    let Some(path) = &args.api_keys_file else { return Ok(from_config) };
    if from_config.is_some() {
        anyhow::bail!("API keys are given both by --api-keys-file and by the --config file's api_keys section");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the API keys {}", path.display()))?;
    let value = lumen_head::config::parse_yaml(&text).with_context(|| format!("in {}", path.display()))?;
    keys::parse(&value).map(Some).with_context(|| format!("in {}", path.display()))
}

/// Sets the deployments the head starts with: `--config` (applied and persisted), else the
/// state directory's last applied config, else `fallback`.
fn initialize(
    args: &HeadArgs,
    document: Option<ServeDocument>,
    applications: &Applications,
    fallback: Vec<DeploymentPlan>,
) -> anyhow::Result<()> {
    let started =
        applications.initialize(document, fallback).with_context(|| match (&args.config, &args.state_dir) {
            (Some(path), _) => format!("applying the serve config {}", path.display()),
            (None, Some(dir)) => format!("restoring the serve config saved in {}", dir.display()),
            (None, None) => "deploying the model".to_string(),
        })?;
    match (started, &args.state_dir) {
        (StartingPoint::Restored, Some(dir)) => tracing::info!(state_dir = %dir.display(), "serve config restored"),
        (StartingPoint::ConfigFile, Some(dir)) => tracing::info!(state_dir = %dir.display(), "serve config persisted"),
        _ => {}
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} port {addr}"))
}

/// Serves the `Head` gRPC service on `listener` until `stop`.
fn spawn_head_service(
    listener: TcpListener,
    cluster: Cluster,
    tls: Option<ServerTls>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serve_head_tls(listener, cluster, tls.as_ref(), stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the head's gRPC server failed");
        }
    })
}

/// Serves `app` on `listener` (HTTPS with `tls`) until `stop`, then finishes its requests.
fn spawn_http(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<ServerTls>,
    stop: CancellationToken,
    what: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serve_http(listener, app, tls.as_ref(), stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the {what} server failed");
        }
    })
}

/// Binds every listener, starts every server, and returns once they are accepting. `fallback`
/// is deployed when neither `--config` nor the state directory say what to deploy. With
/// `local_worker` (`lumen serve`) and TLS on, the head also serves gRPC in plain text on a
/// loopback-only port for its in-process worker ([`RunningHead::local_grpc_url`]).
pub async fn start(
    args: &HeadArgs,
    fallback: Vec<DeploymentPlan>,
    local_worker: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningHead> {
    let tls = args.tls.server()?;
    let cluster = Cluster::new(args.cluster.clone());
    cluster.trust_workers(args.tls.client()?);
    let config = ApiConfig {
        api_keys: args.api_keys.iter().filter(|k| !k.is_empty()).cloned().collect(),
        max_body_bytes: args.max_body_size.as_u64() as usize,
        responses_store_max_entries: args.responses_store_max_entries,
        responses_store_max_bytes: args.responses_store_max_bytes.as_u64() as usize,
        admission: AdmissionLimits { max_in_flight: args.max_ongoing_requests, max_queued: args.max_queued_requests },
        queue_policy: args.queue_policy,
        log_requests: args.log_requests,
        stream_send_timeout: Duration::from_secs(args.stream_send_timeout_s),
        migration_limit: args.migration_limit,
        enable_prompt_tokens_details: args.enable_prompt_tokens_details,
        usage_retention_days: args.usage_retention_days,
        tools: ToolSettings {
            enable_auto_tool_choice: args.enable_auto_tool_choice,
            tool_call_parser: args.tool_call_parser,
        },
        structured_outputs: args.structured_outputs_config.unwrap_or_default(),
        ..ApiConfig::default()
    };
    let registry = prometheus::Registry::new();
    registry.register(Box::new(ClusterMetrics::new(cluster.clone())?))?;
    let state = ApiState::new(Arc::new(cluster.clone()), config, registry.clone())?;
    let (document, config_keys) = args.config.as_deref().map(read_head_config).transpose()?.unzip();
    let given_keys = named_keys(args, config_keys.flatten())?;
    let store = args.state_dir.as_deref().map(StateStore::open).transpose()?;
    let usage = match &store {
        Some(store) => Some(Arc::new(UsageStore::restore(state.usage().clone(), store.clone())?)),
        None => None,
    };
    let applications = Applications::new(cluster.clone(), state.clone(), store);
    let origin = applications.initialize_keys(given_keys).context("the named API keys")?;
    if origin == KeysOrigin::Restored {
        tracing::info!(tenants = state.keys().list().len(), "API keys restored from the state directory");
    }
    initialize(args, document, &applications, fallback)?;

    let api_listener = bind(SocketAddr::new(args.host, args.port), "API").await?;
    let dashboard_listener = bind(SocketAddr::new(args.host, args.dashboard_port), "dashboard").await?;
    let grpc_listener = bind(SocketAddr::new(args.host, args.grpc_port), "gRPC").await?;
    let (api, dashboard, grpc) =
        (api_listener.local_addr()?, dashboard_listener.local_addr()?, grpc_listener.local_addr()?);

    let (mut http, mut tasks) = (Vec::new(), Vec::new());
    tasks.push(spawn_head_service(grpc_listener, cluster.clone(), tls.clone(), shutdown.clone()));
    let local_grpc_url = if local_worker && tls.is_some() {
        let listener = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0), "loopback gRPC").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tasks.push(spawn_head_service(listener, cluster.clone(), None, shutdown.clone()));
        url
    } else {
        format!("http://127.0.0.1:{}", grpc.port())
    };
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(cluster.clone().run_controller(stop.cancelled_owned())));
    if let Some(usage) = &usage {
        tasks.push(tokio::spawn(usage.clone().run(shutdown.clone().cancelled_owned())));
    }
    let history = Arc::new(History::new(history::DEFAULT_INTERVAL, history::DEFAULT_WINDOW));
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(run_sampler(
        cluster.clone(),
        state.request_log(),
        history.clone(),
        stop.cancelled_owned(),
    )));
    let control = lumen_head::control::router_with_api(
        ControlState { applications: applications.clone(), registry, admin_token: args.admin_token.clone() },
        state.clone(),
        history,
    );
    http.push(spawn_http(api_listener, router(state), tls.clone(), shutdown.clone(), "API"));
    http.push(spawn_http(dashboard_listener, control, tls.clone(), shutdown.clone(), "dashboard"));
    tracing::info!(%api, %dashboard, %grpc, tls = tls.is_some(), "head listening");
    Ok(RunningHead { api, dashboard, grpc, local_grpc_url, applications, http, cluster: tasks, usage })
}

/// `lumen head`: serves until a signal, then drains.
pub async fn run(args: HeadArgs) -> anyhow::Result<()> {
    args.otlp.init("lumen-head")?;
    let shutdown = CancellationToken::new();
    super::shutdown::cancel_on_signal(shutdown.clone());
    let head = start(&args, Vec::new(), false, shutdown.clone()).await?;
    super::print_ready("head", &[("api", head.api), ("dashboard", head.dashboard), ("grpc", head.grpc)]);
    shutdown.cancelled().await;
    head.drain(Duration::from_secs(args.drain_timeout_s)).await;
    super::flush_traces().await;
    Ok(())
}
