//! From a serve config to what the head runs: one [`DeploymentPlan`] per deployment, the
//! cluster's [`Deployment`] plus the API's per-model options.

use std::time::Duration;

use crate::api::ModelApiOptions;
use crate::api::generate::admission::AdmissionLimits;
use crate::cluster::Deployment;
use crate::config::structured_outputs::StructuredOutputsConfig;
use crate::config::{ConfigError, DeploymentConfig, ServeConfig};

/// A deployment plus what the API layer needs to know about it.
#[derive(Clone, Debug)]
pub struct DeploymentPlan {
    pub deployment: Deployment,
    pub api: ModelApiOptions,
}

/// Every deployment of every application in `config`, which [`ServeConfig::from_value`] has
/// checked (an error here names the deployment by its path all the same).
pub fn plans_from_config(config: &ServeConfig) -> Result<Vec<DeploymentPlan>, ConfigError> {
    let mut plans = Vec::new();
    for (i, app) in config.applications.iter().enumerate() {
        for (j, d) in app.deployments.iter().enumerate() {
            plans.push(plan(&format!("applications[{i}].deployments[{j}]"), &app.name, d)?);
        }
    }
    Ok(plans)
}

/// A duration the config gave (checked finite and bounded), else `default`.
fn seconds(value: Option<f64>, default: Duration) -> Duration {
    value.and_then(|s| Duration::try_from_secs_f64(s).ok()).unwrap_or(default)
}

fn plan(at: &str, application: &str, d: &DeploymentConfig) -> Result<DeploymentPlan, ConfigError> {
    let defaults = Deployment::default();
    let deployment = Deployment {
        name: format!("{application}-{}", d.name),
        application: application.to_string(),
        deployment_name: d.name.clone(),
        model_name: d.model_name().to_string(),
        engine_options_json: d.engine_options_json(),
        num_replicas: d.initial_replicas(),
        autoscaling: d.autoscaling_config.clone(),
        max_ongoing_requests: d.max_ongoing_requests.unwrap_or(0),
        gpus_per_replica: d.gpus_per_replica(),
        cpus_per_replica: d.cpus_per_replica(),
        max_replicas_per_node: d.max_replicas_per_node.filter(|&n| n > 0),
        graceful_shutdown_timeout: seconds(d.graceful_shutdown_timeout_s, defaults.graceful_shutdown_timeout),
        health_check_period: seconds(d.health_check_period_s, defaults.health_check_period),
        health_check_timeout: seconds(d.health_check_timeout_s, defaults.health_check_timeout),
    };
    let reasoning_parser = d
        .reasoning_parser()
        .map(|p| p.parse().map_err(|e| ConfigError::at(format!("{at}.model.reasoning_parser"), e)))
        .transpose()?;
    let tool_call_parser = d
        .tool_call_parser()
        .map(|p| p.parse().map_err(|e| ConfigError::at(format!("{at}.model.tool_call_parser"), e)))
        .transpose()?;
    let structured_outputs = d
        .structured_outputs_config()
        .map(|v| StructuredOutputsConfig::from_value(&format!("{at}.model.structured_outputs_config"), v))
        .transpose()?;
    let admission = d.max_ongoing_requests.map(|n| AdmissionLimits {
        max_in_flight: n as usize,
        max_queued: d.max_queued_requests.map_or(usize::MAX, |q| usize::try_from(q).unwrap_or(usize::MAX)),
    });
    let api = ModelApiOptions {
        reasoning_parser,
        enable_auto_tool_choice: d.enable_auto_tool_choice(),
        tool_call_parser,
        structured_outputs,
        admission,
        migration_limit: d.migration_limit(),
    };
    Ok(DeploymentPlan { deployment, api })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ray_style_config_becomes_deployments_with_its_settings() {
        let config = ServeConfig::from_yaml(
            r#"
applications:
  - name: chat
    deployments:
      - name: llm
        autoscaling_config: {min_replicas: 2, max_replicas: 4, target_ongoing_requests: 3}
        max_ongoing_requests: 8
        max_queued_requests: -1
        graceful_shutdown_timeout_s: 5
        health_check_period_s: 2.5
        ray_actor_options: {num_gpus: 1, num_cpus: 4}
        max_replicas_per_node: 1
        model: {source: m.gguf, served_model_name: smol, reasoning_parser: deepseek_r1,
                enable_auto_tool_choice: true, tool_call_parser: hermes,
                structured_outputs_config: {backend: guidance, disable_any_whitespace: true,
                                            enable_in_reasoning: true},
                migration_limit: 0}
"#,
        )
        .unwrap();
        let plans = plans_from_config(&config).unwrap();
        let d = &plans[0].deployment;
        assert_eq!((d.name.as_str(), d.application.as_str(), d.deployment_name.as_str()), ("chat-llm", "chat", "llm"));
        assert_eq!(d.model_name, "smol");
        assert_eq!(d.num_replicas, 2);
        assert_eq!(d.autoscaling.as_ref().unwrap().max_replicas, 4);
        assert_eq!((d.gpus_per_replica, d.cpus_per_replica, d.max_replicas_per_node), (1.0, 4.0, Some(1)));
        assert_eq!(d.graceful_shutdown_timeout, Duration::from_secs(5));
        assert_eq!(d.health_check_period, Duration::from_millis(2500));
        assert_eq!(d.health_check_timeout, Duration::from_secs(30));
        let admission = plans[0].api.admission.unwrap();
        assert_eq!((admission.max_in_flight, admission.max_queued), (8, usize::MAX));
        assert!(plans[0].api.reasoning_parser.is_some());
        assert_eq!(plans[0].api.enable_auto_tool_choice, Some(true));
        assert_eq!(plans[0].api.tool_call_parser, Some(crate::api::tools::ToolParserKind::Hermes));
        let structured = plans[0].api.structured_outputs.expect("structured_outputs_config");
        assert!(structured.disable_any_whitespace && structured.enable_in_reasoning);
        assert!(!structured.disable_additional_properties);
        assert_eq!(plans[0].api.migration_limit, Some(0));
    }

    #[test]
    fn an_unknown_reasoning_parser_names_the_deployment() {
        let err = ServeConfig::from_yaml(
            "applications:\n  - name: a\n    deployments:\n      - name: d\n        model: {source: m.gguf, reasoning_parser: nope}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "applications[0].deployments[0].model.reasoning_parser");
        assert!(err.message.contains("nope"), "{err}");
    }
}
