//! The control server's one error shape (port 8265): `{"error": message}`, plus `"field"` when a
//! serve config field (or a query parameter) is at fault; 401s also carry `WWW-Authenticate: Bearer`. Every error of the
//! port answers this way, unknown routes (404) and wrong methods (405) included, so clients and
//! `lumen deploy` can always show the message. (The `/v1` routes mounted here answer in OpenAI's
//! shape, which carries a message too.)

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::applications::ApplyError;
use crate::api::edge::keys::KeysError;

/// An error of the control API, in its one HTTP shape: `{"error": message}`, with `"field"` when
/// a config field is to blame.
#[derive(Debug)]
pub struct ControlError {
    pub status: StatusCode,
    pub message: String,
    /// The path of the config field (or the query parameter) at fault.
    pub field: Option<String>,
}

impl ControlError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), field: None }
    }
}

impl From<ApplyError> for ControlError {
    fn from(e: ApplyError) -> Self {
        let (status, field) = match &e {
            ApplyError::Invalid(invalid) => {
                (StatusCode::BAD_REQUEST, Some(invalid.field.clone()).filter(|f| !f.is_empty()))
            }
            ApplyError::Refused(_) => (StatusCode::BAD_REQUEST, None),
            ApplyError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            ApplyError::Keys(refused) => (StatusCode::BAD_REQUEST, Some(refused.field.clone())),
        };
        Self { status, message: e.to_string(), field }
    }
}

impl From<KeysError> for ControlError {
    fn from(e: KeysError) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: e.to_string(), field: Some(e.field) }
    }
}

/// The fallback of unknown routes: 404.
pub async fn not_found(request: Request) -> ControlError {
    ControlError::new(StatusCode::NOT_FOUND, format!("no route for {} {}", request.method(), request.uri().path()))
}

/// The fallback of known routes asked with another method: 405 (axum adds `Allow`).
pub async fn method_not_allowed(request: Request) -> ControlError {
    ControlError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.message });
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
