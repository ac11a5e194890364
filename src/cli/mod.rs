//! The process roles: `lumen serve` (head + one in-process worker), `lumen head`, `lumen worker`;
//! and the clients of a head's control API: `lumen deploy`, `lumen status`.
//! Every flag is also a `LUMEN_*` environment variable; `--help` lists them all.

pub mod deploy;
pub mod head;
pub mod serve;
pub mod shutdown;
pub mod status;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use lumen_head::cluster::ClusterSettings;
use lumen_proto::tls::{CertReqs, ClientTls, ServerTls};
use lumen_worker::engine::EngineOptions;

/// The head's listeners, limits and cluster settings.
#[derive(Clone, Debug, clap::Args)]
pub struct HeadArgs {
    /// Address the HTTP and gRPC servers bind to.
    #[arg(long, env = "LUMEN_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port of the OpenAI-compatible API (0: any free port).
    #[arg(long, env = "LUMEN_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Port of the dashboard and control API.
    #[arg(long, env = "LUMEN_DASHBOARD_PORT", default_value_t = 8265)]
    pub dashboard_port: u16,
    /// Port where workers register (gRPC).
    #[arg(long, env = "LUMEN_GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,
    /// API keys clients must send as `Authorization: Bearer KEY` on /v1/* (comma-separated);
    /// none: no authentication.
    #[arg(long = "api-key", env = "LUMEN_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A YAML file of named API keys (`api_keys:` list: tenant, key or key_sha256, models,
    /// requests_per_minute, tokens_per_minute, max_concurrent_requests, tokens_per_day,
    /// priority, weight), each with its own limits; replaced live by PUT /api/lumen/keys. A
    /// --config file may carry the same section instead.
    #[arg(long, env = "LUMEN_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Token required as `Authorization: Bearer TOKEN` by the control API's mutating routes
    /// (PUT/DELETE /api/serve/applications/, i.e. `lumen deploy`); reads (dashboard, status,
    /// metrics, probes) stay open. None: the control API is unguarded.
    #[arg(long, env = "LUMEN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A serve config (Ray Serve's serveConfigV2 YAML): the applications to deploy at start
    /// (persisted in --state-dir, replacing what was there).
    #[arg(long, env = "LUMEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory where the head keeps the last applied serve config (`serve-config.json`,
    /// written on every deploy), the named API keys (`api-keys.json`, hashed) and the tenants'
    /// usage (`usage.json`); started without --config (or without a keys file), the head
    /// restores them. Without one nothing is persisted.
    #[arg(long, env = "LUMEN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Requests per model processed at once before queuing (a deployment's
    /// `max_ongoing_requests` overrides it).
    #[arg(long, env = "LUMEN_MAX_ONGOING_REQUESTS", default_value_t = 256)]
    pub max_ongoing_requests: usize,
    /// Requests per model waiting for a slot before the API answers 429.
    #[arg(long, env = "LUMEN_MAX_QUEUED_REQUESTS", default_value_t = 1024)]
    pub max_queued_requests: usize,
    /// How requests waiting for a model's slot are released: `fair` takes turns across tenants
    /// (the named API keys' tenants, in proportion to their keys' `weight`; requests without a
    /// named key are one tenant), lower `priority` first within one; `fcfs` releases them in
    /// arrival order, whoever sent them.
    #[arg(long, env = "LUMEN_QUEUE_POLICY", value_enum, default_value_t = lumen_head::api::generate::fair_queue::QueuePolicy::Fair)]
    pub queue_policy: lumen_head::api::generate::fair_queue::QueuePolicy,
    /// Largest accepted request body (413 beyond), e.g. `32MiB`.
    #[arg(long, env = "LUMEN_MAX_BODY_SIZE", default_value = "32MiB")]
    pub max_body_size: bytesize::ByteSize,
    /// The most past responses the Responses API keeps for `GET /v1/responses/{id}` and
    /// `previous_response_id` (least recently used evicted first; 0 keeps none).
    #[arg(long, env = "LUMEN_RESPONSES_STORE_MAX_ENTRIES", default_value_t = 1024)]
    pub responses_store_max_entries: usize,
    /// The most memory those stored responses may take (their JSON), e.g. `64MiB`.
    #[arg(long, env = "LUMEN_RESPONSES_STORE_MAX_BYTES", default_value = "64MiB")]
    pub responses_store_max_bytes: bytesize::ByteSize,
    /// On SIGTERM or Ctrl-C, how long in-flight requests may take to finish, in seconds.
    #[arg(long, env = "LUMEN_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// A streaming response whose client takes no output for this many seconds (it stopped
    /// reading) is aborted: its request is freed on the worker and the connection closed.
    #[arg(long, env = "LUMEN_STREAM_SEND_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_send_timeout_s: u64,
    /// How often one in-flight request may move to another replica of its deployment when its
    /// own fails mid-stream (worker killed or marked dead, replica stopped, drain timed out): the
    /// client's stream continues where it stopped. 0 turns migration off. The default of every
    /// deployment whose `model:` section does not set `migration_limit`.
    #[arg(long, env = "LUMEN_MIGRATION_LIMIT", default_value_t = lumen_head::api::generate::migration::DEFAULT_MIGRATION_LIMIT)]
    pub migration_limit: u32,
    /// Report `usage.prompt_tokens_details.cached_tokens` in chat and completions responses (the
    /// prompt tokens read from the prefix cache), as vLLM's flag of the same name; the Responses
    /// API always reports them.
    #[arg(long, env = "LUMEN_ENABLE_PROMPT_TOKENS_DETAILS")]
    pub enable_prompt_tokens_details: bool,
    /// Days of per-tenant usage (requests by outcome, tokens, per model and UTC day) the head
    /// keeps for `GET /api/lumen/usage` (saved in --state-dir); when a day begins the oldest goes.
    #[arg(long, env = "LUMEN_USAGE_RETENTION_DAYS", default_value_t = lumen_head::api::edge::usage::DEFAULT_RETENTION_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=3660))]
    pub usage_retention_days: u32,
    /// Log each request's prompt (one info line per request) and keep the prompt text in the
    /// dashboard's request log; off: prompt text is never stored nor logged.
    #[arg(long, env = "LUMEN_LOG_REQUESTS")]
    pub log_requests: bool,
    /// Allow `tool_choice: "auto"` (the default with `tools`): the model decides whether to call
    /// tools and --tool-call-parser reads the calls in its output. The default of every
    /// deployment whose `model:` section does not set `enable_auto_tool_choice`.
    #[arg(long, env = "LUMEN_ENABLE_AUTO_TOOL_CHOICE", requires = "tool_call_parser")]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are read in a model's output under `tool_choice: "auto"`: llama3_json,
    /// hermes or deepseek_v3 (vLLM's names). The default of every deployment whose `model:`
    /// section does not set `tool_call_parser`.
    #[arg(long, env = "LUMEN_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<lumen_head::api::tools::ToolParserKind>,
    /// Structured-output defaults as JSON (vLLM's StructuredOutputsConfig), e.g.
    /// '{"backend": "guidance", "disable_any_whitespace": true}': backend, disable_fallback,
    /// disable_any_whitespace, disable_additional_properties, reasoning_parser,
    /// enable_in_reasoning. The default of every deployment whose `model:` section does not set
    /// `structured_outputs_config`.
    #[arg(long, env = "LUMEN_STRUCTURED_OUTPUTS_CONFIG", value_name = "JSON")]
    pub structured_outputs_config: Option<lumen_head::config::structured_outputs::StructuredOutputsConfig>,
    #[command(flatten)]
    pub cluster: ClusterSettings,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// OpenTelemetry tracing (vLLM's flag): `lumen head`, `lumen worker` and `lumen serve`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct OtlpArgs {
    /// Export OpenTelemetry traces (a span per request at the head and on the worker, vLLM's
    /// `gen_ai.*` attributes) over OTLP to this URL: gRPC by default (`http://collector:4317`),
    /// HTTP protobuf with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf
    /// (`http://collector:4318`; `/v1/traces` is added to a URL without a path). None: no tracing.
    #[arg(long, env = "LUMEN_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
}

