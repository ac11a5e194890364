//! Ray Serve's REST API for applications: `PUT` a serve config (JSON, or YAML when the content
//! type says so), `GET` the status document, `DELETE` everything. Success answers 200 with an
//! empty body, as Ray's does; errors answer `{"error": "..."}`, plus `"field"` (the offending
//! field's path, e.g. `applications[1].deployments[0].autoscaling_config.max_replicas`) when a
//! config is refused. A refused config changes nothing: it is checked whole before it is applied.
//!
//! A serve config may carry Lumen's `api_keys:` section ([`crate::api::edge::keys`]): checked with
//! the rest of the document, it replaces the named API keys together with the applications (one
//! change: a refusal or a failure to persist either changes neither), and it is not persisted
//! with them; a config without the section leaves the keys as they are.
//!
//! `PUT` and `DELETE` change what the cluster serves: with an admin token configured they answer
//! 401 (`{"error": ...}`, `WWW-Authenticate: Bearer`) unless the request carries
//! `Authorization: Bearer <token>`, compared in constant time ([`crate::secret`]). `GET` is open.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};

use serde_json::Value;

use super::applications::{ApplyError, ServeDocument};
use super::error::ControlError;
use super::{ControlState, ServeStatus};
use crate::api::edge::keys;
use crate::config;
use crate::secret;

/// Refuses a request that does not carry the configured admin token (the mutating routes and the
/// tenants' usage need it).
pub(super) fn authorize(state: &ControlState, headers: &HeaderMap) -> Result<(), ControlError> {
    let Some(token) = &state.admin_token else { return Ok(()) };
    match secret::bearer(headers) {
        Some(presented) if secret::constant_time_eq(token.as_bytes(), presented.as_bytes()) => Ok(()),
        _ => Err(ControlError::new(
            StatusCode::UNAUTHORIZED,
            "this route needs the admin token: send it as `Authorization: Bearer <token>`",
        )),
    }
}

/// `GET /api/serve/applications/`.
pub async fn get_applications(State(state): State<ControlState>) -> Json<ServeStatus> {
    Json(state.applications.status())
}

/// `PUT /api/serve/applications/`: declarative; applications absent from the body are removed.
pub async fn put_applications(
    State(state): State<ControlState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ControlError> {
    authorize(&state, &headers)?;
    let mut value = read_document("serve config", &headers, body)?;
    // Lumen's `api_keys:` section: checked with the rest, applied with it, persisted on its own
    // (`api-keys.json`, never with the serve config).
    let named = keys::take_section(&mut value)?;
    if let Some(named) = &named {
        state.applications.api().keys().check(named)?;
    }
    let document = ServeDocument::from_value(value).map_err(ApplyError::from)?;
    let names: Vec<String> = document.config().applications.iter().map(|a| a.name.clone()).collect();
    let tenants: Option<Vec<String>> = named.as_ref().map(|n| n.iter().map(|k| k.tenant.to_string()).collect());
    let applications = state.applications.clone();
    run_blocking(move || applications.apply_with_keys(document, named)).await?;
    tracing::info!(applications = ?names, "serve config applied");
    if let Some(tenants) = tenants {
        tracing::info!(?tenants, "API keys replaced");
    }
    Ok(StatusCode::OK)
}

/// A YAML (when the content type says so) or JSON body as a JSON value; `what` names it in errors.
pub(super) fn read_document(
    what: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ControlError> {
    let body =
        body.map_err(|rejection| ControlError::new(rejection.status(), format!("{what}: {}", rejection.body_text())))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ControlError::new(StatusCode::BAD_REQUEST, format!("{what}: the body is not UTF-8 text")))?;
    let value = if is_yaml(headers) {
        check_flow_depth(text)?;
        config::parse_yaml(text)
    } else {
        config::parse_json(text)
    };
    Ok(value.map_err(ApplyError::from)?)
}

/// `DELETE /api/serve/applications/`: removes every application.
pub async fn delete_applications(
    State(state): State<ControlState>,
    headers: HeaderMap,
) -> Result<StatusCode, ControlError> {
    authorize(&state, &headers)?;
    let applications = state.applications.clone();
    run_blocking(move || applications.delete_all()).await?;
    tracing::info!("every application deleted");
    Ok(StatusCode::OK)
}

/// Applying writes (and syncs) the state file: off the async runtime.
pub(super) async fn run_blocking(
    apply: impl FnOnce() -> Result<(), ApplyError> + Send + 'static,
) -> Result<(), ControlError> {
    match tokio::task::spawn_blocking(apply).await {
        Ok(applied) => applied.map_err(ControlError::from),
        Err(e) => Err(ControlError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("apply failed: {e}"))),
    }
}

/// The deepest `[`/`{` nesting a YAML body may have. The YAML parser takes time quadratic in the
/// nesting depth before its own recursion limit (128) fires: 50 000 levels cost seconds of CPU.
/// Serve configs nest a few levels; brackets inside quoted strings count too, harmlessly.
pub const MAX_YAML_FLOW_DEPTH: usize = 64;

/// Refuses a YAML body nested deeper than [`MAX_YAML_FLOW_DEPTH`] before the parser sees it.
fn check_flow_depth(text: &str) -> Result<(), ControlError> {
    let mut depth = 0usize;
    for byte in text.bytes() {
        match byte {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => continue,
        }
        if depth > MAX_YAML_FLOW_DEPTH {
            return Err(ControlError::new(
                StatusCode::BAD_REQUEST,
                format!("serve config: nested deeper than {MAX_YAML_FLOW_DEPTH} levels"),
            ));
        }
    }
    Ok(())
}

/// Whether the body is YAML (`application/yaml`, `application/x-yaml`, `text/yaml`, ...).
fn is_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase().ends_with("yaml"))
}
