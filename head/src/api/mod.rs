//! The OpenAI-compatible HTTP API (port 8000), shaped exactly like vLLM's OpenAI server: its
//! router, its configuration and the state every handler shares.
//!
//! Everything it knows of models goes through [`Backend`]; it knows nothing of gRPC, replicas or
//! tensors. One folder per endpoint family: [`chat`] (`/v1/chat/completions`, with its reasoning
//! parsers and, in [`tools`], tool calling), [`completions`], [`responses`] (built on the chat
//! path), [`embeddings`]; and the pipeline they share, in three parts:
//! - [`request`]: reading a request: JSON body, fields, sampling parameters, prompts, structured
//!   outputs;
//! - [`generate`]: running it: admission (per model), dispatch to the backend (each stream moved to
//!   another replica if its own fails: [`generate::migration`]), the streaming response as SSE,
//!   log-probabilities;
//! - [`edge`]: what surrounds every route: API keys, errors as HTTP (only in
//!   [`edge::errors::ApiError`]'s `IntoResponse`), the metrics middleware, the request log's
//!   middleware ([`edge::trace`]), and the small routes (`/v1/models`, `/health`, `/tokenize`, ...).
//!
//! A request flows: auth (`/v1/*`) -> body limit -> JSON view -> validation -> admission ->
//! dispatch -> OpenAI JSON or SSE.
//!
//! The `/v1` routes ([`v1_router`]) are also mounted on the control server (port 8265), with the
//! same state, so the dashboard's playground works through one port.

pub mod chat;
pub mod completions;
pub mod edge;
pub mod embeddings;
pub mod generate;
pub mod request;
pub mod responses;
pub mod tools;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use self::chat::reasoning::ReasoningParserKind;
use self::edge::errors::ApiError;
use self::edge::keys::{Caller, Keys};
use self::edge::limits::{self, Lease, Limiter, Reason};
use self::edge::metrics::ApiMetrics;
use self::edge::usage::TenantMetrics;
use self::edge::{auth, metrics, misc, trace};
use self::generate::admission::{Admission, AdmissionLimits, Entry};
use self::generate::fair_queue::{QueuePolicy, Waiter};
use self::generate::migration;
use self::tools::{ToolParserKind, ToolSettings};
use crate::backend::{Backend, ModelCard, Runner};
use crate::config::structured_outputs::StructuredOutputsConfig;
use crate::observe::RequestLog;
use crate::observe::request_log::DEFAULT_CAPACITY;

/// Per-model API behaviour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelApiOptions {
    /// Splits the model's output into `reasoning_content` and `content`.
    pub reasoning_parser: Option<ReasoningParserKind>,
    /// `tool_choice: "auto"` allowed (with a parser); `None`: [`ApiConfig::tools`]' setting.
    pub enable_auto_tool_choice: Option<bool>,
    /// Reads tool calls in the output under `auto`; `None`: [`ApiConfig::tools`]' parser.
    pub tool_call_parser: Option<ToolParserKind>,
    /// Structured-output defaults (vLLM's `structured_outputs_config`); `None`:
    /// [`ApiConfig::structured_outputs`].
    pub structured_outputs: Option<StructuredOutputsConfig>,
    /// Overrides [`ApiConfig::admission`] for this model.
    pub admission: Option<AdmissionLimits>,
    /// Overrides [`ApiConfig::migration_limit`] for this model (the `model:` section's
    /// `migration_limit`).
    pub migration_limit: Option<u32>,
}

