//! The engine: a dedicated thread per device running the step loop ([`core`], [`runner`]),
//! behind a ractor actor ([`actor`]) that callers reach through an [`EngineHandle`].

pub mod actor;
pub mod core;
pub mod phases;
pub mod request;
pub mod runner;
pub mod simulated;
pub mod stats;
pub mod step_cost;

pub use actor::{EngineHandle, RequestStream};
pub use core::{CoreConfig, EngineCore};
pub use request::{
    ChoiceDelta, EngineEvent, EngineLimits, EngineRequest, FinishReason, PromptLogprobs, RequestTimings, ResumedChoice,
    StopReason, TokenLogprob, Usage,
};
pub use stats::EngineStats;
pub mod load;
mod load_draft;
pub mod options;
pub mod pooling;

pub use load::build_engine;
pub use options::EngineOptions;
pub use pooling::{PoolingParams, PoolingType};
