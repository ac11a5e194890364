//! `lumen status`: what a running head serves, from `GET /api/serve/applications/`, printed like
//! Ray's `serve status` (per application its status and message, per deployment its status,
//! replica states and message), or as the raw JSON document with `--json`.

use std::fmt::Write;
use std::time::Duration;

use anyhow::Context;
use lumen_head::control::ServeStatus;

use super::StatusArgs;

const TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let base = args.address.base_url();
    let client = args.address.client(TIMEOUT)?;
    let response = client
        .get(format!("{base}/api/serve/applications/"))
        .send()
        .await
        .with_context(|| format!("cannot reach the head's control API at {base}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the status document")?;
    if !status.is_success() {
        anyhow::bail!("the head answered {status}: {}", super::deploy::error_message(&body));
    }
    let document: serde_json::Value = serde_json::from_str(&body).context("the status document is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let parsed: ServeStatus = serde_json::from_value(document).context("the status document has an unknown shape")?;
    print!("{}", summary(&parsed));
    Ok(())
}

/// A YAML-like summary, as Ray's `serve status` prints.
fn summary(status: &ServeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "proxy_location: {}", status.proxy_location);
    if status.applications.is_empty() {
        let _ = writeln!(out, "applications: {{}}  # nothing is deployed");
        return out;
    }
    let _ = writeln!(out, "applications:");
    for (name, app) in &status.applications {
        let _ = writeln!(out, "  {name}:");
        let _ = writeln!(out, "    status: {}", app.status);
        let _ = writeln!(out, "    message: {}", quoted(&app.message));
        let _ = writeln!(out, "    last_deployed_time_s: {}", app.last_deployed_time_s);
        if let Some(prefix) = &app.route_prefix {
            let _ = writeln!(out, "    route_prefix: {prefix}");
        }
        let _ = writeln!(out, "    deployments:");
        for (dname, d) in &app.deployments {
            let _ = writeln!(out, "      {dname}:");
            let _ = writeln!(out, "        status: {}", d.status);
            let _ = writeln!(out, "        target_num_replicas: {}", d.target_num_replicas);
            let _ = writeln!(out, "        replica_states:");
            for (state, count) in &d.replica_states {
                let _ = writeln!(out, "          {state}: {count}");
            }
            let _ = writeln!(out, "        message: {}", quoted(&d.message));
        }
    }
    out
}

/// `''` for an empty message (as Ray prints it), else the message on one line.
fn quoted(message: &str) -> String {
    if message.is_empty() { "''".into() } else { message.replace('\n', " ") }
}
