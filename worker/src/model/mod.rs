//! The model: hyper-parameters, weight sources (GGUF, Hugging Face safetensors, hub, dummy) and
//! the Llama forward pass over a packed batch.

pub mod config;
pub mod dummy;
pub mod generation_config;
pub mod hub;
pub mod location;
pub mod safetensors;
pub mod source;

pub use config::{LlamaConfig, RopeScaling};
pub use dummy::DummySource;
pub use generation_config::GenerationConfig;
pub use hub::{HubFileSet, HubModelId, HubSettings};
pub use location::{LoadFormat, ModelLocation, resolve_model};
pub use safetensors::SafetensorsSource;
pub use source::{RawTensor, TensorBytes, TensorDType, TensorSource};
