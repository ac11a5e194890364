//! The replica health check behind `Worker.CheckHealth`.
//!
//! A replica is healthy when its engine actor answers a stats query within the stall timeout and
//! its engine makes progress: while it has running or waiting requests, it must have finished a
//! step within the stall timeout. The engine thread publishes its stats after every step (and
//! when it wakes up with new work), so a thread stuck inside a step leaves a busy snapshot that
//! keeps ageing ([`EngineStats::stalled_at`]); an idle engine is healthy however long it idles.

use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;

use super::convert::wire_u32;
use super::node::Replica;
use crate::engine::EngineStats;

/// The stall timeout when the head sends none (Ray's default `health_check_timeout_s`).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The stall timeout a `CheckHealthRequest` asks for.
pub fn stall_timeout(request: &pb::CheckHealthRequest) -> Duration {
    match request.stall_timeout_ms {
        0 => DEFAULT_STALL_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    }
}

/// Probes `replica`: asks its engine actor for stats (bounded by `stall_timeout`) and judges them.
pub async fn check_replica(replica: &Replica, stall_timeout: Duration) -> pb::CheckHealthReply {
    match tokio::time::timeout(stall_timeout, replica.handle().stats()).await {
        Err(_) => unhealthy(format!("the engine actor did not answer within {} ms", stall_timeout.as_millis())),
        Ok(Err(e)) => unhealthy(format!("the engine does not answer: {e}")),
        Ok(Ok(stats)) => assess(&stats, Instant::now(), stall_timeout),
    }
}

/// Judges an engine from its latest stats at `now`.
pub fn assess(stats: &EngineStats, now: Instant, stall_timeout: Duration) -> pb::CheckHealthReply {
    let stalled = stats.stalled_at(now);
    let mut reply = pb::CheckHealthReply {
        healthy: true,
        message: String::new(),
        steps_total: stats.steps_total,
        stalled_for_ms: u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX),
        running: wire_u32(stats.running),
        waiting: wire_u32(stats.waiting),
    };
    if stalled >= stall_timeout {
        reply.healthy = false;
        reply.message = format!(
            "the engine is stuck: {} running and {} waiting requests, no step finished for {} ms \
             (limit {} ms, {} steps so far)",
            stats.running,
            stats.waiting,
            stalled.as_millis(),
            stall_timeout.as_millis(),
            stats.steps_total
        );
    }
    reply
}

fn unhealthy(message: String) -> pb::CheckHealthReply {
    pb::CheckHealthReply { healthy: false, message, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(2);

    fn stats(running: usize, waiting: usize, stalled_for: Duration, taken_at: Instant) -> EngineStats {
        EngineStats { running, waiting, steps_total: 7, stalled_for, taken_at: Some(taken_at), ..Default::default() }
    }

    #[test]
    fn a_busy_engine_that_keeps_stepping_is_healthy() {
        let now = Instant::now();
        let reply = assess(&stats(3, 1, Duration::from_millis(5), now), now + Duration::from_millis(100), LIMIT);
        assert!(reply.healthy, "{}", reply.message);
        assert_eq!((reply.running, reply.waiting, reply.steps_total), (3, 1, 7));
    }

    #[test]
    fn an_idle_engine_is_healthy_however_old_its_last_step() {
        let long_ago = Instant::now();
        let reply = assess(&stats(0, 0, Duration::ZERO, long_ago), long_ago + Duration::from_secs(3600), LIMIT);
        assert!(reply.healthy);
        assert_eq!(reply.stalled_for_ms, 0);
    }

    #[test]
    fn a_busy_engine_whose_snapshot_stopped_changing_is_stuck() {
        let taken = Instant::now();
        let reply = assess(&stats(0, 2, Duration::ZERO, taken), taken + Duration::from_secs(3), LIMIT);
        assert!(!reply.healthy);
        assert_eq!(reply.stalled_for_ms, 3000);
        assert!(reply.message.contains("stuck") && reply.message.contains("2 waiting"), "{}", reply.message);
    }

    #[test]
    fn zero_stall_timeout_means_the_default() {
        let request = pb::CheckHealthRequest { replica_id: "r".into(), stall_timeout_ms: 0 };
        assert_eq!(stall_timeout(&request), DEFAULT_STALL_TIMEOUT);
        let request = pb::CheckHealthRequest { replica_id: "r".into(), stall_timeout_ms: 1500 };
        assert_eq!(stall_timeout(&request), Duration::from_millis(1500));
    }
}
