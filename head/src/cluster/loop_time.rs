//! What the head's own loops cost, as Prometheus histograms on the head's `/metrics`:
//!
//! - `lumen_head_reconcile_duration_seconds`: one controller pass's planning (waiting for the
//!   state lock included), which grows with the cluster: the pass visits every worker, deployment
//!   and replica.
//! - `lumen_head_heartbeat_duration_seconds`: applying one worker heartbeat to the state (lock
//!   wait included), which grows with the replicas the heartbeat reports.
//!
//! Invariant: both are observed after the state lock is released, so measuring never lengthens
//! the time the lock is held. `lumen bench head` reads them to show what N workers cost.

use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts};

const RECONCILE: &str = "lumen_head_reconcile_duration_seconds";
const HEARTBEAT: &str = "lumen_head_heartbeat_duration_seconds";

/// Upper bounds from 1 µs to 1 s.
const BUCKETS: [f64; 19] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];

/// The head's loop timings (see the module docs).
pub struct LoopTimes {
    reconcile: Histogram,
    heartbeat: Histogram,
}

impl Default for LoopTimes {
    fn default() -> LoopTimes {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
                .expect("a valid histogram definition")
        };
        LoopTimes {
            reconcile: histogram(
                RECONCILE,
                "Time of one controller pass's planning under the state lock, lock wait included.",
            ),
            heartbeat: histogram(
                HEARTBEAT,
                "Time to apply one worker heartbeat to the head's state, lock wait included.",
            ),
        }
    }
}

impl LoopTimes {
    pub fn reconciled(&self, started: Instant) {
        self.reconcile.observe(started.elapsed().as_secs_f64());
    }

    pub fn heartbeat_applied(&self, started: Instant) {
        self.heartbeat.observe(started.elapsed().as_secs_f64());
    }

    pub fn descs(&self) -> Vec<&Desc> {
        self.reconcile.desc().into_iter().chain(self.heartbeat.desc()).collect()
    }

    pub fn collect(&self) -> Vec<MetricFamily> {
        self.reconcile.collect().into_iter().chain(self.heartbeat.collect()).collect()
    }
}
