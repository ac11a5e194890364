//! The serve config: Ray Serve's `serveConfigV2` shape (YAML on disk, JSON over REST), with the
//! `model:` section of each deployment carrying Lumen's engine options.
//!
//! Contract: [`ServeConfig::from_value`] is the one way in. It accepts a document only if every
//! rule holds ([`rules`]: Ray Serve's schema and Lumen's own, [`model`]: the `model:` section),
//! and a refusal names the first offending field by its path
//! (`applications[1].deployments[0].autoscaling_config.max_replicas`). The head's control API,
//! `lumen head --config` and `lumen deploy` all go through it, so they accept and refuse the same
//! documents with the same message.
//!
//! Ray's deprecated spellings are accepted (`max_concurrent_queries`,
//! `target_num_ongoing_requests_per_replica`), as are the Ray fields Lumen does not use
//! (`import_path`, `runtime_env`, `user_config`, `placement_group_bundles`, ...), which are
//! checked as Ray checks them and otherwise ignored; so an existing Ray Serve config needs only
//! its `model:` sections added. Fields neither Ray nor Lumen knows are ignored, as Ray does.

pub mod model;
pub mod rules;
pub mod structured_outputs;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The whole config: a list of applications.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ServeConfig {
    pub applications: Vec<ApplicationConfig>,
    /// Ray's `[0, 100]` percentage scaling every deployment's replica counts; checked, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_capacity: Option<f64>,
    /// Ray's `EveryNode`, `HeadOnly` or `Disabled`; checked, not used (the head is the proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_location: Option<String>,
    /// Ray's proxy options (`host`, `port`, ...); the head's flags set these instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_options: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_options: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging_config: Option<Map<String, Value>>,
}

/// One application: a named group of deployments.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ApplicationConfig {
    /// Ray's default name when none is given.
    #[serde(default = "default_app_name")]
    pub name: String,
    /// `/` when absent; `null` (no HTTP route, as in Ray) is recorded as such.
    #[serde(default = "default_route_prefix")]
    pub route_prefix: Option<String>,
    /// Ray's Python entry point; its format is checked as Ray checks it, its value ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_env: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Map<String, Value>>,
    /// Ray's switch for an outside autoscaler: no deployment may then have `autoscaling_config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_scaler_enabled: Option<bool>,
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
}

fn default_app_name() -> String {
    "default".into()
}

fn default_route_prefix() -> Option<String> {
    Some("/".into())
}

/// How many replicas: a count, or Ray's `"auto"` (autoscaling with defaults). Any other string is
/// kept as given for [`rules`] to refuse by name.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum NumReplicas {
    Count(u32),
    Auto(String),
}

impl<'de> Deserialize<'de> for NumReplicas {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(NumReplicas::Auto(s)),
            Value::Number(n) => {
                n.as_u64().and_then(|n| u32::try_from(n).ok()).map(NumReplicas::Count).ok_or_else(|| {
                    serde::de::Error::custom(format!("must be a whole number of replicas or \"auto\", got {n}"))
                })
            }
            other => Err(serde::de::Error::custom(format!(
                "must be a whole number of replicas or \"auto\", got {}",
                rules::kind(&other)
            ))),
        }
    }
}

/// One deployment: a model served by some replicas.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct DeploymentConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_replicas: Option<NumReplicas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling_config: Option<AutoscalingConfig>,
    #[serde(default, alias = "max_concurrent_queries", skip_serializing_if = "Option::is_none")]
    pub max_ongoing_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_requests: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_shutdown_timeout_s: Option<f64>,
    /// Ray's wait loop before shutdown; checked, not used (the drain waits for the requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_shutdown_wait_loop_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_period_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray_actor_options: Option<ActorOptions>,
    /// Ray's cap on replicas of this deployment on one node (worker), 1 to 100; none = no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u32>,
    /// Ray's placement group bundles: their `GPU`s are the replica's, on one worker (see
    /// [`DeploymentConfig::gpus_per_replica`]); exclusive with `max_replicas_per_node`, as in
    /// Ray, and only with a packing strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_group_bundles: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_group_strategy: Option<String>,
    /// Ray's `reconfigure` argument; checked (an object), not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_config: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging_config: Option<Map<String, Value>>,
    /// Lumen's spelling of `ray_actor_options`' resources: `{gpus: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The engine options (`source`/`model`, `max_model_len`, ...) plus head-side settings
    /// (`served_model_name`, `reasoning_parser`, `enable_auto_tool_choice`,
    /// `tool_call_parser`, `structured_outputs_config`, `migration_limit`). Passed to the worker
    /// as JSON.
    #[serde(default)]
    pub model: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ActorOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_cpus: Option<f64>,
    /// Ray's heap memory per replica, in bytes; checked, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Ray's custom resources (name -> quantity); checked, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_env: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