impl OtlpArgs {
    /// Starts the exporter (if an endpoint is set) for this process, as `service`.
    pub fn init(&self, service: &'static str) -> anyhow::Result<()> {
        Ok(lumen_proto::otel::init(self.otlp_traces_endpoint.as_deref(), service)?)
    }
}

/// Exports the last pending spans (once the servers stopped), off the async runtime.
pub async fn flush_traces() {
    if let Err(e) = tokio::task::spawn_blocking(lumen_proto::otel::shutdown).await {
        tracing::warn!(error = %e, "flushing the OpenTelemetry spans panicked");
    }
}

/// A worker process: which head to join and where the head reaches it.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// The head's gRPC address, e.g. `http://lumen-head:50051` (`https://` when the head has
    /// --ssl-certfile).
    #[arg(long = "head", env = "HEAD_ADDRESS")]
    pub head: String,
    /// Address the worker's gRPC server binds to.
    #[arg(long, env = "LUMEN_WORKER_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port of the worker's gRPC server (0: any free port).
    #[arg(long, env = "LUMEN_WORKER_PORT", default_value_t = 50052)]
    pub port: u16,
    /// The URL the head dials to reach this worker; defaults to `http://<hostname>:<port>`
    /// (`https://` with --ssl-certfile: the certificate must name that host).
    #[arg(long, env = "LUMEN_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// This worker's id in the cluster (default: hostname and process id).
    #[arg(long, env = "LUMEN_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Shared secret presented to the head when registering.
    #[arg(long, env = "LUMEN_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// On SIGTERM or Ctrl-C, how long replicas may finish their requests, in seconds.
    #[arg(long, env = "LUMEN_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Port of the worker's own Prometheus `/metrics` (vLLM's series of its replicas, for
    /// pod-level scraping), on `--host` (0: any free port; see `--no-metrics`).
    #[arg(long, env = "LUMEN_WORKER_METRICS_PORT", default_value_t = 8080)]
    pub metrics_port: u16,
    /// Serve no `/metrics` of its own (the head's `/metrics` still has every replica).
    #[arg(long, env = "LUMEN_WORKER_NO_METRICS")]
    pub no_metrics: bool,
    /// Load no model: replicas run a simulated engine that gives every running request one
    /// time-stamped token per STEP_MS milliseconds (for measuring the head: `lumen bench head`).
    #[arg(long, value_name = "STEP_MS")]
    pub simulate: Option<f64>,
    /// With --simulate, how many workers this process stands for: ids `<worker-id>-<i>`, each
    /// with its own gRPC port (--port and up, or any free ones with --port 0) and registration,
    /// and no metrics port.
    #[arg(long, default_value_t = 1)]
    pub simulated_workers: usize,
    #[command(flatten)]
    pub stats_log: StatsLogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// TLS of a process's own ports and of the `https://` peers it dials (`lumen head`, `lumen
