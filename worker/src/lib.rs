//! lumen-worker: the engine that runs a Llama-architecture model on one device.
//!
//! Data flows `engine` (request intake, step loop, outputs) -> `scheduler` (which sequences run
//! this step, how many tokens each) -> `kv_cache` (paged blocks, prefix cache) -> `model`
//! (packed-batch Llama forward) -> `kernels` (CPU SIMD / CUDA) -> `sampling` -> `tokenizer`
//! (incremental detokenizing, stop strings). Nothing here knows about HTTP.

pub mod engine;
pub mod error;
pub mod grammar;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod spec;
mod splitmix;
pub mod tokenizer;
pub mod tp;

/// A token id in the model's vocabulary.
pub type TokenId = u32;

pub use error::{Result, WorkerError};
