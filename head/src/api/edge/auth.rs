//! API keys: when any are configured (`--api-key`, or named keys: [`crate::api::edge::keys`]),
//! `/v1/*` requires `Authorization: Bearer <key>` (as vLLM's `--api-key`). The key is looked up by
//! its hash, comparing every configured key in constant time, so the answer's timing tells
//! nothing about which bytes or which key matched.
//!
//! A request let in carries its [`Caller`] (its key's entry) to the handlers, which apply the
//! key's models and limits when they admit it. On the way out its response gets the
//! `x-ratelimit-*` headers its admission measured, and counts in
//! `lumen_tenant_requests_total{tenant, outcome}`.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiState;
use crate::api::edge::errors::{ApiError, insert_rate_headers};
use crate::api::edge::keys::Caller;
use crate::secret;

/// Middleware for the `/v1/*` routes.
pub async fn require_key(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let keys = state.keys();
    if keys.is_open() {
        return next.run(request).await;
    }
    let Some(key) = secret::bearer(request.headers()).and_then(|token| keys.lookup(token)) else {
        return ApiError::Unauthorized.into_response();
    };
    let caller = Caller::new(key.clone());
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    if let Some(rate) = caller.headers() {
        insert_rate_headers(response.headers_mut(), &rate);
    }
    let outcome = match response.status().as_u16() {
        429 => "rate_limited",
        400..=499 => "invalid",
        500.. => "error",
        _ => "success",
    };
    keys.limiter().metrics().requests.with_label_values(&[&*key.tenant, outcome]).inc();
    response
}
