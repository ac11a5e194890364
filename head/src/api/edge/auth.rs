//! API keys: when any are configured (`--api-key`, or named keys: [`crate::api::edge::keys`]),
//! `/v1/*` requires `Authorization: Bearer <key>` (as vLLM's `--api-key`). The key is looked up by
//! its hash, comparing every configured key in constant time, so the answer's timing tells
//! nothing about which bytes or which key matched.
//!
//! A request let in carries its [`Caller`] (its key's entry) to the handlers, which apply the
//! key's models and limits when they admit it. On the way out its response gets the
//! `x-ratelimit-*` headers its admission measured, and the request counts once for its tenant
//! ([`crate::api::edge::usage`]) when its answer ends: by the status sent, or for a stream when
//! its body ends (`error` if it failed after the 200, `cancelled` if the client left before the
//! end), or `cancelled` if the client left before any answer.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::api::ApiState;
use crate::api::edge::errors::{ApiError, insert_rate_headers};
use crate::api::edge::keys::Caller;
use crate::api::edge::trace::{Trace, is_event_stream};
use crate::api::edge::usage::{Outcome, TenantMetrics};
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
    let caller = Caller::new(key);
    request.extensions_mut().insert(caller.clone());
    // Counts when dropped: with this future if the client leaves before the handler answers.
    let mut count = Count {
        metrics: keys.limiter().metrics().clone(),
        caller: caller.clone(),
        trace: request.extensions().get::<Trace>().cloned(),
        status: None,
        streaming: false,
    };
    let mut response = next.run(request).await;
    if let Some(rate) = caller.headers() {
        insert_rate_headers(response.headers_mut(), &rate);
    }
    count.status = Some(response.status().as_u16());
    if !is_event_stream(&response) {
        return response;
    }
    // A stream's outcome is known when its body ends or is dropped: the count rides along.
    count.streaming = true;
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _keep = &count;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// One request's count for its tenant, taken when dropped.
struct Count {
    metrics: TenantMetrics,
    caller: Caller,
    /// The request's trace (chat, completions, Responses, embeddings), which knows how a stream
    /// ended.
    trace: Option<Trace>,
    /// The status sent; `None`: nothing was.
    status: Option<u16>,
    streaming: bool,
}

impl Drop for Count {
    fn drop(&mut self) {
        let Some(key) = self.caller.key() else { return };
        let outcome = match (self.status, &self.trace) {
            (None, _) => Outcome::Cancelled,
            (Some(_), Some(trace)) if self.streaming => trace.stream_outcome(),
            (Some(status), _) => Outcome::of_status(status),
        };
        let model = self.caller.model();
        self.metrics.finished(&key.tenant, model.as_deref().unwrap_or(""), outcome);
    }
}