/// Replica bounds and the load signal the autoscaler targets. The fields after
/// `downscale_delay_s` are Ray's tuning knobs: checked as Ray checks them, not used by Lumen's
/// autoscaler.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct AutoscalingConfig {
    #[serde(default = "one")]
    pub min_replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_replicas: Option<u32>,
    #[serde(default = "one")]
    pub max_replicas: u32,
    #[serde(default = "two", alias = "target_num_ongoing_requests_per_replica")]
    pub target_ongoing_requests: f64,
    #[serde(default = "thirty")]
    pub upscale_delay_s: f64,
    #[serde(default = "six_hundred")]
    pub downscale_delay_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downscale_to_zero_delay_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_interval_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub look_back_period_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscale_smoothing_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downscale_smoothing_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscaling_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downscaling_factor: Option<f64>,
    /// `mean`, `max` or `min` (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_function: Option<String>,
}

impl Default for AutoscalingConfig {
    fn default() -> Self {
        AutoscalingConfig {
            min_replicas: one(),
            initial_replicas: None,
            max_replicas: one(),
            target_ongoing_requests: two(),
            upscale_delay_s: thirty(),
            downscale_delay_s: six_hundred(),
            downscale_to_zero_delay_s: None,
            metrics_interval_s: None,
            look_back_period_s: None,
            smoothing_factor: None,
            upscale_smoothing_factor: None,
            downscale_smoothing_factor: None,
            upscaling_factor: None,
            downscaling_factor: None,
            aggregation_function: None,
        }
    }
}

fn one() -> u32 {
    1
}
fn two() -> f64 {
    2.0
}
fn thirty() -> f64 {
    30.0
}
fn six_hundred() -> f64 {
    600.0
}

/// A config that cannot be used: the offending field's path (empty for the document as a whole)
/// and what is wrong with its value.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// `applications[1].deployments[0].autoscaling_config.max_replicas`, or "".
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field.as_str() {
            "" => write!(f, "serve config: {}", self.message),
            field => write!(f, "serve config: {field}: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error of the field at `field`.
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }

    /// An error of the document as a whole (not YAML, not an object, ...).
    pub fn document(message: impl Into<String>) -> Self {
        ConfigError { field: String::new(), message: message.into() }
    }
}

impl ServeConfig {
    /// Checks `raw` against every rule and returns the config it describes.
    pub fn from_value(raw: &Value) -> Result<ServeConfig, ConfigError> {
        rules::check_shape(raw)?;
        let config: ServeConfig = serde_path_to_error::deserialize(raw).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." { ConfigError::document(inner) } else { ConfigError::at(path, inner) }
        })?;
        rules::check(&config)?;
        Ok(config)
    }

    /// Parses YAML (or JSON, which YAML includes).
    pub fn from_yaml(text: &str) -> Result<ServeConfig, ConfigError> {
        Self::from_value(&parse_yaml(text)?)
    }

    /// Parses JSON (the control API's body).
    pub fn from_json(text: &str) -> Result<ServeConfig, ConfigError> {
        Self::from_value(&parse_json(text)?)
    }
}

/// A YAML (or JSON) document as a JSON value.
pub fn parse_yaml(text: &str) -> Result<Value, ConfigError> {
    serde_yaml_ng::from_str(text).map_err(|e| ConfigError::document(format!("not valid YAML: {e}")))
}

/// A JSON document.
pub fn parse_json(text: &str) -> Result<Value, ConfigError> {
    serde_json::from_str(text).map_err(|e| ConfigError::document(format!("not valid JSON: {e}")))
}

