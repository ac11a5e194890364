//! What the dashboard shows over time, kept by the head: the recent-request log
//! ([`request_log`], filled by the API through `api::edge::trace`) and the time series of cluster load and
//! latency ([`history`], sampled from cluster snapshots and the log). The control server serves
//! both as JSON (`GET /api/requests`, `GET /api/timeseries`).
//!
//! Prompt text is kept only when the API was configured with `log_requests`
//! (`--log-requests`); otherwise it is never stored nor logged.

pub mod history;
pub mod request_log;

pub use history::{History, Sample, Sampler, run_sampler};
pub use request_log::{RequestLog, RequestRecord};