/// worker`, `lumen serve`), with vLLM's flag names.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first); with --ssl-keyfile every port of this process speaks
    /// TLS: HTTPS on the HTTP ports, `https://` gRPC; it is also the client certificate this
    /// process presents to the `https://` peers it dials
    #[arg(long, env = "LUMEN_SSL_CERTFILE")]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of --ssl-certfile
    #[arg(long, env = "LUMEN_SSL_KEYFILE")]
    pub ssl_keyfile: Option<PathBuf>,
    /// Client certificates on every TLS port, as vLLM (Python's ssl.CERT_*): 0 none asked for,
    /// 1 optional (one presented must be signed by --ssl-ca-certs), 2 required (no connection
    /// without a certificate signed by --ssl-ca-certs). 1 and 2 need TLS and --ssl-ca-certs
    #[arg(long, env = "LUMEN_SSL_CERT_REQS", default_value = "0")]
    pub ssl_cert_reqs: CertReqs,
    /// PEM CA certificates that `https://` peers (the head, workers) must be signed by, instead
    /// of the system's roots; with --ssl-cert-reqs 1 or 2 also the CA of the client certificates
    /// this process's ports accept
    #[arg(long, env = "LUMEN_SSL_CA_CERTS")]
    pub ssl_ca_certs: Option<PathBuf>,
}

impl TlsArgs {
    /// The server side: `Some` with both files, `None` with neither, an error naming the file
    /// (or the missing flag) otherwise; client certificates as --ssl-cert-reqs says.
    pub fn server(&self) -> anyhow::Result<Option<ServerTls>> {
        Ok(ServerTls::from_flags(
            self.ssl_certfile.as_deref(),
            self.ssl_keyfile.as_deref(),
            self.ssl_cert_reqs,
            self.ssl_ca_certs.as_deref(),
        )?)
    }

    /// The client side, for the `https://` peers the process dials: --ssl-ca-certs (else the
    /// system's roots), presenting --ssl-certfile/--ssl-keyfile as its client certificate.
    pub fn client(&self) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::from_flags(
            self.ssl_ca_certs.as_deref(),
            self.ssl_certfile.as_deref(),
            self.ssl_keyfile.as_deref(),
        )?)
    }
}