impl DeploymentConfig {
    /// The model source (`source`, or `model` as vLLM spells it).
    pub fn model_source(&self) -> Option<&str> {
        self.model.get("source").or_else(|| self.model.get("model")).and_then(|v| v.as_str())
    }

    /// The name clients use, when set explicitly.
    pub fn served_model_name(&self) -> Option<&str> {
        self.model.get("served_model_name").and_then(|v| v.as_str())
    }

    /// The name clients use: `served_model_name`, else the source.
    pub fn model_name(&self) -> &str {
        self.served_model_name().or_else(|| self.model_source()).unwrap_or_default()
    }

    /// The reasoning parser (`deepseek_r1`), a head-side setting.
    pub fn reasoning_parser(&self) -> Option<&str> {
        self.model.get("reasoning_parser").and_then(|v| v.as_str())
    }

    /// Whether `tool_choice: "auto"` is allowed (vLLM's `enable_auto_tool_choice`), if set.
    pub fn enable_auto_tool_choice(&self) -> Option<bool> {
        self.model.get("enable_auto_tool_choice").and_then(|v| v.as_bool())
    }

    /// The tool-call parser (`llama3_json`, `hermes`, `deepseek_v3`), a head-side setting.
    pub fn tool_call_parser(&self) -> Option<&str> {
        self.model.get("tool_call_parser").and_then(|v| v.as_str())
    }

    /// vLLM's `structured_outputs_config` (an object), a head-side setting.
    pub fn structured_outputs_config(&self) -> Option<&Value> {
        self.model.get("structured_outputs_config")
    }

