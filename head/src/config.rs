//! The serve config: Ray Serve's `serveConfigV2` shape (YAML on disk, JSON over REST), with the
//! `model:` section of each deployment carrying Lumen's engine options.
//!
//! Ray's deprecated spellings are accepted (`max_concurrent_queries`,
//! `target_num_ongoing_requests_per_replica`), as are Ray-only fields Lumen does not need
//! (`import_path`, `runtime_env`, `route_prefix`, `user_config`, ...), so an existing Ray Serve
//! config needs only its `model:` sections added.

use serde::{Deserialize, Serialize};

/// The whole config: a list of applications.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ServeConfig {
    #[serde(default)]
    pub applications: Vec<ApplicationConfig>,
}

/// One application: a named group of deployments.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ApplicationConfig {
    pub name: String,
    #[serde(default = "default_route_prefix")]
    pub route_prefix: String,
    /// Ray's Python entry point; recorded and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_path: Option<String>,
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
}

fn default_route_prefix() -> String {
    "/".into()
}

/// How many replicas: a count, or Ray's `"auto"` (autoscaling with defaults).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum NumReplicas {
    Count(u32),
    Auto(String),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_period_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray_actor_options: Option<ActorOptions>,
    /// Ray's cap on replicas of this deployment on one node (worker); none = no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u32>,
    /// Lumen's spelling of `ray_actor_options`' resources: `{gpus: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The engine options (`source`/`model`, `max_model_len`, ...) plus head-side settings
    /// (`served_model_name`, `reasoning_parser`). Passed to the worker as JSON.
    #[serde(default)]
    pub model: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ActorOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_cpus: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

/// Replica bounds and the load signal the autoscaler targets.
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

/// A config that cannot be used, with the path of the offending field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("serve config: {0}")]
pub struct ConfigError(pub String);

impl ServeConfig {
    /// Parses YAML (or JSON, which YAML includes).
    pub fn from_yaml(text: &str) -> Result<ServeConfig, ConfigError> {
        let config: ServeConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses JSON (the control API's body).
    pub fn from_json(text: &str) -> Result<ServeConfig, ConfigError> {
        let config: ServeConfig = serde_json::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Unique names, a model source for every deployment, sane replica bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut apps = std::collections::HashSet::new();
        let mut served = std::collections::HashSet::new();
        for app in &self.applications {
            if app.name.is_empty() || !apps.insert(&app.name) {
                return Err(ConfigError(format!("application names must be unique and non-empty: `{}`", app.name)));
            }
            let mut names = std::collections::HashSet::new();
            for d in &app.deployments {
                let at = format!("applications.{}.deployments.{}", app.name, d.name);
                if d.name.is_empty() || !names.insert(&d.name) {
                    return Err(ConfigError(format!("{at}: deployment names must be unique and non-empty")));
                }
                let source = d
                    .model_source()
                    .ok_or_else(|| ConfigError(format!("{at}.model: `source` (or `model`) is required")))?;
                if !served.insert(d.served_model_name().unwrap_or(source).to_string()) {
                    return Err(ConfigError(format!(
                        "{at}: served model name `{}` is used twice",
                        d.served_model_name().unwrap_or(source)
                    )));
                }
                if let Some(NumReplicas::Auto(s)) = &d.num_replicas
                    && s != "auto"
                {
                    return Err(ConfigError(format!("{at}.num_replicas: expected a number or \"auto\", got `{s}`")));
                }
                if let Some(a) = &d.autoscaling_config
                    && (a.min_replicas > a.max_replicas || a.max_replicas == 0)
                {
                    return Err(ConfigError(format!(
                        "{at}.autoscaling_config: min_replicas {} must be <= max_replicas {} (and max >= 1)",
                        a.min_replicas, a.max_replicas
                    )));
                }
            }
        }
        Ok(())
    }
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

    /// The reasoning parser (`deepseek_r1`), a head-side setting.
    pub fn reasoning_parser(&self) -> Option<&str> {
        self.model.get("reasoning_parser").and_then(|v| v.as_str())
    }

    /// Replicas to start with: `num_replicas`, else the autoscaler's initial/min count, else 1.
    pub fn initial_replicas(&self) -> u32 {
        match (&self.num_replicas, &self.autoscaling_config) {
            (Some(NumReplicas::Count(n)), _) => *n,
            (_, Some(a)) => a.initial_replicas.unwrap_or(a.min_replicas).clamp(a.min_replicas, a.max_replicas),
            _ => 1,
        }
    }

    /// GPUs each replica needs (`ray_actor_options.num_gpus` or `resources.gpus`), 0 for CPU.
    pub fn gpus_per_replica(&self) -> f64 {
        self.ray_actor_options
            .as_ref()
            .and_then(|o| o.num_gpus)
            .or_else(|| self.resources.as_ref().and_then(|r| r.gpus))
            .unwrap_or(0.0)
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
        serde_json::Value::Object(m).to_string()
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
        let options: serde_json::Value = serde_json::from_str(&d.engine_options_json()).unwrap();
        assert_eq!(options["model"], "deepseek-ai/DeepSeek-R1-Distill-Llama-8B");
        assert_eq!(options["max_model_len"], 8192);
    }

    #[test]
    fn json_and_yaml_describe_the_same_config() {
        let yaml = ServeConfig::from_yaml(RAY_STYLE).unwrap();
        let json = ServeConfig::from_json(&serde_json::to_string(&yaml).unwrap()).unwrap();
        assert_eq!(yaml, json);
    }

    #[test]
    fn rejects_duplicates_missing_sources_and_bad_bounds() {
        let dup = "applications: [{name: a, deployments: [{name: d, model: {source: m}}]}, {name: a}]";
        assert!(ServeConfig::from_yaml(dup).unwrap_err().0.contains("unique"));
        let no_source = "applications: [{name: a, deployments: [{name: d, model: {max_model_len: 5}}]}]";
        assert!(ServeConfig::from_yaml(no_source).unwrap_err().0.contains("applications.a.deployments.d.model"));
        let bounds = "applications: [{name: a, deployments: [{name: d, model: {source: m}, autoscaling_config: {min_replicas: 3, max_replicas: 2}}]}]";
        assert!(ServeConfig::from_yaml(bounds).unwrap_err().0.contains("min_replicas"));
        let same_name =
            "applications: [{name: a, deployments: [{name: d, model: {source: m}}, {name: e, model: {source: m}}]}]";
        assert!(ServeConfig::from_yaml(same_name).unwrap_err().0.contains("used twice"));
        assert!(ServeConfig::from_yaml("applications: 5").is_err());
    }
}