/// The API's configuration.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `--api-key`: accepted `Authorization: Bearer` keys for `/v1/*`, without limits (tenant
    /// `default`). Hashed into [`ApiState::keys`] and not kept; named keys are set there too.
    /// No key of either kind: no authentication.
    pub api_keys: Vec<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Admission limits of models without their own.
    pub admission: AdmissionLimits,
    /// How requests waiting for a model's slot are released (`--queue-policy`).
    pub queue_policy: QueuePolicy,
    /// Tool calling of models that do not set their own (`--enable-auto-tool-choice`,
    /// `--tool-call-parser`).
    pub tools: ToolSettings,
    /// Structured-output defaults of models that do not set their own
    /// (`--structured-outputs-config`).
    pub structured_outputs: StructuredOutputsConfig,
    /// Per served model name at start; replaced at run time by [`ApiState::set_models`] when the
    /// deployments change.
    pub models: HashMap<String, ModelApiOptions>,
    /// Reported by `GET /version`.
    pub version: String,
    /// A `: keep-alive` SSE comment is sent when a stream was idle this long.
    pub keep_alive: Duration,
    /// A stream whose client takes no output for this long is aborted (`--stream-send-timeout-s`).
    pub stream_send_timeout: Duration,
    /// Keep prompt text in the request log and log each prompt (`--log-requests`).
    pub log_requests: bool,
    /// How many recent requests the request log keeps.
    pub request_log_capacity: usize,
    /// Bounds of the Responses API's store of past responses (count, bytes).
    pub responses_store_max_entries: usize,
    pub responses_store_max_bytes: usize,
    /// How often one request may move to another replica when its own fails mid-stream
    /// (`--migration-limit`; 0: never, the failure reaches the client), for models without
    /// their own [`ModelApiOptions::migration_limit`].
    pub migration_limit: u32,
    /// `usage.prompt_tokens_details.cached_tokens` in chat and completions responses
    /// (`--enable-prompt-tokens-details`, off by default as in vLLM).
    pub enable_prompt_tokens_details: bool,
    /// Days of per-tenant usage kept for `GET /api/lumen/usage` (`--usage-retention-days`).
    pub usage_retention_days: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            api_keys: Vec::new(),
            max_body_bytes: 32 * 1024 * 1024,
            admission: AdmissionLimits::default(),
            queue_policy: QueuePolicy::default(),
            tools: ToolSettings::default(),
            structured_outputs: StructuredOutputsConfig::default(),
            models: HashMap::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            keep_alive: Duration::from_secs(15),
            stream_send_timeout: Duration::from_secs(30),
            log_requests: false,
            request_log_capacity: DEFAULT_CAPACITY,
            responses_store_max_entries: responses::store::DEFAULT_MAX_ENTRIES,
            responses_store_max_bytes: responses::store::DEFAULT_MAX_BYTES,
            migration_limit: migration::DEFAULT_MIGRATION_LIMIT,
            enable_prompt_tokens_details: false,
            usage_retention_days: edge::usage::DEFAULT_RETENTION_DAYS,
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub backend: Arc<dyn Backend>,
    pub config: Arc<ApiConfig>,
    pub registry: prometheus::Registry,
    models: Arc<RwLock<HashMap<String, ModelApiOptions>>>,
    admission: Arc<Admission>,
    keys: Arc<Keys>,
    metrics: ApiMetrics,
    migrations: migration::Migrations,
    requests: Arc<RequestLog>,
    responses: Arc<responses::store::ResponseStore>,
}

impl ApiState {
    /// Registers the API's metrics into `registry` (which `GET /metrics` then serves whole).
    pub fn new(
        backend: Arc<dyn Backend>,
        mut config: ApiConfig,
        registry: prometheus::Registry,
    ) -> Result<Self, prometheus::Error> {
        let metrics = ApiMetrics::register(&registry)?;
        let limiter = Limiter::new(TenantMetrics::register(&registry, config.usage_retention_days)?);
        // The plaintext keys are hashed here and dropped.
        let keys = Arc::new(Keys::with_flag_keys(&std::mem::take(&mut config.api_keys), limiter));
        let migrations = migration::Migrations::register(config.migration_limit, &registry)?;
        let requests = Arc::new(RequestLog::new(config.request_log_capacity, config.log_requests));
        config.structured_outputs.note_backend();
        note_backends(&config.models);
        let responses = Arc::new(responses::store::ResponseStore::new(
            config.responses_store_max_entries,
            config.responses_store_max_bytes,
        ));
        let admission = Arc::new(Admission::new(config.queue_policy));
        Ok(ApiState {
            responses,
            backend,
            models: Arc::new(RwLock::new(config.models.clone())),
            config: Arc::new(config),
            registry,
            admission,
            keys,
            metrics,
            migrations,
            requests,
        })
    }

