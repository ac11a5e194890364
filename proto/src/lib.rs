//! The head <-> worker gRPC protocol.
//!
//! The `.proto` definitions and their tonic/prost bindings land with the head/API work
//! (registration, heartbeats, replica start/stop, streaming `Generate`, `Abort`).
