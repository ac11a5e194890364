//! Admission control per model: at most `max_in_flight` requests run at once, at most
//! `max_queued` more wait in FIFO order, and anything beyond is refused at once (429).
//!
//! Entering is synchronous (the caller learns "run now", "wait" or "full" before it answers), so a
//! streaming response can start its SSE body immediately and wait for its turn inside the stream.
//! A [`Permit`] is held for the whole life of a request (until its event stream is dropped); a
//! [`Queued`] ticket that is dropped (client gone) leaves the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::edge::errors::ApiError;
use crate::api::edge::limits::Lease;

/// How many requests of one model may run and wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionLimits {
    /// Requests sent to the backend at once.
    pub max_in_flight: usize,
    /// Requests waiting for one of those slots; beyond this the API answers 429.
    pub max_queued: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits { max_in_flight: 256, max_queued: 1024 }
    }
}

struct Gate {
    limits: AdmissionLimits,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// The gates of all models.
#[derive(Default)]
pub struct Admission {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

/// The right to run one request; frees its slot when dropped.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// A place in a model's queue; leaves the queue when dropped.
pub struct Queued {
    gate: Arc<Gate>,
}

/// The outcome of [`Admission::enter`] when the request is not refused.
pub enum Ticket {
    Ready(Permit),
    Queued(Queued),
}

/// A request let in: its key's [`Lease`] (limits) and its place at the model's gate.
pub struct Entry {
    pub ticket: Ticket,
    pub lease: Lease,
}

impl Admission {
    /// Takes a slot for `model` if one is free, else a place in its queue, else refuses (429).
    /// `limits` applies when the model's gate is first created or the limits changed.
    pub fn enter(&self, model: &str, limits: AdmissionLimits) -> Result<Ticket, ApiError> {
        let gate = self.gate(model, limits);
        if let Ok(slot) = gate.slots.clone().try_acquire_owned() {
            return Ok(Ticket::Ready(Permit { _slot: slot }));
        }
        let queued = gate.waiting.fetch_add(1, Ordering::SeqCst);
        let ticket = Queued { gate: gate.clone() };
        if queued >= gate.limits.max_queued {
            drop(ticket);
            return Err(ApiError::Overloaded(format!(
                "the queue for model `{model}` is full ({} running, {} waiting); retry later",
                gate.limits.max_in_flight, gate.limits.max_queued
            )));
        }
        Ok(Ticket::Queued(ticket))
    }

    /// Requests of `model` waiting for a slot now.
    pub fn waiting(&self, model: &str) -> usize {
        self.lock().get(model).map_or(0, |g| g.waiting.load(Ordering::SeqCst))
    }

    fn gate(&self, model: &str, limits: AdmissionLimits) -> Arc<Gate> {
        let mut gates = self.lock();
        match gates.get(model) {
            Some(gate) if gate.limits == limits => gate.clone(),
            // New limits take a new gate; requests of the old one finish under the old limits.
            _ => {
                let gate = Arc::new(Gate {
                    limits,
                    slots: Arc::new(Semaphore::new(limits.max_in_flight.min(Semaphore::MAX_PERMITS))),
                    waiting: AtomicUsize::new(0),
                });
                gates.insert(model.to_string(), gate.clone());
                gate
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Gate>>> {
        // A panic while holding this lock cannot leave the map inconsistent: keep serving.
        self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Queued {
    /// Waits for a slot, in arrival order.
    pub async fn admitted(self) -> Result<Permit, ApiError> {
        let slot = self.gate.slots.clone().acquire_owned().await;
        drop(self);
        slot.map(|slot| Permit { _slot: slot }).map_err(|_| ApiError::Unavailable("admission closed".into()))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticket {
    /// Waits (if queued) until the request may run.
    pub async fn admitted(self) -> Result<Permit, ApiError> {
        match self {
            Ticket::Ready(permit) => Ok(permit),
            Ticket::Queued(queued) => queued.admitted().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AdmissionLimits = AdmissionLimits { max_in_flight: 1, max_queued: 1 };

    #[tokio::test]
    async fn refuses_beyond_running_plus_queued() {
        let admission = Admission::default();
        let first = admission.enter("m", LIMITS).unwrap();
        assert!(matches!(first, Ticket::Ready(_)));
        let second = admission.enter("m", LIMITS).unwrap();
        assert!(matches!(second, Ticket::Queued(_)));
        assert!(matches!(admission.enter("m", LIMITS), Err(ApiError::Overloaded(_))));
        assert_eq!(admission.waiting("m"), 1);
        // Another model has its own gate.
        assert!(matches!(admission.enter("other", LIMITS), Ok(Ticket::Ready(_))));
    }

    #[tokio::test]
    async fn a_queued_request_runs_when_a_slot_frees() {
        let admission = Admission::default();
        let first = admission.enter("m", LIMITS).unwrap().admitted().await.unwrap();
        let second = admission.enter("m", LIMITS).unwrap();
        let waiter = tokio::spawn(second.admitted());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(admission.waiting("m"), 0);
    }

    #[tokio::test]
    async fn a_dropped_ticket_leaves_the_queue() {
        let admission = Admission::default();
        let _running = admission.enter("m", LIMITS).unwrap();
        let queued = admission.enter("m", LIMITS).unwrap();
        drop(queued);
        assert_eq!(admission.waiting("m"), 0);
        assert!(matches!(admission.enter("m", LIMITS), Ok(Ticket::Queued(_))));
    }

    #[tokio::test]
    async fn zero_queue_refuses_as_soon_as_slots_are_taken() {
        let admission = Admission::default();
        let limits = AdmissionLimits { max_in_flight: 2, max_queued: 0 };
        let _a = admission.enter("m", limits).unwrap();
        let _b = admission.enter("m", limits).unwrap();
        assert!(admission.enter("m", limits).is_err());
    }
}
