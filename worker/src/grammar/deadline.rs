//! Deadlines on llguidance's work: a compilation or one mask computation that runs past its
//! time is cancelled, so no grammar can hold a thread (or the engine) forever.
//!
//! llguidance bounds most of its work with fuel, but not all of it: a grammar whose only way on
//! is an endless run of forced bytes (a rule that can never finish, behind a lexeme that can
//! always grow: `start: /b*/ x` with `x: x`) loops in its forced-byte search while its memory
//! grows. Its matchers take a cooperative cancellation request, checked inside those loops; this
//! module is who makes it.
//!
//! Invariants:
//! - One process-wide watchdog thread, started on first use, sleeps until the earliest deadline
//!   and cancels every handle whose deadline passed. Registering costs a lock and a map insert.
//! - A [`Deadline`] guard deregisters its handle when dropped: work that finished in time is
//!   never cancelled later, so a matcher that is reused (the next step's mask) is not poisoned.
//! - Cancellation is permanent for the matcher it reaches: its next operation fails with
//!   [`llguidance::Cancelled`] and `Matcher::is_cancelled` says so; callers report it as the
//!   constraint running out of time.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::CancellationHandle;

/// The process's watchdog: pending deadlines by (instant, registration number).
struct Watchdog {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    next_id: u64,
    by_deadline: BTreeMap<(Instant, u64), CancellationHandle>,
    started: bool,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| Watchdog { pending: Mutex::new(Pending::default()), wake: Condvar::new() })
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut pending = self.lock();
        loop {
            let now = Instant::now();
            while let Some(entry) = pending.by_deadline.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                entry.remove().cancel();
            }
            let wait = pending.by_deadline.keys().next().map(|(at, _)| at.saturating_duration_since(now));
            pending = match wait {
                Some(wait) => self.wake.wait_timeout(pending, wait).unwrap_or_else(|p| p.into_inner()).0,
                None => self.wake.wait(pending).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// A registered deadline; dropping it withdraws the cancellation.
#[must_use = "the deadline is withdrawn when the guard is dropped"]
pub struct Deadline {
    key: Option<(Instant, u64)>,
}

impl Deadline {
    /// Cancels `handle` once `timeout` has passed, unless the guard is dropped first. With no
    /// handle (a matcher already in an error state) nothing is registered.
    pub fn arm(handle: Option<CancellationHandle>, timeout: Duration) -> Deadline {
        let Some(handle) = handle else { return Deadline { key: None } };
        let dog = watchdog();
        let mut pending = dog.lock();
        if !pending.started {
            let spawned = std::thread::Builder::new().name("lumen-grammar-deadline".into()).spawn(|| watchdog().run());
            match spawned {
                Ok(_) => pending.started = true,
                Err(e) => {
                    // Without the thread nothing is cancelled: the fuel limits still apply.
                    tracing::warn!(error = %e, "cannot start the grammar deadline thread");
                    return Deadline { key: None };
                }
            }
        }
        pending.next_id += 1;
        let key = (Instant::now() + timeout, pending.next_id);
        let earliest = pending.by_deadline.keys().next().is_none_or(|first| key < *first);
        pending.by_deadline.insert(key, handle);
        drop(pending);
        if earliest {
            dog.wake.notify_one();
        }
        Deadline { key: Some(key) }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            watchdog().lock().by_deadline.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_cancels_after_its_time_and_a_dropped_one_never_does() {
        let late = CancellationHandle::default();
        let kept = CancellationHandle::default();
        let _armed = Deadline::arm(Some(late.clone()), Duration::from_millis(20));
        drop(Deadline::arm(Some(kept.clone()), Duration::from_millis(10)));
        let far = CancellationHandle::default();
        let _far = Deadline::arm(Some(far.clone()), Duration::from_secs(3600));
        let until = Instant::now() + Duration::from_secs(10);
        while !late.is_cancelled() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(late.is_cancelled(), "an expired deadline cancels its handle");
        std::thread::sleep(Duration::from_millis(30));
        assert!(!kept.is_cancelled(), "a withdrawn deadline never cancels");
        assert!(!far.is_cancelled(), "a deadline not yet reached does not cancel");
    }
}
