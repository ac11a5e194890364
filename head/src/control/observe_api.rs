//! The dashboard's data on port 8265:
//! - `GET /api/requests?limit=N`: `{"log_requests": bool, "requests": [record, ...]}`, newest
//!   first, `limit` 100 by default and at most [`MAX_LIMIT`] (records as
//!   [`crate::observe::RequestRecord`] serializes them).
//! - `GET /api/timeseries?seconds=N`: `{"interval_s", "window_s", "samples": [...]}`, oldest
//!   first, only the last `N` seconds when given (samples as [`crate::observe::Sample`]).
//!
//! A malformed `limit` or `seconds` is a 400 `{"error": ...}` naming it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::error::ControlError;
use crate::observe::{History, RequestLog};

/// Records `GET /api/requests` answers without a `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// The most records one answer holds.
pub const MAX_LIMIT: usize = 1000;

/// What the two handlers read.
#[derive(Clone)]
pub struct ObserveState {
    pub requests: Arc<RequestLog>,
    pub history: Arc<History>,
}

pub fn router(state: ObserveState) -> Router {
    Router::new().route("/api/requests", get(requests)).route("/api/timeseries", get(timeseries)).with_state(state)
}

/// The query's parameters (a malformed query string is a 400).
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

/// The query parameter `name` as a whole number, if present; else the 400.
fn number(query: Params, name: &str) -> Result<Option<u64>, ControlError> {
    let bad = |message: String| ControlError::new(StatusCode::BAD_REQUEST, message);
    let Query(query) = query.map_err(|e| bad(format!("the query string is malformed: {}", e.body_text())))?;
    match query.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad(format!("`{name}` must be a non-negative integer, got `{v}`"))),
    }
}

async fn requests(State(state): State<ObserveState>, query: Params) -> Result<Json<Value>, ControlError> {
    let limit = number(query, "limit")?;
    let limit = limit.map_or(DEFAULT_LIMIT, |l| usize::try_from(l).unwrap_or(MAX_LIMIT)).min(MAX_LIMIT);
    Ok(Json(json!({
        "log_requests": state.requests.log_prompts(),
        "requests": state.requests.recent(limit),
    })))
}

async fn timeseries(State(state): State<ObserveState>, query: Params) -> Result<Json<Value>, ControlError> {
    let since = match number(query, "seconds")? {
        Some(seconds) => crate::clock::unix_ms().saturating_sub(seconds.saturating_mul(1000)),
        None => 0,
    };
    Ok(Json(json!({
        "interval_s": state.history.interval().as_secs_f64(),
        "window_s": state.history.window().as_secs(),
        "samples": state.history.since(since),
    })))
}