/// The periodic engine line of the replicas a process hosts (`lumen worker`, `lumen serve`).
#[derive(Clone, Debug, clap::Args)]
pub struct StatsLogArgs {
    /// How often each busy replica logs its engine line (throughput, running and waiting
    /// requests, preemptions, KV cache usage, prefix cache hit rate), in seconds; idle replicas
    /// stay quiet; 0 turns the line off.
    #[arg(long, env = "LUMEN_LOG_STATS_INTERVAL_S", default_value_t = 10)]
    pub log_stats_interval_s: u64,
}

impl StatsLogArgs {
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.log_stats_interval_s)
    }
}

/// `lumen serve`: the head plus one in-process worker serving `--model`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub head: HeadArgs,
    #[command(flatten)]
    pub engine: EngineOptions,
    /// Split `<think>...</think>` into `reasoning_content` for the `--model` deployment
    /// (`deepseek_r1`).
    #[arg(long, env = "LUMEN_REASONING_PARSER")]
    pub reasoning_parser: Option<String>,
    #[command(flatten)]
    pub stats_log: StatsLogArgs,
}

/// Where a running head's control API is (`lumen deploy`, `lumen status`).
#[derive(Clone, Debug, clap::Args)]
pub struct ControlAddress {
    /// The head's control API, e.g. `http://lumen-head:8265` or `https://...` (default
    /// `http://127.0.0.1:8265`; Ray's RAY_DASHBOARD_ADDRESS is read too).
    #[arg(long, env = "LUMEN_ADDRESS")]
    pub address: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// A client's TLS (`lumen deploy`, `lumen status`): whom it trusts, and the certificate it
/// presents to a head that asks for one.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM client certificate chain presented to an `https://` --address that asks for one (a
    /// head with --ssl-cert-reqs 1 or 2); with --ssl-keyfile
    #[arg(long, env = "LUMEN_SSL_CERTFILE")]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of --ssl-certfile
    #[arg(long, env = "LUMEN_SSL_KEYFILE")]
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM CA certificates an `https://` --address must be signed by, instead of the system's
    /// roots
    #[arg(long, env = "LUMEN_SSL_CA_CERTS")]
    pub ssl_ca_certs: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The roots and identity, the files checked now.
    pub fn client(&self) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::from_flags(
            self.ssl_ca_certs.as_deref(),
            self.ssl_certfile.as_deref(),
            self.ssl_keyfile.as_deref(),
        )?)
    }
}

impl ControlAddress {
    /// The base URL: the flag, else `RAY_DASHBOARD_ADDRESS`, else the local head; `http://` is
    /// added when no scheme is given.
    pub fn base_url(&self) -> String {
        let given = self.address.clone().or_else(|| std::env::var("RAY_DASHBOARD_ADDRESS").ok());
        let address = given.as_deref().map(str::trim).filter(|a| !a.is_empty()).unwrap_or("http://127.0.0.1:8265");
        let address = address.trim_end_matches('/');
        if address.contains("://") { address.to_string() } else { format!("http://{address}") }
    }

    /// An HTTP client for the control API (`https://` verified against `--ssl-ca-certs`,
    /// presenting `--ssl-certfile` when given).
    pub fn client(&self, timeout: std::time::Duration) -> anyhow::Result<reqwest::Client> {
        Ok(self.tls.client()?.http_client(reqwest::Client::builder().timeout(timeout))?)
    }
}

/// `lumen deploy`: apply a serve config to a running head.
#[derive(Clone, Debug, clap::Args)]
pub struct DeployArgs {
    /// The serve config (Ray Serve's serveConfigV2 YAML). Declarative: applications of the head
    /// that it does not list are removed.
    pub file: PathBuf,
    #[command(flatten)]
    pub address: ControlAddress,
    /// The head's admin token (its `--admin-token`), sent as `Authorization: Bearer TOKEN`.
    #[arg(long, env = "LUMEN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// `lumen status`: what a running head serves.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub address: ControlAddress,
    /// Print the status document as JSON (Ray's shape) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// The machine-readable line printed on stdout once every listener is bound, so scripts and
/// tests using port 0 learn the ports.
pub fn print_ready(role: &str, addresses: &[(&str, SocketAddr)]) {
    let fields: serde_json::Map<String, serde_json::Value> =
        addresses.iter().map(|(k, a)| (k.to_string(), serde_json::Value::String(a.to_string()))).collect();
    println!("{}", serde_json::json!({"event": "ready", "role": role, "listen": fields}));
}

/// The local host name (for worker ids and advertised addresses).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
