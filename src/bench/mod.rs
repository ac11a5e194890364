//! `lumen bench`: benchmark programs that print tables and write JSON.

pub mod offline;
pub mod report;
