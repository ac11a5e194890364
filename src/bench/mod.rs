//! `lumen bench`: benchmark programs that print tables and write JSON.

pub mod datasets;
pub mod head;
pub mod offline;
mod procs;
pub mod report;
pub mod serve;
pub mod soak;
mod sse;
pub mod structured;
pub mod tenants;
mod workload;
