//! Lumen's API keys on the control port: `GET /api/lumen/keys` lists the named keys (tenant,
//! fingerprint, models, limits, priority; never key material), `PUT /api/lumen/keys` replaces
//! them all at once, live (body: `{"api_keys": [...]}`, JSON, or YAML when the content type says
//! so: the same section a serve config may carry, [`crate::api::edge::keys`]).
//!
//! Both need the admin token when one is configured (`PUT` as the other mutating routes,
//! [`super::serve_api`]; `GET` as the usage it goes with: tenants and their limits are what they
//! are charged by); a refused document answers 400 `{"error", "field"}` and changes
//! nothing. With `--state-dir` the keys set here are persisted (as their hashes) and a head
//! restarted without a keys file or section restores them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::ControlState;
use super::error::ControlError;
use super::serve_api::{authorize, read_document, run_blocking};
use crate::api::edge::keys;

/// `GET /api/lumen/keys`.
pub async fn get_keys(State(state): State<ControlState>, headers: HeaderMap) -> Result<Json<Value>, ControlError> {
    authorize(&state, &headers)?;
    Ok(Json(json!({"api_keys": state.applications.api().keys().list()})))
}

/// `PUT /api/lumen/keys`: the new table, then the listing of what is now in force.
pub async fn put_keys(
    State(state): State<ControlState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ControlError> {
    authorize(&state, &headers)?;
    let document = read_document("API keys", &headers, body)?;
    let named = keys::parse(&document)?;
    let tenants: Vec<String> = named.iter().map(|k| k.tenant.to_string()).collect();
    let applications = state.applications.clone();
    run_blocking(move || applications.replace_keys(named)).await?;
    tracing::info!(?tenants, "API keys replaced");
    Ok(Json(json!({"api_keys": state.applications.api().keys().list()})))
}
