//! The head <-> worker gRPC protocol (`proto/lumen.proto`), compiled with tonic/prost.
//!
//! Workers call [`v1::head_client::HeadClient`] to register and stream heartbeats; the head
//! calls [`v1::worker_client::WorkerClient`] to place replicas and run requests. [`metrics`]
//! turns the replica stats both sides exchange into vLLM's Prometheus series. [`tls`] loads the
//! PEM certificates every TLS listener and client of Lumen uses. [`otel`] exports OpenTelemetry
//! traces and carries their W3C context across both hops. [`speculative`] is vLLM's
//! `speculative_config`, which the head checks and the worker runs.

/// Bumped whenever a message or service changes incompatibly; checked at registration.
pub const PROTOCOL_VERSION: u32 = 1;

/// The generated messages, clients and servers of package `lumen.v1`.
pub mod v1 {
    tonic::include_proto!("lumen.v1");
}

pub mod metrics;
pub mod otel;
pub mod otel_grpc;
pub mod speculative;
pub mod tls;