    /// How often one request may move to another replica (`--migration-limit` for this
    /// deployment), a head-side setting; `None` when absent or null.
    pub fn migration_limit(&self) -> Option<u32> {
        self.model.get("migration_limit").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok())
    }

    /// Replicas to start with: `num_replicas`, else the autoscaler's initial/min count, else 1.
    pub fn initial_replicas(&self) -> u32 {
        match (&self.num_replicas, &self.autoscaling_config) {
            (Some(NumReplicas::Count(n)), _) => *n,
            (_, Some(a)) => a.initial_replicas.unwrap_or(a.min_replicas).clamp(a.min_replicas, a.max_replicas),
            _ => 1,
        }
    }

    /// GPUs each replica needs, 0 for CPU: with `placement_group_bundles` (Ray Serve LLM's way
    /// to ask for a tensor-parallel replica's GPUs: one `{GPU: 1}` bundle per rank, packed on one
    /// node) the bundles' `GPU` summed, all on one worker; else `ray_actor_options.num_gpus` or
    /// `resources.gpus`.
    pub fn gpus_per_replica(&self) -> f64 {
        self.bundle_gpus()
            .or_else(|| self.ray_actor_options.as_ref().and_then(|o| o.num_gpus))
            .or_else(|| self.resources.as_ref().and_then(|r| r.gpus))
            .unwrap_or(0.0)
    }

    /// The `GPU`s of `placement_group_bundles` summed, when there are bundles.
    pub fn bundle_gpus(&self) -> Option<f64> {
        let bundles = self.placement_group_bundles.as_ref()?;
        Some(bundles.iter().filter_map(|b| b.get("GPU").and_then(Value::as_f64)).sum())
    }

    /// CPU cores each replica reserves on a CPU worker (`ray_actor_options.num_cpus` or
    /// `resources.cpus`); 0 = no reservation (any number share the worker).
    pub fn cpus_per_replica(&self) -> f64 {
        self.ray_actor_options
            .as_ref()
            .and_then(|o| o.num_cpus)
            .or_else(|| self.resources.as_ref().and_then(|r| r.cpus))
            .filter(|c| c.is_finite() && *c > 0.0)
            .unwrap_or(0.0)
    }

    /// The engine options sent to workers: the `model` section with `source` spelled `model`.
    pub fn engine_options_json(&self) -> String {
        let mut m = self.model.clone();
        if let Some(source) = m.remove("source") {
            m.entry("model").or_insert(source);
        }
        Value::Object(m).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAY_STYLE: &str = r#"
applications:
  - name: deepseek
    route_prefix: /
    import_path: serve_app:app
    runtime_env: {pip: [vllm]}
    deployments:
      - name: llm
        max_concurrent_queries: 32
        autoscaling_config:
          min_replicas: 1
          max_replicas: 4
          target_num_ongoing_requests_per_replica: 4
        ray_actor_options: {num_gpus: 1}
        model:
          source: deepseek-ai/DeepSeek-R1-Distill-Llama-8B
          max_model_len: 8192
          reasoning_parser: deepseek_r1
"#;

    #[test]
    fn accepts_rays_shape_and_deprecated_spellings() {
        let c = ServeConfig::from_yaml(RAY_STYLE).unwrap();
        let d = &c.applications[0].deployments[0];
        assert_eq!(d.max_ongoing_requests, Some(32));
        let a = d.autoscaling_config.as_ref().unwrap();
        assert_eq!((a.min_replicas, a.max_replicas, a.target_ongoing_requests), (1, 4, 4.0));
        assert_eq!(d.initial_replicas(), 1);
        assert_eq!(d.gpus_per_replica(), 1.0);
        assert_eq!(d.reasoning_parser(), Some("deepseek_r1"));
        let options: Value = serde_json::from_str(&d.engine_options_json()).unwrap();
        assert_eq!(options["model"], "deepseek-ai/DeepSeek-R1-Distill-Llama-8B");
        assert_eq!(options["max_model_len"], 8192);
    }

    #[test]
    fn placement_group_bundles_ask_for_their_gpus_on_one_worker() {
        let config = |extra: &str| {
            ServeConfig::from_yaml(&format!(
                "applications:\n  - name: a\n    deployments:\n      - name: llm\n{extra}        model: {{source: m.gguf}}\n"
            ))
        };
        let c = config(
            "        placement_group_bundles: [{GPU: 1, CPU: 4}, {GPU: 1}]\n        placement_group_strategy: STRICT_PACK\n        ray_actor_options: {num_gpus: 1}\n",
        )
        .unwrap();
        assert_eq!(c.applications[0].deployments[0].gpus_per_replica(), 2.0, "the bundles, not num_gpus");
        let err =
            config("        placement_group_bundles: [{GPU: 1}, {GPU: 1}]\n        placement_group_strategy: SPREAD\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("placement_group_strategy") && err.contains("one worker"), "{err}");
        let cpu_only =
            config("        placement_group_bundles: [{CPU: 2}]\n        placement_group_strategy: SPREAD\n").unwrap();
        assert_eq!(cpu_only.applications[0].deployments[0].gpus_per_replica(), 0.0);
        // A split replica asks for a GPU per rank.
        let tp = |bundles: &str| {
            ServeConfig::from_yaml(&format!(
                "applications:\n  - name: a\n    deployments:\n      - name: llm\n        placement_group_bundles: {bundles}\n        model: {{source: m, device: cuda, tensor_parallel_size: 2}}\n"
            ))
        };
        tp("[{GPU: 1}, {GPU: 1}]").unwrap();
        let err = tp("[{GPU: 1}]").unwrap_err().to_string();
        assert!(err.contains("tensor_parallel_size") && err.contains("2 GPUs per replica"), "{err}");
    }

    #[test]
    fn json_and_yaml_describe_the_same_config() {
        let yaml = ServeConfig::from_yaml(RAY_STYLE).unwrap();
        let json = ServeConfig::from_json(&serde_json::to_string(&yaml).unwrap()).unwrap();
        assert_eq!(yaml, json);
    }

    #[test]
    fn a_type_error_names_the_field_by_its_path() {
        let err = ServeConfig::from_yaml(
            "applications:\n  - name: a\n    deployments:\n      - name: d\n        max_ongoing_requests: lots\n        model: {source: m.gguf}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "applications[0].deployments[0].max_ongoing_requests");
        assert!(err.to_string().starts_with("serve config: applications[0].deployments[0].max_ongoing_requests: "));
    }

    #[test]
    fn the_route_prefix_defaults_to_the_root_and_may_be_null() {
        let c = ServeConfig::from_yaml("applications: [{name: a, route_prefix: null}, {name: b}]").unwrap();
        assert_eq!(c.applications[0].route_prefix, None);
        assert_eq!(c.applications[1].route_prefix.as_deref(), Some("/"));
    }
}
