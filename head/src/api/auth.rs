//! API keys: when any are configured, `/v1/*` requires `Authorization: Bearer <key>` (as vLLM's
//! `--api-key`). Keys are compared in constant time, and every configured key is compared, so
//! the answer's timing tells nothing about which bytes or which key matched.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::errors::ApiError;

/// Middleware for the `/v1/*` routes.
pub async fn require_key(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if key_matches(keys, token) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Whether `token` equals one of `keys`, comparing against all of them in constant time.
pub fn key_matches(keys: &[String], token: &str) -> bool {
    keys.iter().fold(false, |found, key| found | constant_time_eq(key.as_bytes(), token.as_bytes()))
}

/// Byte equality whose running time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
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
