//! `lumen deploy FILE`: validates a serve config locally (the head's own parser) and applies it to
//! a running head with `PUT /api/serve/applications/`, like Ray's `serve deploy`.

use std::time::Duration;

use anyhow::Context;
use lumen_head::control::ServeDocument;

use super::DeployArgs;

/// How long the head may take to answer; applying is quick (replicas start afterwards).
const TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(args: DeployArgs) -> anyhow::Result<()> {
    let document = super::head::read_serve_config(&args.file)?;
    let base = args.address.base_url();
    let url = format!("{base}/api/serve/applications/");
    let client = args.address.client(TIMEOUT)?;
    let mut request = client.put(&url).json(document.raw());
    if let Some(token) = &args.admin_token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.with_context(|| format!("cannot reach the head's control API at {base}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
            " (pass the head's admin token with --admin-token or LUMEN_ADMIN_TOKEN)"
        } else {
            ""
        };
        anyhow::bail!("the head refused {} ({status}): {}{hint}", args.file.display(), error_message(&body));
    }
    print!("{}", summary(&document, &base));
    Ok(())
}

/// The `error` of a control API error body, else the body as it came.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

/// What was deployed, one line per deployment.
fn summary(document: &ServeDocument, base: &str) -> String {
    let apps = &document.config().applications;
    let mut out = format!("Deployed {} application(s) to {base}", apps.len());
    if apps.is_empty() {
        out.push_str(" (every application is removed)");
    }
    out.push('\n');
    for app in apps {
        let prefix = app.route_prefix.as_deref().unwrap_or("none");
        out.push_str(&format!("  {} (route_prefix {prefix})\n", app.name));
        for plan in document.plans().iter().filter(|p| p.deployment.application == app.name) {
            let d = &plan.deployment;
            let replicas = match &d.autoscaling {
                Some(a) => format!("{}..{} replicas (autoscaling)", a.min_replicas, a.max_replicas),
                None => format!("{} replica(s)", d.num_replicas),
            };
            out.push_str(&format!("    {}: model `{}`, {replicas}\n", d.deployment_name, d.model_name));
        }
    }
    out.push_str("Run `lumen status` to follow the rollout.\n");
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use lumen_head::config::model::{HEAD_OPTIONS, OPTIONS, check_value, is_device};
    use lumen_worker::engine::EngineOptions;
    use lumen_worker::engine::options::ComputeDevice;

    /// The head checks a deployment's `model:` section before any worker sees it, with its own
    /// table of the options: it must list exactly the options the worker reads (plus `source`,
    /// the config's spelling of `model`, and the head's own options), accept the worker's
    /// defaults, and agree with the worker on which devices exist.
    #[test]
    fn the_head_checks_exactly_the_engine_options_the_worker_reads() {
        let defaults = serde_json::to_value(EngineOptions::default()).expect("options serialize");
        let worker: BTreeSet<&str> = defaults.as_object().expect("an object").keys().map(String::as_str).collect();
        let head: BTreeSet<&str> =
            OPTIONS.iter().map(|(name, _)| *name).filter(|n| *n != "source" && !HEAD_OPTIONS.contains(n)).collect();
        assert_eq!(head, worker, "head/src/config/model.rs OPTIONS vs worker/src/engine/options.rs");
        for (name, kind) in OPTIONS {
            if let Some(value) = defaults.get(*name) {
                assert_eq!(check_value(*kind, value), Ok(()), "the worker's default {name} = {value}");
            }
        }
        for device in ["cpu", "cuda", "cuda:0", "cuda:7", "gpu", "cuda:", "cuda:x", "CUDA", "cuda:-1", " cpu"] {
            assert_eq!(is_device(device), device.parse::<ComputeDevice>().is_ok(), "{device:?}");
        }
    }
}
