//! Secrets the head checks (API keys, the worker join token, the admin token): the one
//! comparison used for all of them, and the bearer-token parsing of HTTP requests.
//!
//! Contract: [`constant_time_eq`]'s running time depends only on the two lengths, never on where
//! the bytes differ; [`matches_any`] compares against every configured secret, so the timing
//! tells neither which bytes nor which secret matched. Nothing here logs or formats a secret.

use axum::http::{HeaderMap, header};

/// Byte equality whose running time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Whether `presented` equals one of `secrets`, comparing against all of them in constant time.
pub fn matches_any(secrets: &[String], presented: &str) -> bool {
    secrets.iter().fold(false, |found, secret| found | constant_time_eq(secret.as_bytes(), presented.as_bytes()))
}

/// The token of an `Authorization: Bearer <token>` header (trimmed), if there is one. The scheme
/// is matched without regard to case (`bearer`, `BEARER`), as HTTP defines auth schemes and as
/// vLLM accepts them.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        for other in [&b"secreT"[..], b"secret2", b"secre", b""] {
            assert!(!constant_time_eq(b"secret", other), "{other:?}");
        }
    }

    #[test]
    fn any_configured_secret_is_accepted() {
        let keys = vec!["alpha-key".to_string(), "beta-key".to_string()];
        assert!(matches_any(&keys, "alpha-key"));
        assert!(matches_any(&keys, "beta-key"));
        assert!(!matches_any(&keys, "gamma-key"));
        assert!(!matches_any(&[], "anything"));
    }

    #[test]
    fn bearer_needs_the_scheme_in_any_case() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer abc ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            headers.insert(header::AUTHORIZATION, format!("{scheme} abc").parse().unwrap());
            assert_eq!(bearer(&headers), Some("abc"), "{scheme}");
        }
        headers.insert(header::AUTHORIZATION, "Bearerabc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
