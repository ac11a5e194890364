//! Running an admitted API request, shared by every endpoint family: admission per model
//! ([`admission`], releasing waiting requests fairly across tenants: [`fair_queue`]), the backend streams of one request ([`dispatch`]), moving a stream to another
//! replica when its own fails ([`migration`]), driving a streaming response ([`stream`]) as
//! server-sent events ([`sse`]), and the log-probability shapes of the output ([`logprobs`]).

pub mod admission;
pub mod dispatch;
pub mod fair_queue;
pub mod logprobs;
pub mod migration;
pub mod sse;
pub mod stream;
