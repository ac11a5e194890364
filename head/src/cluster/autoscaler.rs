//! The per-deployment autoscaler (a deployment's `autoscaling_config`), pure decision logic.
//!
//! Contract, following Ray Serve's default policy:
//! - The load signal is the deployment's ongoing requests: the head's in-flight requests on its
//!   replicas plus the requests the workers report waiting in their engines' queues, sampled by
//!   the controller on every pass and averaged over a short look-back window
//!   ([`MAX_LOOK_BACK`], never longer than `upscale_delay_s` so a deliberately quick upscale is
//!   not slowed by the average).
//! - desired = ceil(average / `target_ongoing_requests`), clamped to [`min_replicas`,
//!   `max_replicas`].
//! - The target moves up only after desired stayed above it for `upscale_delay_s`, and down only
//!   after desired stayed below it for `downscale_delay_s`; when desired comes back to the
//!   target (or crosses to the other side) the waiting starts over. It then moves to the latest
//!   desired count. A target outside the bounds (the config changed) is clamped at once.
//! - From zero replicas the move up is immediate: requests waiting at the head for a replica
//!   count as load (see `registry::State::ongoing_requests`), and nothing else would serve them.
//! - Every decision is logged at `info` with its reason: current target, desired count, average
//!   load; so is the start of a wait.
//!
//! The autoscaler only decides a number; placement (and waiting for capacity) is the
//! controller's, and a scale-down drains the chosen replica (see `controller`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::AutoscalingConfig;

/// The longest window the load is averaged over.
pub const MAX_LOOK_BACK: Duration = Duration::from_secs(10);

/// Which way a deployment's target moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDirection {
    Up,
    Down,
}

/// A scale decision waiting for its delay.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pending {
    direction: ScaleDirection,
    since: Instant,
}

/// One deployment's autoscaler state: recent load samples and a pending decision.
#[derive(Debug)]
pub struct Autoscaler {
    deployment: String,
    config: AutoscalingConfig,
    samples: VecDeque<(Instant, f64)>,
    pending: Option<Pending>,
}

impl Autoscaler {
    pub fn new(deployment: &str, config: AutoscalingConfig) -> Self {
        Autoscaler { deployment: deployment.to_owned(), config, samples: VecDeque::new(), pending: None }
    }

    /// Takes a new config (a redeploy); the load history stays, a pending decision starts over.
    pub fn reconfigure(&mut self, config: AutoscalingConfig) {
        if self.config != config {
            self.config = config;
            self.pending = None;
        }
    }

    /// `replicas` within [`min_replicas`, `max_replicas`].
    pub fn clamp(&self, replicas: u32) -> u32 {
        let min = self.config.min_replicas;
        replicas.clamp(min, self.config.max_replicas.max(min))
    }

    fn look_back(&self) -> Duration {
        MAX_LOOK_BACK.min(seconds(self.config.upscale_delay_s))
    }

    /// Records the deployment's ongoing requests at `now`.
    pub fn observe(&mut self, now: Instant, ongoing: f64) {
        self.samples.push_back((now, ongoing.max(0.0)));
        let window = self.look_back();
        // Keep the newest sample whatever the window, so a zero window means "the latest".
        while self.samples.len() > 1
            && self.samples.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) > window)
        {
            self.samples.pop_front();
        }
    }

    /// The average ongoing requests over the look-back window (0 with no samples).
    pub fn average_load(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().map(|&(_, load)| load).sum::<f64>() / self.samples.len() as f64
    }

    /// Replicas the average load asks for, within bounds.
    pub fn desired(&self) -> u32 {
        let per_replica = self.config.target_ongoing_requests;
        let per_replica = if per_replica.is_finite() && per_replica > 0.0 { per_replica } else { 1.0 };
        let wanted = (self.average_load() / per_replica).ceil();
        self.clamp(if wanted >= f64::from(u32::MAX) { u32::MAX } else { wanted as u32 })
    }

    /// The target after this pass, given the `current` one; logs every decision.
    pub fn decide(&mut self, now: Instant, current: u32) -> u32 {
        let average = self.average_load();
        let desired = self.desired();
        let clamped = self.clamp(current);
        if clamped != current {
            self.pending = None;
            tracing::info!(deployment = %self.deployment, current, desired = clamped, average_load = average,
                "autoscaler: target outside [min_replicas, max_replicas]; clamped");
            return clamped;
        }
        let direction = match desired.cmp(&current) {
            std::cmp::Ordering::Equal => {
                if let Some(pending) = self.pending.take() {
                    tracing::info!(deployment = %self.deployment, current, desired, average_load = average,
                        direction = ?pending.direction, "autoscaler: load returned to the target; not scaling");
                }
                return current;
            }
            std::cmp::Ordering::Greater => ScaleDirection::Up,
            std::cmp::Ordering::Less => ScaleDirection::Down,
        };
        let delay = match direction {
            // From zero nothing serves the waiting requests: scale up at once, as Ray does.
            ScaleDirection::Up if current == 0 => Duration::ZERO,
            ScaleDirection::Up => seconds(self.config.upscale_delay_s),
            ScaleDirection::Down => seconds(self.config.downscale_delay_s),
        };
        let since = match self.pending {
            Some(p) if p.direction == direction => p.since,
            _ => {
                tracing::info!(deployment = %self.deployment, current, desired, average_load = average,
                    ?direction, delay_s = delay.as_secs_f64(), "autoscaler: load asks for a new target; waiting for the delay");
                self.pending = Some(Pending { direction, since: now });
                now
            }
        };
        if now.saturating_duration_since(since) < delay {
            return current;
        }
        self.pending = None;
        tracing::info!(deployment = %self.deployment, current, desired, average_load = average, ?direction,
            held_s = now.saturating_duration_since(since).as_secs_f64(), "autoscaler: scaling");
        desired
    }
}

