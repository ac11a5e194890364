//! What surrounds every route of the API: API keys ([`auth`], the key table in [`keys`], their
//! limits in [`limits`], what each tenant used in [`usage`]), every failure and its one mapping
//! to HTTP ([`errors`]), the request metrics middleware ([`metrics`]), the request log's
//! middleware ([`trace`]) and the request's OpenTelemetry span it owns ([`otel`]), and the small routes (`/v1/models`, `/health`, `/version`,
//! `/metrics`, `/tokenize`, `/detokenize`, the fallback: [`misc`]).

pub mod auth;
pub mod errors;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod misc;
pub mod otel;
pub mod trace;
pub mod usage;
