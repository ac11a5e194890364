//! Request bodies: JSON parsing that answers OpenAI's 400 (never axum's 422 or plain text), 413
//! beyond the body limit and 415 for a body not declared `application/json` (vLLM's rule: a JSON
//! body sent as `text/plain` or a form is refused, not guessed at), and typed views of a body
//! whose errors name the parameter.
//!
//! A body is parsed once into a JSON object; each handler then deserializes the typed views it
//! needs from that object (the common sampling fields, the route's own fields). Unknown fields
//! are ignored, as OpenAI does.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::ApiState;
use crate::api::edge::errors::ApiError;

/// A request body that is a JSON object. The byte limit is axum's `DefaultBodyLimit`, which the
/// router sets from the configuration.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<ApiState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        check_content_type(req.headers())?;
        let limit = state.config.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| match rejection {
            BytesRejection::FailedToBufferBody(inner)
                if inner.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::BodyTooLarge { limit }
            }
            other => ApiError::InvalidJson { message: format!("could not read the request body: {other}") },
        })?;
        parse_object(&bytes).map(JsonObject)
    }
}

/// Refuses a body whose `Content-Type` is not `application/json` (parameters such as `charset`
/// allowed, any case), a missing one included.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media_type = declared.as_deref().unwrap_or_default().split(';').next().unwrap_or_default().trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType { content_type: declared.unwrap_or_default() })
    }
}

/// Parses a body that must be a JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson { message: "the request body must be a JSON object".into() }),
        Err(e) => Err(ApiError::InvalidJson { message: format!("the request body is not valid JSON: {e}") }),
    }
}

/// Deserializes a typed view of `body`; a type error names the offending parameter by its path
/// (`temperature`, `messages[0].content`).
pub fn typed<T: DeserializeOwned>(body: &Map<String, Value>) -> Result<T, ApiError> {
    // Deserializing from a borrowed map would need `T: Deserialize<'de>` tied to it; cloning the
    // map keeps the views independent and costs far less than the request it describes.
    let value = Value::Object(body.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            ApiError::InvalidJson { message: inner }
        } else {
            ApiError::InvalidParam { message: format!("{path}: {inner}"), param: path }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct View {
        temperature: Option<f64>,
        n: Option<i64>,
    }

    #[test]
    fn wrong_type_names_the_parameter() {
        let body = parse_object(br#"{"temperature": "hot"}"#).unwrap();
        match typed::<View>(&body) {
            Err(ApiError::InvalidParam { param, .. }) => assert_eq!(param, "temperature"),
            other => panic!("expected a param error, got {other:?}"),
        }
    }

    #[test]
    fn fraction_where_integer_expected_names_the_parameter() {
        let body = parse_object(br#"{"n": 1.5}"#).unwrap();
        assert!(matches!(typed::<View>(&body), Err(ApiError::InvalidParam { param, .. }) if param == "n"));
    }

    #[test]
    fn unknown_fields_and_nulls_are_accepted() {
        let body = parse_object(br#"{"temperature": null, "n": 2, "frobnicate": [1]}"#).unwrap();
        let view: View = typed(&body).unwrap();
        assert_eq!((view.temperature, view.n), (None, Some(2)));
    }

    #[test]
    fn only_json_bodies_are_read() {
        let with = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = value {
                headers.insert(header::CONTENT_TYPE, v.parse().unwrap());
            }
            check_content_type(&headers)
        };
        for good in ["application/json", "application/json; charset=utf-8", "Application/JSON"] {
            assert!(with(Some(good)).is_ok(), "{good}");
        }
        for bad in [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/jsonl")] {
            assert!(matches!(with(bad), Err(ApiError::UnsupportedMediaType { .. })), "{bad:?}");
        }
    }

    #[test]
    fn malformed_json_and_non_objects_are_rejected() {
        assert!(matches!(parse_object(b"{\"model\": "), Err(ApiError::InvalidJson { .. })));
        assert!(matches!(parse_object(b"[1, 2]"), Err(ApiError::InvalidJson { .. })));
        assert!(matches!(parse_object(b""), Err(ApiError::InvalidJson { .. })));
    }
}
