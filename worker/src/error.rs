//! The worker's error type: one enum, structured variants that carry what explains the failure.

use std::path::PathBuf;

/// Errors raised while loading models, tokenizing, validating requests or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    #[error("model config: {0}")]
    ModelConfig(String),

    /// A config or GGUF metadata key whose value changes the forward pass in a way Lumen does not
    /// implement (or that it cannot read): refused at load, never ignored.
    #[error("model config: `{key}` = {value} is not supported: {reason}")]
    UnsupportedConfig { key: String, value: String, reason: String },

    /// Two spellings of one setting (an older and a newer transformers key) that disagree.
    #[error(
        "model config: `{first}` = {first_value} and `{second}` = {second_value} disagree (transformers versions \
         would read different values); keep only one of them"
    )]
    ConflictingConfig { first: String, first_value: String, second: String, second_value: String },

    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid parameter `{param}`: {reason}")]
    InvalidParameter { param: &'static str, reason: String },

    #[error("prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds max_model_len {max_model_len}")]
    ContextTooLong { prompt_tokens: usize, max_tokens: usize, max_model_len: usize },

    #[error("engine: {0}")]
    Engine(String),

    #[error("the engine's queue is full ({capacity} commands waiting)")]
    QueueFull { capacity: usize },

    #[error("the engine has stopped")]
    EngineStopped,

    #[error("hub: {0}")]
    Hub(String),

    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl WorkerError {
    /// An invalid request parameter, named as the API names it.
    pub fn invalid(param: &'static str, reason: impl Into<String>) -> Self {
        WorkerError::InvalidParameter { param, reason: reason.into() }
    }

    /// A problem with a model file, naming the file.
    pub fn model_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        WorkerError::ModelFile { path: path.into(), reason: reason.into() }
    }

    /// A problem with one named tensor.
    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        WorkerError::Tensor { name: name.into(), reason: reason.into() }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
