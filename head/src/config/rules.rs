//! The rules a serve config must satisfy beyond its field types: Ray Serve's (`ServeDeploySchema`,
//! `ServeApplicationSchema`, `DeploymentSchema`, `RayActorOptionsSchema`, `AutoscalingConfig`) and
//! Lumen's own (unique deployment ids and served model names, bounded durations; the `model:`
//! section in [`super::model`]).
//!
//! Contract: every check runs before anything is applied, and the first broken rule is reported
//! with the path of the field that breaks it and the value as given. [`check_shape`] runs on the
//! raw document first, because serde would read a struct from a JSON array (`[]` would be a config
//! with no applications, which deletes every application).

use std::collections::HashMap;

use serde_json::Value;

use super::{ActorOptions, ApplicationConfig, AutoscalingConfig, ConfigError, DeploymentConfig, NumReplicas};
use super::{ServeConfig, model};

/// The longest duration a config may give, in seconds (about 31 years): the head turns durations
/// into timers, which need a bound.
pub const MAX_SECONDS: f64 = 1e9;
/// Ray's bound on `max_replicas_per_node`.
pub const MAX_REPLICAS_PER_NODE: u32 = 100;

/// A value's JSON kind, for messages.
pub fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => "a string".into(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn expect_object(value: &Value, path: &str, what: &str) -> Result<(), ConfigError> {
    match value {
        Value::Object(_) => Ok(()),
        other => Err(ConfigError::at(path, format!("must be {what} (an object), got {}", kind(other)))),
    }
}

fn expect_list(value: &Value, path: &str, what: &str) -> Result<(), ConfigError> {
    match value {
        Value::Array(_) => Ok(()),
        other => Err(ConfigError::at(path, format!("must be {what}, got {}", kind(other)))),
    }
}

/// The document's skeleton: an object with an `applications` list of objects, whose
/// `deployments` are lists of objects whose option groups are objects (or null).
pub fn check_shape(raw: &Value) -> Result<(), ConfigError> {
    let Value::Object(root) = raw else {
        return Err(ConfigError::document(format!(
            "the document must be an object with an `applications` list, got {}",
            kind(raw)
        )));
    };
    let applications = root
        .get("applications")
        .ok_or_else(|| ConfigError::at("applications", "is required: the list of applications to run"))?;
    expect_list(applications, "applications", "a list of applications")?;
    for (i, app) in applications.as_array().into_iter().flatten().enumerate() {
        let at = format!("applications[{i}]");
        expect_object(app, &at, "an application")?;
        for key in ["host", "port"] {
            if app.get(key).is_some() {
                return Err(ConfigError::at(
                    format!("{at}.{key}"),
                    format!("`{key}` belongs in the top-level `http_options`, not in an application (as in Ray)"),
                ));
            }
        }
        match app.get("deployments") {
            None => continue,
            Some(list) => expect_list(list, &format!("{at}.deployments"), "a list of deployments")?,
        }
        for (j, deployment) in app["deployments"].as_array().into_iter().flatten().enumerate() {
            let at = format!("{at}.deployments[{j}]");
            expect_object(deployment, &at, "a deployment")?;
            for group in ["autoscaling_config", "ray_actor_options", "resources", "model"] {
                match deployment.get(group) {
                    None | Some(Value::Null) => {}
                    Some(value) => expect_object(value, &format!("{at}.{group}"), &format!("the `{group}` section"))?,
                }
            }
        }
    }
    Ok(())
}

/// Where names that must be unique were first seen (the owner's path).
#[derive(Default)]
struct Seen {
    applications: HashMap<String, String>,
    route_prefixes: HashMap<String, String>,
    deployment_ids: HashMap<String, String>,
    served_names: HashMap<String, String>,
}

/// Records `key` for `owner`; refuses it at `field` when another owner had it first.
fn unique(
    seen: &mut HashMap<String, String>,
    key: &str,
    owner: &str,
    field: String,
    noun: &str,
) -> Result<(), ConfigError> {
    match seen.insert(key.to_string(), owner.to_string()) {
        None => Ok(()),
        Some(first) => Err(ConfigError::at(field, format!("`{key}` is also {first}'s {noun}"))),
    }
}

/// Every rule over the typed config.
pub fn check(config: &ServeConfig) -> Result<(), ConfigError> {
    if let Some(capacity) = config.target_capacity {
        in_range("target_capacity", capacity, 0.0, 100.0)?;
    }
    if let Some(location) = &config.proxy_location {
        one_of("proxy_location", location, &["EveryNode", "HeadOnly", "Disabled"])?;
    }
    let mut seen = Seen::default();
    for (i, app) in config.applications.iter().enumerate() {
        let at = format!("applications[{i}]");
        application(&at, app, &mut seen)?;
        let mut names = HashMap::new();
        for (j, d) in app.deployments.iter().enumerate() {
            let at = format!("{at}.deployments[{j}]");
            if d.name.is_empty() {
                return Err(ConfigError::at(format!("{at}.name"), "must not be empty"));
            }
            let noun = "name: deployment names must be unique within an application";
            unique(&mut names, &d.name, &at, format!("{at}.name"), noun)?;
            // The cluster knows a deployment as `application-deployment`.
            let noun = "deployment id (application-deployment): rename one of them";
            unique(&mut seen.deployment_ids, &format!("{}-{}", app.name, d.name), &at, format!("{at}.name"), noun)?;
            deployment(&at, d)?;
            model::check(&format!("{at}.model"), &d.model)?;
            tensor_parallel_gpus(&at, d)?;
            let field = match (d.served_model_name(), d.model.contains_key("source")) {
                (Some(_), _) => "served_model_name",
                (None, true) => "source",
                (None, false) => "model",
            };
            let noun = "served model name: each model name routes to one deployment";
            unique(&mut seen.served_names, d.model_name(), &at, format!("{at}.model.{field}"), noun)?;
        }
    }
    Ok(())
}

/// A GPU replica split over `tensor_parallel_size` ranks needs a GPU per rank: a deployment
/// that asks for fewer (its bundles' or `num_gpus`) would be placed where its engine cannot
/// start. (Asking for none leaves the worker to find the GPUs.)
fn tensor_parallel_gpus(at: &str, d: &DeploymentConfig) -> Result<(), ConfigError> {
    let ranks = d.model.get("tensor_parallel_size").and_then(Value::as_u64).unwrap_or(1);
    let gpus = d.gpus_per_replica();
    if ranks > 1 && gpus > 0.0 && gpus < ranks as f64 {
        return Err(ConfigError::at(
            format!("{at}.model.tensor_parallel_size"),
            format!(
                "{ranks} ranks need {ranks} GPUs per replica, but the deployment asks for {gpus} (placement_group_bundles' GPU, or ray_actor_options.num_gpus)"
            ),
        ));
    }
    Ok(())
}

/// Ray's route prefix rules: a leading `/`, no trailing `/` except the root, no `{` or `}`.
fn route_prefix(at: &str, prefix: &str) -> Result<(), ConfigError> {
    let problem = if !prefix.starts_with('/') {
        "must start with \"/\""
    } else if prefix.len() > 1 && prefix.ends_with('/') {
        "must not end with \"/\" unless it is just \"/\""
    } else if prefix.contains(['{', '}']) {
        "cannot contain wildcards (\"{\" or \"}\")"
    } else {
        return Ok(());
    };
    Err(ConfigError::at(at, format!("{problem}, got {prefix:?}")))
}

/// Ray's import path format: `module.sub:attr` (one colon, not at either end) or
/// `module.sub.attr` (a dot, not at either end).
fn import_path(at: &str, path: &str) -> Result<(), ConfigError> {
    let problem = if path.contains(':') {
        if path.matches(':').count() > 1 {
            Some("may have at most one colon")
        } else if path.starts_with(':') || path.ends_with(':') {
            Some("may not start or end with a colon")
        } else {
            None
        }
    } else if !path.contains('.') {
        Some("needs a dot or colon between the module and the attribute, e.g. \"module:app\"")
    } else if path.starts_with('.') || path.ends_with('.') {
        Some("may not start or end with a dot")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ConfigError::at(at, format!("{problem}, got {path:?}"))),
        None => Ok(()),
    }
}

