//! Lumen's head: the deployment registry, the controller, the router, the OpenAI-compatible API
//! on port 8000 and the control API plus dashboard on port 8265.
//!
//! Layering: `api` (HTTP, OpenAI shapes; knows nothing of gRPC) -> [`backend::Backend`] ->
//! `cluster` (workers, replicas, routing; speaks `lumen-proto` gRPC).

pub mod api;
pub mod backend;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod observe;
pub mod plan;
pub mod secret;
pub mod state_store;