    /// The key table and the tenants' limits (replaced live through the control API).
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// What each tenant used, per model and UTC day ([`edge::usage`]).
    pub fn usage(&self) -> &Arc<edge::usage::UsageLedger> {
        self.keys.limiter().metrics().ledger()
    }

    /// Lets a request of `caller` for `card` that sends `requests` in: the key must allow the
    /// model (else OpenAI's 404) and its limits must admit the request's reservation
    /// ([`limits::cost`]; else a 429), then the model's admission gate must have room (where it
    /// waits as its key's tenant, with its key's weight). The admission's `x-ratelimit-*` values
    /// go to the response. Under the fair policy a named key's requests carry its tenant and
    /// weight to the worker, whose scheduler shares its slots across tenants the same way.
    pub(crate) fn enter(
        &self,
        caller: &Caller,
        card: &ModelCard,
        requests: &mut [lumen_proto::v1::GenerateRequest],
    ) -> Result<Entry, ApiError> {
        caller.set_model(&card.id);
        let lease = match caller.key() {
            None => Lease::default(),
            Some(key) => {
                if !caller.may_use(&card.id) {
                    self.keys.limiter().metrics().rejected(&key.tenant, &card.id, Reason::Model);
                    return Err(ApiError::ModelNotAllowed(card.id.clone()));
                }
                let cost = limits::cost(requests, card.max_model_len);
                let limiter = self.keys.limiter();
                let lease = limiter.admit(&key.tenant, &card.id, key.limits, cost).map_err(|limited| {
                    tracing::debug!(tenant = %key.tenant, reason = limited.reason.label(), "refused by the key's limits");
                    ApiError::Limited(Box::new(limited))
                })?;
                caller.set_headers(lease.headers());
                lease
            }
        };
        // Requests without a key wait as one tenant, `""` (named tenants are never empty).
        let waiter = Waiter {
            tenant: caller.key().map_or_else(|| Arc::from(""), |k| k.tenant.clone()),
            weight: caller.key().map_or(1, |k| k.weight),
            priority: requests.first().map_or(0, |r| r.priority),
        };
        let ticket = self.admission.enter(&card.id, self.admission_limits(&card.id), &waiter)?;
        if let (QueuePolicy::Fair, Some(key)) = (self.admission.policy(), caller.key()) {
            for request in requests.iter_mut() {
                request.tenant = key.tenant.to_string();
                request.tenant_weight = key.weight;
            }
        }
        Ok(Entry { ticket, lease })
    }

    /// Requests of `model` waiting at its admission gate for a slot now.
    pub fn waiting(&self, model: &str) -> usize {
        self.admission.waiting(model)
    }

    /// The log of recent chat and completion requests.
    pub fn request_log(&self) -> Arc<RequestLog> {
        self.requests.clone()
    }

    /// Sets (or replaces) a model's options, e.g. when a deployment is (re)configured.
    pub fn set_model_options(&self, model: &str, options: ModelApiOptions) {
        options.structured_outputs.iter().for_each(StructuredOutputsConfig::note_backend);
        self.models.write().unwrap_or_else(|p| p.into_inner()).insert(model.to_string(), options);
    }

    /// Replaces every model's options (declarative, like the deployments they describe: a model
    /// absent from `models` falls back to the defaults). Requests already admitted keep the
    /// options they started with.
    pub fn set_models(&self, models: HashMap<String, ModelApiOptions>) {
        note_backends(&models);
        *self.models.write().unwrap_or_else(|p| p.into_inner()) = models;
    }

    /// The options of `model` (defaults if none were set).
    pub fn model_options(&self, model: &str) -> ModelApiOptions {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(model).cloned().unwrap_or_default()
    }