/// An application's own rules: a unique, non-empty name; a unique, well-formed route prefix;
/// Ray's import path format; no autoscaling under an external scaler.
fn application(at: &str, app: &ApplicationConfig, seen: &mut Seen) -> Result<(), ConfigError> {
    if app.name.is_empty() {
        return Err(ConfigError::at(format!("{at}.name"), "must not be empty"));
    }
    let noun = "name: application names must be unique";
    unique(&mut seen.applications, &app.name, at, format!("{at}.name"), noun)?;
    if let Some(prefix) = &app.route_prefix {
        route_prefix(&format!("{at}.route_prefix"), prefix)?;
        let noun = "route prefix: route prefixes must be unique";
        unique(&mut seen.route_prefixes, prefix, at, format!("{at}.route_prefix"), noun)?;
    }
    if let Some(path) = &app.import_path {
        import_path(&format!("{at}.import_path"), path)?;
    }
    if app.external_scaler_enabled == Some(true)
        && let Some(j) = app.deployments.iter().position(autoscaled)
    {
        return Err(ConfigError::at(
            format!("{at}.deployments[{j}].autoscaling_config"),
            "external_scaler_enabled is set on the application: no deployment may autoscale",
        ));
    }
    Ok(())
}

fn autoscaled(d: &DeploymentConfig) -> bool {
    d.autoscaling_config.is_some() || matches!(&d.num_replicas, Some(NumReplicas::Auto(_)))
}