/// Seconds from the config as a duration (negative or invalid values mean zero).
fn seconds(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 { Duration::from_secs_f64(value.min(1e9)) } else { Duration::ZERO }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: u32, max: u32, target: f64, up_s: f64, down_s: f64) -> AutoscalingConfig {
        AutoscalingConfig {
            min_replicas: min,
            initial_replicas: None,
            max_replicas: max,
            target_ongoing_requests: target,
            upscale_delay_s: up_s,
            downscale_delay_s: down_s,
            ..AutoscalingConfig::default()
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn desired_is_the_ceiling_of_load_over_target_within_bounds() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(1, 5, 4.0, 0.0, 0.0));
        for (i, (load, desired)) in [(0.0, 1), (4.0, 1), (4.5, 2), (12.0, 3), (100.0, 5)].into_iter().enumerate() {
            // A zero upscale delay makes the window zero: each sample replaces the last.
            a.observe(t0 + secs(i as f64), load);
            assert_eq!(a.desired(), desired, "load {load}");
        }
    }

    #[test]
    fn load_is_averaged_over_the_look_back_window() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(1, 10, 1.0, 5.0, 0.0));
        a.observe(t0, 2.0);
        a.observe(t0 + secs(1.0), 4.0);
        assert_eq!(a.average_load(), 3.0);
        // Five seconds later the first two samples are outside the 5 s window.
        a.observe(t0 + secs(6.5), 9.0);
        assert_eq!(a.average_load(), 9.0);
    }

    #[test]
    fn scales_up_only_after_the_demand_held_for_the_upscale_delay() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(1, 4, 1.0, 2.0, 60.0));
        a.observe(t0, 3.0);
        assert_eq!(a.decide(t0, 1), 1, "the demand just appeared");
        a.observe(t0 + secs(1.0), 3.0);
        assert_eq!(a.decide(t0 + secs(1.0), 1), 1, "held for 1 s of 2");
        a.observe(t0 + secs(2.5), 3.0);
        assert_eq!(a.decide(t0 + secs(2.5), 1), 3);
    }

    #[test]
    fn a_dip_in_demand_restarts_the_wait() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(1, 4, 1.0, 0.0, 2.0));
        a.observe(t0, 0.0);
        assert_eq!(a.decide(t0, 3), 3, "downscale wait starts");
        a.observe(t0 + secs(1.5), 3.0);
        assert_eq!(a.decide(t0 + secs(1.5), 3), 3, "demand is back at the target: the wait is cancelled");
        a.observe(t0 + secs(2.5), 0.0);
        assert_eq!(a.decide(t0 + secs(2.5), 3), 3, "a new wait starts, the old one does not count");
        a.observe(t0 + secs(4.0), 0.0);
        assert_eq!(a.decide(t0 + secs(4.0), 3), 3);
        a.observe(t0 + secs(4.6), 0.0);
        assert_eq!(a.decide(t0 + secs(4.6), 3), 1, "held for 2.1 s");
    }

    #[test]
    fn scale_down_stops_at_min_replicas_and_up_at_max() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(2, 3, 1.0, 0.0, 0.0));
        a.observe(t0, 0.0);
        assert_eq!(a.decide(t0, 3), 2);
        a.observe(t0 + secs(1.0), 50.0);
        assert_eq!(a.decide(t0 + secs(1.0), 2), 3);
    }

    #[test]
    fn scales_up_from_zero_at_once_but_down_to_zero_only_after_the_delay() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(0, 4, 2.0, 30.0, 60.0));
        a.observe(t0, 0.0);
        assert_eq!(a.decide(t0, 0), 0, "no load, no replica");
        a.observe(t0 + secs(1.0), 3.0);
        assert_eq!(a.decide(t0 + secs(1.0), 0), 1, "a waiting request brings one up without the 30 s delay");
        a.observe(t0 + secs(2.0), 9.0);
        assert_eq!(a.decide(t0 + secs(2.0), 1), 1, "above zero the upscale delay applies again");
        // The load stops; the burst leaves the 10 s look-back at 13 s, then the 60 s wait runs.
        let first_zero = (3..100)
            .find(|&s| {
                let t = t0 + secs(f64::from(s));
                a.observe(t, 0.0);
                a.decide(t, 1) == 0
            })
            .unwrap();
        assert_eq!(first_zero, 73);
    }

    #[test]
    fn a_target_outside_new_bounds_is_clamped_at_once() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new("d", config(1, 8, 1.0, 30.0, 600.0));
        a.observe(t0, 8.0);
        a.reconfigure(config(1, 4, 1.0, 30.0, 600.0));
        assert_eq!(a.decide(t0, 8), 4);
        assert_eq!(a.clamp(0), 1);
    }
}
