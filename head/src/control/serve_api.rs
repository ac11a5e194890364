//! Ray Serve's REST API for applications: `PUT` a serve config (JSON, or YAML when the content
//! type says so), `GET` the status document, `DELETE` everything. Success answers 200 with an
//! empty body, as Ray's does; errors answer `{"error": "..."}` naming the bad field.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::applications::{ApplyError, ServeDocument};
use super::{ControlState, ServeStatus};

/// An error of the control API, in its one HTTP shape.
#[derive(Debug)]
pub struct ControlError {
    pub status: StatusCode,
    pub message: String,
}

impl From<ApplyError> for ControlError {
    fn from(e: ApplyError) -> Self {
        let status = match e {
            ApplyError::Invalid(_) | ApplyError::Refused(_) => StatusCode::BAD_REQUEST,
            ApplyError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self { status, message: e.to_string() }
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// `GET /api/serve/applications/`.
pub async fn get_applications(State(state): State<ControlState>) -> Json<ServeStatus> {
    Json(state.applications.status())
}

/// `PUT /api/serve/applications/`: declarative; applications absent from the body are removed.
pub async fn put_applications(
    State(state): State<ControlState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ControlError> {
    let text = std::str::from_utf8(&body).map_err(|_| ControlError {
        status: StatusCode::BAD_REQUEST,
        message: "serve config: the body is not UTF-8 text".into(),
    })?;
    let document = if is_yaml(&headers) { ServeDocument::from_yaml(text) } else { ServeDocument::from_json(text) }
        .map_err(ApplyError::from)?;
    let names: Vec<String> = document.config().applications.iter().map(|a| a.name.clone()).collect();
    let applications = state.applications.clone();
    run_blocking(move || applications.apply(document)).await?;
    tracing::info!(applications = ?names, "serve config applied");
    Ok(StatusCode::OK)
}

/// `DELETE /api/serve/applications/`: removes every application.
pub async fn delete_applications(State(state): State<ControlState>) -> Result<StatusCode, ControlError> {
    let applications = state.applications.clone();
    run_blocking(move || applications.delete_all()).await?;
    tracing::info!("every application deleted");
    Ok(StatusCode::OK)
}

/// Applying writes (and syncs) the state file: off the async runtime.
async fn run_blocking(apply: impl FnOnce() -> Result<(), ApplyError> + Send + 'static) -> Result<(), ControlError> {
    match tokio::task::spawn_blocking(apply).await {
        Ok(applied) => applied.map_err(ControlError::from),
        Err(e) => {
            Err(ControlError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("apply failed: {e}") })
        }
    }
}

/// Whether the body is YAML (`application/yaml`, `application/x-yaml`, `text/yaml`, ...).
fn is_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase().ends_with("yaml"))
}