fn deployment(at: &str, d: &DeploymentConfig) -> Result<(), ConfigError> {
    let field = |name: &str| format!("{at}.{name}");
    match &d.num_replicas {
        Some(NumReplicas::Count(0)) => {
            return Err(ConfigError::at(field("num_replicas"), "must be at least 1 (or \"auto\"), got 0"));
        }
        Some(NumReplicas::Count(_)) if d.autoscaling_config.is_some() => {
            return Err(ConfigError::at(
                field("num_replicas"),
                "must not be a number when autoscaling_config is given (leave it out, or set it to \"auto\")",
            ));
        }
        Some(NumReplicas::Auto(s)) if s != "auto" => {
            return Err(ConfigError::at(field("num_replicas"), format!("must be a number or \"auto\", got {s:?}")));
        }
        _ => {}
    }
    if d.max_ongoing_requests == Some(0) {
        return Err(ConfigError::at(field("max_ongoing_requests"), "must be at least 1, got 0"));
    }
    if let Some(q) = d.max_queued_requests
        && q < -1
    {
        return Err(ConfigError::at(
            field("max_queued_requests"),
            format!("must be -1 (no limit) or at least 0, got {q}"),
        ));
    }
    if let Some(s) = d.graceful_shutdown_timeout_s {
        seconds(&field("graceful_shutdown_timeout_s"), s, false)?;
    }
    if let Some(s) = d.graceful_shutdown_wait_loop_s {
        seconds(&field("graceful_shutdown_wait_loop_s"), s, false)?;
    }
    if let Some(s) = d.health_check_period_s {
        seconds(&field("health_check_period_s"), s, true)?;
    }
    if let Some(s) = d.health_check_timeout_s {
        seconds(&field("health_check_timeout_s"), s, true)?;
    }
    if let Some(n) = d.max_replicas_per_node {
        if !(1..=MAX_REPLICAS_PER_NODE).contains(&n) {
            return Err(ConfigError::at(
                field("max_replicas_per_node"),
                format!("must be between 1 and {MAX_REPLICAS_PER_NODE}, got {n}"),
            ));
        }
        if d.placement_group_bundles.is_some() {
            return Err(ConfigError::at(
                field("max_replicas_per_node"),
                "must not be set together with placement_group_bundles",
            ));
        }
    }
    if let Some(strategy) = &d.placement_group_strategy {
        one_of(&field("placement_group_strategy"), strategy, &["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])?;
        // A replica's GPUs serve one engine, so they must be on one worker.
        let gpus = d.bundle_gpus().unwrap_or(0.0);
        if gpus > 0.0 && strategy.ends_with("SPREAD") {
            return Err(ConfigError::at(
                field("placement_group_strategy"),
                format!("bundles with {gpus} GPUs must be on one worker: use STRICT_PACK or PACK, got {strategy}"),
            ));
        }
    }
    for (b, bundle) in d.placement_group_bundles.iter().flatten().enumerate() {
        quantities(&field(&format!("placement_group_bundles[{b}]")), bundle)?;
    }
    if let Some(options) = &d.ray_actor_options {
        actor_options(&field("ray_actor_options"), options)?;
    }
    if let Some(resources) = &d.resources {
        for (name, value) in [("gpus", resources.gpus), ("cpus", resources.cpus)] {
            if let Some(v) = value {
                at_least(&field(&format!("resources.{name}")), v, 0.0)?;
            }
        }
    }
    if let Some(a) = &d.autoscaling_config {
        autoscaling(&field("autoscaling_config"), a)?;
    }
    Ok(())
}

fn actor_options(at: &str, options: &ActorOptions) -> Result<(), ConfigError> {
    for (name, value) in [("num_gpus", options.num_gpus), ("num_cpus", options.num_cpus), ("memory", options.memory)] {
        if let Some(v) = value {
            at_least(&format!("{at}.{name}"), v, 0.0)?;
        }
    }
    if let Some(resources) = &options.resources {
        quantities(&format!("{at}.resources"), resources)?;
    }
    Ok(())
}

/// Custom resource quantities: non-negative numbers.
fn quantities(at: &str, map: &serde_json::Map<String, Value>) -> Result<(), ConfigError> {
    for (name, value) in map {
        let at = format!("{at}.{name}");
        match value.as_f64() {
            Some(v) => at_least(&at, v, 0.0)?,
            None => return Err(ConfigError::at(at, format!("must be a number, got {}", kind(value)))),
        }
    }
    Ok(())
}

fn autoscaling(at: &str, a: &AutoscalingConfig) -> Result<(), ConfigError> {
    let field = |name: &str| format!("{at}.{name}");
    if a.max_replicas == 0 {
        return Err(ConfigError::at(field("max_replicas"), "must be at least 1, got 0"));
    }
    if a.max_replicas < a.min_replicas {
        return Err(ConfigError::at(
            field("max_replicas"),
            format!("must be at least min_replicas ({}), got {}", a.min_replicas, a.max_replicas),
        ));
    }
    if let Some(initial) = a.initial_replicas
        && !(a.min_replicas..=a.max_replicas).contains(&initial)
    {
        return Err(ConfigError::at(
            field("initial_replicas"),
            format!(
                "must be between min_replicas ({}) and max_replicas ({}), got {initial}",
                a.min_replicas, a.max_replicas
            ),
        ));
    }
    positive(&field("target_ongoing_requests"), a.target_ongoing_requests)?;
    seconds(&field("upscale_delay_s"), a.upscale_delay_s, false)?;
    seconds(&field("downscale_delay_s"), a.downscale_delay_s, false)?;
    if let Some(s) = a.downscale_to_zero_delay_s {
        seconds(&field("downscale_to_zero_delay_s"), s, false)?;
    }
    for (name, value) in [("metrics_interval_s", a.metrics_interval_s), ("look_back_period_s", a.look_back_period_s)] {
        if let Some(s) = value {
            seconds(&field(name), s, true)?;
        }
    }
    for (name, value) in [
        ("smoothing_factor", a.smoothing_factor),
        ("upscale_smoothing_factor", a.upscale_smoothing_factor),
        ("downscale_smoothing_factor", a.downscale_smoothing_factor),
        ("upscaling_factor", a.upscaling_factor),
        ("downscaling_factor", a.downscaling_factor),
    ] {
        if let Some(v) = value {
            positive(&field(name), v)?;
        }
    }
    if let Some(function) = &a.aggregation_function {
        one_of(&field("aggregation_function"), &function.to_ascii_lowercase(), &["mean", "max", "min"]).map_err(
            |_| ConfigError::at(field("aggregation_function"), format!("must be mean, max or min, got {function:?}")),
        )?;
    }
    Ok(())
}

fn finite(at: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() { Ok(()) } else { Err(ConfigError::at(at, format!("must be a finite number, got {v}"))) }
}

fn at_least(at: &str, v: f64, min: f64) -> Result<(), ConfigError> {
    finite(at, v)?;
    if v >= min { Ok(()) } else { Err(ConfigError::at(at, format!("must be at least {min}, got {v}"))) }
}

fn positive(at: &str, v: f64) -> Result<(), ConfigError> {
    finite(at, v)?;
    if v > 0.0 { Ok(()) } else { Err(ConfigError::at(at, format!("must be greater than 0, got {v}"))) }
}

fn in_range(at: &str, v: f64, min: f64, max: f64) -> Result<(), ConfigError> {
    finite(at, v)?;
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::at(at, format!("must be between {min} and {max}, got {v}")))
    }
}

