//! Every way an API request can fail, and the one place where a failure becomes an HTTP status
//! plus OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
//!
//! Mid-stream failures cannot change the status any more; [`ApiError::body`] gives the same body
//! for the SSE error event.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::edge::limits::{Limited, Reason};
use crate::backend::BackendError;

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_S: u32 = 1;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON, or not a JSON object.
    #[error("{message}")]
    InvalidJson { message: String },
    /// 400: a parameter has the wrong type, is out of range or is inconsistent with another.
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    /// 401: an API key is configured and the request did not present it.
    #[error("invalid or missing API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// 404: no deployment serves this model name.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// 404: no stored response has this id (`GET /v1/responses/{id}`, `previous_response_id`),
    /// as vLLM answers it.
    #[error("Response with id '{id}' not found.")]
    ResponseNotFound { id: String, param: Option<String> },
    /// 400: the model is served for the other kind of endpoint (generation or pooling, vLLM's
    /// `--runner`), in vLLM's words ("The model does not support Embeddings API").
    #[error("The model does not support {api}")]
    UnsupportedApi { api: &'static str },
    /// 400: cancelling a response that did not run in the background (Lumen runs none there).
    #[error("Cannot cancel a synchronous response.")]
    NotCancellable,
    /// 404: no route matches the path.
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    /// 405: the route exists, the method is not one of its methods.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// 415: a JSON route was sent a body that is not declared `application/json`.
    #[error("unsupported media type {content_type:?}: only 'application/json' is allowed")]
    UnsupportedMediaType { content_type: String },
    /// 413: the body exceeds the configured limit.
    #[error("the request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// 404: the caller's key may not use this model; OpenAI's answer, which does not say whether
    /// the model exists.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotAllowed(String),
    /// 429: a limit of the caller's key ([`Limited`]); with OpenAI's `x-ratelimit-*` headers.
    #[error("{}", .0.message)]
    Limited(Box<Limited>),
    /// 429: the model's admission queue is full, or the backend is overloaded.
    #[error("{0}")]
    Overloaded(String),
    /// 503: the model exists but cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// 500: anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: param.into(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. }
            | ApiError::InvalidParam { .. }
            | ApiError::NotCancellable
            | ApiError::UnsupportedApi { .. } => StatusCode::BAD_REQUEST,
            ApiError::ResponseNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) | ApiError::RouteNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) | ApiError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. }
            | ApiError::InvalidParam { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::UnsupportedMediaType { .. }
            | ApiError::ResponseNotFound { .. }
            | ApiError::NotCancellable
            | ApiError::UnsupportedApi { .. } => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) | ApiError::RouteNotFound { .. } => {
                "not_found_error"
            }
            // OpenAI's types for its rate limits and quota.
            ApiError::Limited(limited) => match limited.reason {
                Reason::Tokens => "tokens",
                Reason::Quota => "insufficient_quota",
                Reason::Requests | Reason::Concurrency | Reason::Model => "requests",
            },
            ApiError::Overloaded(_) => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable_error",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn param_name(&self) -> Option<&str> {
        match self {
            ApiError::InvalidParam { param, .. } => Some(param),
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) => Some("model"),
            ApiError::ResponseNotFound { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) => Some("model_not_found"),
            ApiError::Limited(limited) if limited.reason == Reason::Quota => Some("insufficient_quota"),
            ApiError::Limited(_) => Some("rate_limit_exceeded"),
            ApiError::Overloaded(_) => Some("queue_full"),
            _ => None,
        }
    }

    /// OpenAI's error object, as sent in the HTTP body and in an SSE error event.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param_name(),
            "code": self.code(),
        }})
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::ModelNotFound(model) => ApiError::ModelNotFound(model),
            BackendError::InvalidRequest { message, param: Some(param) } => ApiError::InvalidParam { param, message },
            BackendError::InvalidRequest { message, param: None } => ApiError::InvalidJson { message },
            BackendError::Overloaded(_) => ApiError::Overloaded(e.to_string()),
            BackendError::NoReplica(_) | BackendError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            BackendError::Internal(message) => ApiError::Internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let ApiError::Limited(limited) = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(limited.retry_after_s));
            insert_rate_headers(headers, &limited.headers);
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Adds OpenAI's `x-ratelimit-*` headers (those not already there).
pub fn insert_rate_headers(headers: &mut axum::http::HeaderMap, rate: &crate::api::edge::limits::RateHeaders) {
    for (name, value) in rate.pairs() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.entry(name).or_insert(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_map_to_openai_statuses() {
        let cases = [
            (BackendError::ModelNotFound("m".into()), 404),
            (BackendError::NoReplica("m".into()), 503),
            (BackendError::Unavailable("gone".into()), 503),
            (BackendError::Overloaded("full".into()), 429),
            (BackendError::InvalidRequest { message: "too long".into(), param: Some("max_tokens".into()) }, 400),
            (BackendError::InvalidRequest { message: "bad".into(), param: None }, 400),
            (BackendError::Internal("boom".into()), 500),
        ];
        for (backend, status) in cases {
            assert_eq!(ApiError::from(backend.clone()).status().as_u16(), status, "{backend:?}");
        }
    }

    #[test]
    fn invalid_request_from_backend_keeps_its_param() {
        let e = ApiError::from(BackendError::InvalidRequest { message: "m".into(), param: Some("n".into()) });
        assert_eq!(e.body()["error"]["param"], "n");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn unknown_routes_wrong_methods_and_media_types_have_openais_body() {
        let cases = [
            (ApiError::RouteNotFound { method: "GET".into(), path: "/nope".into() }, 404, "not_found_error"),
            (
                ApiError::MethodNotAllowed { method: "GET".into(), path: "/v1/completions".into() },
                405,
                "invalid_request_error",
            ),
            (ApiError::UnsupportedMediaType { content_type: "text/plain".into() }, 415, "invalid_request_error"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            let body = error.body();
            assert_eq!(body["error"]["type"], kind);
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(body["error"].get("param").is_some() && body["error"].get("code").is_some());
        }
    }

    #[test]
    fn queue_full_answers_429_with_retry_after() {
        let response = ApiError::Overloaded("queue full".into()).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
