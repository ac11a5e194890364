//! API keys: when any are configured, `/v1/*` requires `Authorization: Bearer <key>` (as vLLM's
//! `--api-key`). Keys are compared in constant time, and every configured key is compared, so
//! the answer's timing tells nothing about which bytes or which key matched.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiState;
use crate::api::edge::errors::ApiError;
use crate::secret;

/// Middleware for the `/v1/*` routes.
pub async fn require_key(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    match secret::bearer(request.headers()) {
        Some(token) if key_matches(keys, token) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Whether `token` equals one of `keys` ([`secret::matches_any`]: constant time, every key compared).
pub fn key_matches(keys: &[String], token: &str) -> bool {
    secret::matches_any(keys, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_key_is_accepted() {
        let keys = vec!["alpha-key".to_string(), "beta-key".to_string()];
        assert!(key_matches(&keys, "alpha-key"));
        assert!(key_matches(&keys, "beta-key"));
    }

    #[test]
    fn prefixes_extensions_and_empty_tokens_are_refused() {
        let keys = vec!["secret".to_string()];
        for token in ["", "secre", "secret2", "Secret", "secreT"] {
            assert!(!key_matches(&keys, token), "{token:?}");
        }
    }
}
