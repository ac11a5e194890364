//! The model: hyper-parameters, weight sources (GGUF, Hugging Face safetensors, hub, dummy) and
//! the Llama forward pass over a packed batch.

pub mod config;
pub mod source;

pub use config::{LlamaConfig, RopeScaling};
pub use source::{RawTensor, TensorBytes, TensorDType, TensorSource};