    /// The tool-calling settings of `model`: its own, else the server's.
    pub fn tool_settings(&self, model: &str) -> ToolSettings {
        let options = self.model_options(model);
        let defaults = self.config.tools;
        ToolSettings {
            enable_auto_tool_choice: options.enable_auto_tool_choice.unwrap_or(defaults.enable_auto_tool_choice),
            tool_call_parser: options.tool_call_parser.or(defaults.tool_call_parser),
        }
    }

    /// The structured-output defaults of `model`: its own, else the server's.
    pub fn structured_outputs(&self, model: &str) -> StructuredOutputsConfig {
        self.model_options(model).structured_outputs.unwrap_or(self.config.structured_outputs)
    }

    /// The reasoning parser of `model`: its `reasoning_parser`, else the one its structured-output
    /// settings name (in vLLM `--reasoning-parser` and `structured_outputs_config.reasoning_parser`
    /// are one setting).
    pub fn reasoning_parser(&self, model: &str) -> Option<ReasoningParserKind> {
        let options = self.model_options(model);
        let structured = options.structured_outputs.unwrap_or(self.config.structured_outputs);
        options.reasoning_parser.or(structured.reasoning_parser)
    }

    fn admission_limits(&self, model: &str) -> AdmissionLimits {
        self.model_options(model).admission.unwrap_or(self.config.admission)
    }

    /// [`ApiState::resolve_model`] for an endpoint of `api` (vLLM's name for it, e.g.
    /// "Completions API"), which serves only models run by `runner`: vLLM's 400 otherwise.
    pub fn resolve_for(
        &self,
        requested: Option<&str>,
        runner: Runner,
        api: &'static str,
    ) -> Result<ModelCard, ApiError> {
        let card = self.resolve_model(requested)?;
        if card.runner != runner {
            return Err(ApiError::UnsupportedApi { api });
        }
        Ok(card)
    }

    /// The card of the model a request names; without a name, the first model (as vLLM does).
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<ModelCard, ApiError> {
        let models = self.backend.models();
        match requested {
            Some(name) => {
                models.into_iter().find(|m| m.id == name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
            }
            None => models.into_iter().next().ok_or_else(|| ApiError::Unavailable("no model is deployed".into())),
        }
    }
}

/// Warns (once) if any model's structured-output settings name a backend Lumen does not have.
fn note_backends(models: &HashMap<String, ModelApiOptions>) {
    models.values().filter_map(|o| o.structured_outputs.as_ref()).for_each(StructuredOutputsConfig::note_backend);
}

/// The `/v1` routes with their authentication and request recording, not yet layered.
fn v1_routes(state: &ApiState) -> Router<ApiState> {
    Router::new()
        .route("/v1/models", get(misc::models))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/responses", post(responses::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/responses/{id}", get(responses::retrieve).delete(responses::delete))
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        // Outside the key check, so refused requests are recorded too.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), trace::record))
}

/// Body limit and metrics around `routes`, then the state.
fn finish(routes: Router<ApiState>, state: ApiState) -> Router {
    routes
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .with_state(state)
}

/// Only the OpenAI `/v1` routes (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), with
/// the same authentication, limits and state as [`router`]; the control server mounts them (and
/// answers its own 404 and 405).
pub fn v1_router(state: ApiState) -> Router {
    finish(v1_routes(&state), state)
}

/// The API's routes (serve them on port 8000).
pub fn router(state: ApiState) -> Router {
    let routes = v1_routes(&state)
        .route("/health", get(misc::health))
        .route("/-/healthz", get(misc::healthz))
        .route("/version", get(misc::version))
        .route("/metrics", get(misc::metrics))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .fallback(misc::not_found)
        .method_not_allowed_fallback(misc::method_not_allowed);
    finish(routes, state)
}

/// A fresh request id: `prefix` and 32 hex digits (vLLM's `chatcmpl-...`, `cmpl-...`).
pub(crate) fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}
