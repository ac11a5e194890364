//! The worker's side of the head <-> worker protocol (`lumen_proto::v1`): the replicas this
//! process hosts ([`WorkerNode`]), the tonic `Worker` service over them ([`serve_worker`]), and
//! the task that registers with the head and streams heartbeats ([`registration`]), the
//! worker's own Prometheus `/metrics` ([`metrics_http`]) and the periodic engine log line
//! ([`stats_log`]), and a request's OpenTelemetry span on this side ([`otel`]).
//!
//! Contracts:
//! - Errors reach the head as gRPC statuses, mapped from [`ServiceError`] in exactly one place
//!   (`impl From<ServiceError> for Status` below): bad requests are `INVALID_ARGUMENT` with the
//!   error text as message and, when the error names a parameter, the metadata key
//!   [`PARAM_METADATA_KEY`] set to its API name (`temperature`, `max_tokens`, `messages`, ...);
//!   an unknown replica is `NOT_FOUND`; a full engine queue is `RESOURCE_EXHAUSTED`; a replica
//!   that is starting, stopping or whose engine stopped is `UNAVAILABLE`; a replica that failed
//!   to load is `FAILED_PRECONDITION` with the loader's error text.
//! - A `Generate` response stream owns the engine's request stream: dropping it (the caller
//!   cancelled the call) aborts the request at once.
//! - Nothing here blocks the async runtime: model loading and prompt tokenization run in
//!   `spawn_blocking`; the engine runs on its own thread.

pub mod convert;
pub mod devices;
pub mod grpc;
pub mod health;
pub mod metrics_http;
pub mod node;
pub mod otel;
pub mod registration;
pub mod resources;
pub mod stats_log;

use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::WorkerError;

pub use grpc::{WorkerService, serve_worker};
pub use metrics_http::serve_metrics;
pub use node::{Replica, WorkerNode};
pub use registration::{RegistrationConfig, RegistrationError, run_registration, spawn_registration};
pub use resources::detect_resources;
pub use stats_log::spawn_stats_logger;

/// The gRPC metadata key that names the offending request parameter of an `INVALID_ARGUMENT`.
pub const PARAM_METADATA_KEY: &str = "lumen-param";

/// Why the worker service could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no replica `{replica_id}` on this worker")]
    ReplicaNotFound { replica_id: String },

    #[error("replica `{replica_id}` is {state}")]
    ReplicaUnavailable { replica_id: String, state: &'static str },

    #[error("replica `{replica_id}` failed to load: {source}")]
    LoadFailed {
        replica_id: String,
        #[source]
        source: Arc<WorkerError>,
    },

    /// A request the service itself rejects (bad JSON, missing prompt, prompt too long).
    #[error("invalid `{param}`: {reason}")]
    InvalidRequest { param: &'static str, reason: String },

    /// A structured-output constraint that cannot be used (it does not compile, hits a limit,
    /// or the model cannot run constraints); `param` is the API field it came from.
    #[error("invalid `{param}`: {reason}")]
    InvalidConstraint { param: String, reason: String },

    /// An error from the engine, the tokenizer or the chat template.
    #[error(transparent)]
    Worker(#[from] WorkerError),

    #[error("internal error: {0}")]
    Internal(String),

    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServiceError {
    pub fn invalid(param: &'static str, reason: impl Into<String>) -> Self {
        ServiceError::InvalidRequest { param, reason: reason.into() }
    }
}

/// The request parameter a worker error is about, as the API names it.
fn worker_error_param(err: &WorkerError) -> Option<&'static str> {
    match err {
        WorkerError::InvalidParameter { param, .. } => Some(param),
        WorkerError::ContextTooLong { .. } => Some("max_tokens"),
        WorkerError::ChatTemplate(_) => Some("messages"),
        _ => None,
    }
}

fn with_param(mut status: Status, param: Option<&str>) -> Status {
    if let Some(param) = param
        && let Ok(value) = MetadataValue::try_from(param)
    {
        status.metadata_mut().insert(PARAM_METADATA_KEY, value);
    }
    status
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let message = err.to_string();
        match &err {
            ServiceError::ReplicaNotFound { .. } => Status::not_found(message),
            ServiceError::ReplicaUnavailable { .. } => Status::unavailable(message),
            ServiceError::LoadFailed { source, .. } => {
                with_param(Status::failed_precondition(message), worker_error_param(source))
            }
            ServiceError::InvalidRequest { param, .. } => with_param(Status::invalid_argument(message), Some(param)),
            ServiceError::InvalidConstraint { param, .. } => {
                with_param(Status::invalid_argument(message), Some(param.as_str()))
            }
            ServiceError::Worker(w) => match w {
                WorkerError::InvalidParameter { .. }
                | WorkerError::ContextTooLong { .. }
                | WorkerError::ChatTemplate(_) => with_param(Status::invalid_argument(message), worker_error_param(w)),
                WorkerError::QueueFull { .. } => Status::resource_exhausted(message),
                WorkerError::EngineStopped => Status::unavailable(message),
                _ => Status::internal(message),
            },
            ServiceError::Internal(_) | ServiceError::Transport(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn param_of(status: &Status) -> Option<&str> {
        status.metadata().get(PARAM_METADATA_KEY).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn invalid_parameters_become_invalid_argument_naming_the_parameter() {
        let status = Status::from(ServiceError::from(WorkerError::invalid("top_p", "must be in (0, 1]")));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(param_of(&status), Some("top_p"));
        assert!(status.message().contains("must be in (0, 1]"), "{}", status.message());

        let too_long = WorkerError::ContextTooLong { prompt_tokens: 10, max_tokens: 2000, max_model_len: 1024 };
        let status = Status::from(ServiceError::from(too_long));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(param_of(&status), Some("max_tokens"));
    }

    #[test]
    fn engine_conditions_map_to_their_codes() {
        let cases = [
            (ServiceError::from(WorkerError::QueueFull { capacity: 4 }), Code::ResourceExhausted),
            (ServiceError::from(WorkerError::EngineStopped), Code::Unavailable),
            (ServiceError::ReplicaNotFound { replica_id: "r".into() }, Code::NotFound),
            (ServiceError::ReplicaUnavailable { replica_id: "r".into(), state: "starting" }, Code::Unavailable),
            (ServiceError::from(WorkerError::Engine("boom".into())), Code::Internal),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{}", status.message());
            assert_eq!(param_of(&status), None);
        }
    }

    #[test]
    fn a_failed_load_keeps_the_loaders_error_text() {
        let source = Arc::new(WorkerError::model_file("/nope.gguf", "no such file"));
        let status = Status::from(ServiceError::LoadFailed { replica_id: "r1".into(), source });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("/nope.gguf: no such file"), "{}", status.message());
    }
}