/// A duration in seconds: finite, at most [`MAX_SECONDS`], and positive or non-negative.
fn seconds(at: &str, v: f64, strictly_positive: bool) -> Result<(), ConfigError> {
    if strictly_positive {
        positive(at, v)?
    } else {
        at_least(at, v, 0.0)?
    }
    if v > MAX_SECONDS {
        return Err(ConfigError::at(at, format!("must be at most {MAX_SECONDS} seconds, got {v}")));
    }
    Ok(())
}

fn one_of(at: &str, value: &str, known: &[&str]) -> Result<(), ConfigError> {
    if known.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::at(at, format!("must be one of {}, got {value:?}", known.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One broken rule per case, over a valid base; `tests/e2e_config_rules.rs` sends the same
    /// cases to a real head.
    const CASES: &str = include_str!("../../tests/fixtures/serve_config_rules.json");

    #[test]
    fn the_base_of_the_rule_cases_is_valid() {
        let fixture: Value = serde_json::from_str(CASES).unwrap();
        ServeConfig::from_value(&fixture["base"]).unwrap();
    }

    #[test]
    fn every_rule_refuses_its_case_naming_the_field_and_the_value() {
        let fixture: Value = serde_json::from_str(CASES).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() > 70, "the table covers every rule");
        for case in cases {
            let rule = case["rule"].as_str().unwrap();
            let err = ServeConfig::from_value(&case["document"]).expect_err(rule);
            assert_eq!(err.field, case["field"].as_str().unwrap(), "{rule}: {err}");
            let says = case["says"].as_str().unwrap();
            assert!(err.message.contains(says), "{rule}: `{}` should say `{says}`", err.message);
        }
    }

    #[test]
    fn rays_optional_fields_accept_their_values() {
        let config = serde_json::json!({
            "proxy_location": "HeadOnly", "target_capacity": 50, "http_options": {"port": 8000},
            "applications": [{
                "name": "a", "route_prefix": null, "import_path": "serve_app:app", "runtime_env": {"pip": []},
                "deployments": [{
                    "name": "d", "num_replicas": "auto", "max_queued_requests": -1, "max_ongoing_requests": 1,
                    "graceful_shutdown_timeout_s": 0, "health_check_period_s": 0.5, "user_config": {"k": 1},
                    "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 3,
                                           "upscale_delay_s": 0, "aggregation_function": "MAX"},
                    "ray_actor_options": {"num_gpus": 0, "num_cpus": 0.5, "resources": {"tpu": 0}},
                    "placement_group_bundles": [{"CPU": 1}], "placement_group_strategy": "SPREAD",
                    "model": {"source": "m.gguf"},
                }],
            }],
        });
        ServeConfig::from_value(&config).unwrap();
    }
}
