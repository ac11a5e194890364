//! Wall-clock time since the Unix epoch, for the timestamps the APIs report (`created`,
//! `last_deployed_time_s`, registration and heartbeat times). Durations and deadlines use
//! `Instant`, never this.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch (zero if the clock is set before it).
pub fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Whole Unix seconds now.
pub fn unix_s() -> u64 {
    since_epoch().as_secs()
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}
