//! The control server on port 8265: Ray Serve's REST API for applications
//! (`/api/serve/applications/`, [`serve_api`]), Lumen's API keys (`/api/lumen/keys`,
//! [`keys_api`]) and the tenants' usage (`/api/lumen/usage`, [`usage_api`]), Lumen's cluster
//! view (`/api/cluster`, [`cluster_api`]), the probes KubeRay uses, the metrics, and the
//! dashboard's page; with [`router_with_api`] also the dashboard's data ([`observe_api`]) and the
//! OpenAI `/v1` routes.
//!
//! The serve config in force is owned by [`Applications`] (apply, persist, status); the handlers
//! only translate HTTP to it.
//!
//! Errors: every error of this port is `{"error": message}` ([`error::ControlError`]), unknown
//! routes and wrong methods included.
//!
//! Access: with an admin token configured, the mutating routes (`PUT`/`DELETE`
//! `/api/serve/applications/`, `PUT /api/lumen/keys`) and the tenants' usage (`GET
//! /api/lumen/usage`: what they are charged for) require `Authorization: Bearer <token>` (401
//! otherwise); every other read (dashboard, status, cluster view, request log, time series,
//! metrics, probes) stays open, so the dashboard works read-only without the token. The `/v1`
//! routes keep their API keys.

pub mod applications;
pub mod cluster_api;
pub mod dashboard;
pub mod error;
pub mod keys_api;
pub mod observe_api;
pub mod serve_api;
pub mod status;
pub mod usage_api;
pub mod usage_store;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

pub use applications::{Applications, ApplyError, KeysOrigin, ServeDocument, StartingPoint};
pub use status::ServeStatus;

use crate::observe::History;

/// What the control handlers share.
#[derive(Clone)]
pub struct ControlState {
    pub applications: Applications,
    /// The same registry the API's `/metrics` serves.
    pub registry: prometheus::Registry,
    /// When set, the mutating routes and the usage require it as a bearer token.
    pub admin_token: Option<String>,
}

/// [`router`] plus the dashboard's data (`/api/requests`, `/api/timeseries`: [`observe_api`]) and
/// the OpenAI `/v1` routes of `api` (same authentication, limits and state as on port 8000).
pub fn router_with_api(state: ControlState, api: crate::api::ApiState, history: Arc<History>) -> Router {
    let observe = observe_api::ObserveState { requests: api.request_log(), history };
    router(state)
        .merge(observe_api::router(observe))
        .merge(crate::api::v1_router(api))
        // After the merges: the fallback covers every route's method router.
        .method_not_allowed_fallback(error::method_not_allowed)
}

pub fn router(state: ControlState) -> Router {
    let applications =
        get(serve_api::get_applications).put(serve_api::put_applications).delete(serve_api::delete_applications);
    Router::new()
        .route("/api/serve/applications/", applications.clone())
        .route("/api/serve/applications", applications)
        .route("/api/lumen/keys", get(keys_api::get_keys).put(keys_api::put_keys))
        .route("/api/lumen/usage", get(usage_api::get_usage))
        .route("/api/cluster", get(cluster_api::cluster))
        .route("/api/gcs_healthz", get(|| async { "success" }))
        .route("/metrics", get(metrics))
        .merge(dashboard::router(dashboard::Source::from_env()))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

async fn metrics(State(state): State<ControlState>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&state.registry.gather(), &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => {
            error::ControlError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("could not encode the metrics: {e}"))
                .into_response()
        }
    }
}
