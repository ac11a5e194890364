//! Admission control per model: at most `max_in_flight` requests run at once, at most
//! `max_queued` more wait, and anything beyond is refused at once (429). Waiting requests are
//! released in the order of a [`FairQueue`]: under [`QueuePolicy::Fair`] weighted fair across
//! tenants and by priority within one; under [`QueuePolicy::Fcfs`] in arrival order.
//!
//! Entering is synchronous (the caller learns "run now", "wait" or "full" before it answers), so a
//! streaming response can start its SSE body immediately and wait for its turn inside the stream.
//! A [`Permit`] is held for the whole life of a request (until its event stream is dropped); a
//! [`Queued`] ticket that is dropped (client gone) leaves the queue.
//!
//! A full queue under the fair policy makes room for a tenant under its weighted share of the
//! places by displacing the newest request of the tenant furthest over it
//! ([`FairQueue::displace_for`]): that request ends with the 429 it would have had arriving
//! now, so one tenant's burst cannot keep every other tenant out of the queue.
//!
//! **Fair headroom** (fair policy): slots free up only as requests end, so one tenant holding
//! every slot would keep another's request waiting for the next end however few it sends. A
//! request whose tenant (a named key's) holds fewer slots per weight than every other tenant holding any
//! therefore runs at once even when every slot is taken, up to [`fair_headroom`] beyond
//! `max_in_flight` (its own earlier waiting requests first: whenever headroom frees, the next
//! waiting request of the tenant furthest under its share takes it, out of the queue's turn); the worker's
//! scheduler, which shares its sequence slots the same way, then preempts the tenant over its
//! share. Under fcfs, and for limits below 8, there is no headroom.
//!
//! Invariants (one lock per gate): `running` counts the permits alive plus the slots handed to
//! queued tickets not yet turned into permits, and `held` the same per tenant; `running` exceeds
//! `max_in_flight` only through the headroom, never by more than it; a slot that frees goes
//! straight to the next waiting request while `running` is below `max_in_flight`, so a request
//! waits only while every slot is taken; a ticket dropped after its slot was handed over passes
//! the slot on, so no slot and no place leaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::fair_queue::{FairQueue, Place, QueuePolicy, Waiter};
use crate::api::edge::errors::ApiError;
use crate::api::edge::limits::Lease;
use crate::backend::fair_headroom;

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
    slots: Mutex<Slots>,
}

struct Slots {
    running: usize,
    /// Slots held per tenant (`""` for requests without one), with the tenant's weight.
    held: HashMap<Arc<str>, (usize, u32)>,
    /// The gate's `max_in_flight`, and what may run with the headroom (the same under fcfs).
    max_in_flight: usize,
    room: usize,
    /// Each waiting request's wake-up: [`Turn::Run`] hands the request a slot.
    waiting: FairQueue<Wake>,
}

/// A waiting request: its tenant (for `held`) and its wake-up.
struct Wake {
    tenant: Arc<str>,
    weight: u32,
    send: oneshot::Sender<Turn>,
}

/// What a waiting request is woken with.
#[derive(Debug)]
enum Turn {
    /// A slot is its own.
    Run,
    /// Its place went to another tenant's request: it is refused (429).
    Displaced,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Every critical section leaves `Slots` consistent before anything that could panic.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Slots {
    /// Counts a slot taken by `tenant`.
    fn take(&mut self, tenant: &Arc<str>, weight: u32) {
        self.running += 1;
        let held = self.held.entry(tenant.clone()).or_insert((0, weight));
        *held = (held.0 + 1, weight);
    }

    /// `tenant`'s slot freed: while fewer than `max_in_flight` run, hand slots to the next
    /// waiting requests; then, under the fair policy, the headroom to waiting tenants under
    /// their share.
    fn release(&mut self, tenant: &str) {
        self.running = self.running.saturating_sub(1);
        if let Some(held) = self.held.get_mut(tenant) {
            held.0 -= 1;
            if held.0 == 0 {
                self.held.remove(tenant);
            }
        }
        while self.running < self.max_in_flight {
            let Some(wake) = self.waiting.pop() else { return };
            // A waiting ticket's receiver lives as long as its place (the ticket leaves the
            // queue under this lock before dropping it), so this send succeeds; if it ever did
            // not, the slot goes to the next one.
            if wake.send.send(Turn::Run).is_ok() {
                self.take(&wake.tenant, wake.weight);
            }
        }
        self.fill_headroom();
    }

    /// Hands the free slots of the headroom to the waiting requests of tenants under their
    /// share, each tenant's next one first.
    fn fill_headroom(&mut self) {
        while self.running < self.room {
            // The tenant furthest under its share first.
            let due = self
                .waiting
                .waiting_tenants()
                .filter(|(t, w)| self.under_share(t, *w))
                .min_by(|(a, wa), (b, wb)| per_weight((self.holding(a), *wa), (self.holding(b), *wb)))
                .map(|(t, _)| t.clone());
            let Some(wake) = due.and_then(|t| self.waiting.pop_tenant(&t)) else { return };
            if wake.send.send(Turn::Run).is_ok() {
                self.take(&wake.tenant, wake.weight);
            }
        }
    }

    /// Whether `tenant` (of `weight`) may take a slot of the headroom: a named tenant (requests
    /// without a key carry none to the router, which grants them no headroom), while some other
    /// tenant holds slots, every one of them more per weight than this one.
    fn under_share(&self, tenant: &str, weight: u32) -> bool {
        if tenant.is_empty() {
            return false;
        }
        let mine = (self.holding(tenant), weight);
        let mut others = self.held.iter().filter(|(t, h)| &***t != tenant && h.0 > 0).peekable();
        others.peek().is_some() && others.all(|(_, &other)| per_weight(mine, other).is_lt())
    }

    /// Slots `tenant` holds.
    fn holding(&self, tenant: &str) -> usize {
        self.held.get(tenant).map_or(0, |h| h.0)
    }
}

/// Compares `a` slots held at weight `wa` with `b` at `wb`, per weight.
fn per_weight((a, wa): (usize, u32), (b, wb): (usize, u32)) -> std::cmp::Ordering {
    (a as u64 * u64::from(wb.max(1))).cmp(&(b as u64 * u64::from(wa.max(1))))
}

/// The gates of all models, and how they release waiting requests.
#[derive(Default)]
pub struct Admission {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    policy: QueuePolicy,
}

/// The right to run one request; frees its slot when dropped.
pub struct Permit {
    gate: Arc<Gate>,
    tenant: Arc<str>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.lock().release(&self.tenant);
    }
}

/// A place in a model's queue; leaves the queue when dropped.
pub struct Queued {
    gate: Arc<Gate>,
    place: Place,
    tenant: Arc<str>,
    wake: Option<oneshot::Receiver<Turn>>,
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
    /// Gates that release waiting requests by `policy`.
    pub fn new(policy: QueuePolicy) -> Self {
        Admission { gates: Mutex::default(), policy }
    }

    /// How waiting requests are released.
    pub fn policy(&self) -> QueuePolicy {
        self.policy
    }

    /// Takes a slot for `model` if one is free, else a place in its queue as `waiter`, else
    /// refuses (429). `limits` applies when the model's gate is first created or the limits
    /// changed.
    pub fn enter(&self, model: &str, limits: AdmissionLimits, waiter: &Waiter) -> Result<Ticket, ApiError> {
        let gate = self.gate(model, limits);
        // Under fcfs every request waits as one anonymous tenant: the queue is a plain FIFO and
        // nobody's place is ever given to another.
        let anonymous;
        let waiter = match self.policy {
            QueuePolicy::Fair => waiter,
            QueuePolicy::Fcfs => {
                anonymous = Waiter { tenant: Arc::from(""), weight: 1, priority: 0 };
                &anonymous
            }
        };
        let mut slots = gate.lock();
        let free = slots.running < limits.max_in_flight && slots.waiting.is_empty();
        // The headroom, unless this tenant's own requests wait (they get it first, below).
        let headroom = slots.running < slots.room
            && !slots.waiting.has_waiting(&waiter.tenant)
            && slots.under_share(&waiter.tenant, waiter.weight);
        if free || headroom {
            slots.take(&waiter.tenant, waiter.weight);
            drop(slots);
            return Ok(Ticket::Ready(Permit { gate, tenant: waiter.tenant.clone() }));
        }
        if slots.waiting.len() >= limits.max_queued {
            let full = || {
                ApiError::Overloaded(format!(
                    "the queue for model `{model}` is full ({} running, {} waiting); retry later",
                    limits.max_in_flight, limits.max_queued
                ))
            };
            // Its ticket learns it was refused; its place is the newcomer's.
            slots.waiting.displace_for(waiter).ok_or_else(full)?.send.send(Turn::Displaced).ok();
        }
        let (send, wake) = oneshot::channel();
        let tenant = waiter.tenant.clone();
        let place = slots.waiting.push(waiter, Wake { tenant: tenant.clone(), weight: waiter.weight, send });
        // A tenant under its share whose earlier requests wait gets the headroom for them.
        slots.fill_headroom();
        drop(slots);
        Ok(Ticket::Queued(Queued { gate, place, tenant, wake: Some(wake) }))
    }

    /// Requests of `model` waiting for a slot now.
    pub fn waiting(&self, model: &str) -> usize {
        self.lock().get(model).map_or(0, |g| g.lock().waiting.len())
    }

    fn gate(&self, model: &str, limits: AdmissionLimits) -> Arc<Gate> {
        let mut gates = self.lock();
        match gates.get(model) {
            Some(gate) if gate.limits == limits => gate.clone(),
            // New limits take a new gate; requests of the old one finish under the old limits.
            _ => {
                let max_in_flight = limits.max_in_flight;
                let room = match self.policy {
                    QueuePolicy::Fair => max_in_flight + fair_headroom(max_in_flight),
                    QueuePolicy::Fcfs => max_in_flight,
                };
                let slots =
                    Slots { running: 0, held: HashMap::new(), max_in_flight, room, waiting: FairQueue::default() };
                let gate = Arc::new(Gate { limits, slots: Mutex::new(slots) });
                gates.insert(model.to_string(), gate.clone());
                gate
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Gate>>> {
        // A panic while holding this lock cannot leave the map inconsistent: keep serving.
        self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Queued {
    /// Waits for a slot, in the queue's order.
    pub async fn admitted(mut self) -> Result<Permit, ApiError> {
        // Dropped while waiting here, the ticket's `Drop` still sees `wake` and leaves the queue.
        let turn = match self.wake.as_mut() {
            Some(wake) => wake.await.ok(),
            None => None,
        };
        // Out of the queue either way: woken, the slot is this request's and its permit frees it.
        self.wake = None;
        match turn {
            Some(Turn::Run) => Ok(Permit { gate: self.gate.clone(), tenant: self.tenant.clone() }),
            Some(Turn::Displaced) => Err(ApiError::Overloaded(
                "the queue is full and this request's place went to a tenant with fewer requests waiting; retry later"
                    .into(),
            )),
            None => Err(ApiError::Unavailable("admission closed".into())),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.wake.is_none() {
            return;
        }
        let mut slots = self.gate.lock();
        if slots.waiting.remove(&self.place).is_none() {
            // Out of the queue already, under this lock: handed a slot (this ticket's to pass
            // on), or displaced (nothing to pass on). Both are sent under the lock, so the
            // message is there.
            let turn = self.wake.take().and_then(|mut wake| wake.try_recv().ok());
            if matches!(turn, Some(Turn::Run)) {
                slots.release(&self.tenant);
            }
        }
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

    fn anyone() -> Waiter {
        tenant("")
    }

    fn tenant(name: &str) -> Waiter {
        Waiter { tenant: Arc::from(name), weight: 1, priority: 0 }
    }

    /// Queues `who` in order behind a held slot, frees slots one by one, and returns who ran in
    /// which order.
    async fn release_order(admission: &Admission, who: &[&str]) -> Vec<String> {
        let limits = AdmissionLimits { max_in_flight: 1, max_queued: 100 };
        let held = admission.enter("m", limits, &anyone()).unwrap();
        let queued: Vec<(String, Ticket)> =
            who.iter().map(|&t| (t.to_string(), admission.enter("m", limits, &tenant(t)).unwrap())).collect();
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        for (name, ticket) in queued {
            let done = done.clone();
            tokio::spawn(async move {
                let permit = ticket.admitted().await.unwrap();
                done.send((name, permit)).unwrap();
            });
        }
        drop(held);
        let mut ran = Vec::new();
        for _ in who {
            // Each request holds the only slot until the next line drops its permit.
            let (name, permit) = order.recv().await.unwrap();
            ran.push(name);
            drop(permit);
        }
        ran
    }

    #[tokio::test]
    async fn refuses_beyond_running_plus_queued() {
        let admission = Admission::default();
        let first = admission.enter("m", LIMITS, &anyone()).unwrap();
        assert!(matches!(first, Ticket::Ready(_)));
        let second = admission.enter("m", LIMITS, &anyone()).unwrap();
        assert!(matches!(second, Ticket::Queued(_)));
        assert!(matches!(admission.enter("m", LIMITS, &anyone()), Err(ApiError::Overloaded(_))));
        assert_eq!(admission.waiting("m"), 1);
        // Another model has its own gate.
        assert!(matches!(admission.enter("other", LIMITS, &anyone()), Ok(Ticket::Ready(_))));
    }

    #[tokio::test]
    async fn a_queued_request_runs_when_a_slot_frees() {
        let admission = Admission::default();
        let first = admission.enter("m", LIMITS, &anyone()).unwrap().admitted().await.unwrap();
        let second = admission.enter("m", LIMITS, &anyone()).unwrap();
        let waiter = tokio::spawn(second.admitted());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(admission.waiting("m"), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_newest_request_of_the_tenant_over_its_share() {
        let limits = AdmissionLimits { max_in_flight: 1, max_queued: 2 };
        let admission = Admission::new(QueuePolicy::Fair);
        let running = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let oldest = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let newest = admission.enter("m", limits, &tenant("heavy")).unwrap();
        assert!(matches!(admission.enter("m", limits, &tenant("heavy")), Err(ApiError::Overloaded(_))));
        let light = admission.enter("m", limits, &tenant("light")).expect("light takes heavy's newest place");
        assert_eq!(admission.waiting("m"), 2);
        let refused = newest.admitted().await.expect_err("displaced");
        assert!(matches!(&refused, ApiError::Overloaded(m) if m.contains("fewer requests waiting")), "{refused:?}");
        // A second light request would leave light with more than heavy: refused itself.
        assert!(matches!(admission.enter("m", limits, &tenant("light")), Err(ApiError::Overloaded(_))));
        drop(running);
        let (oldest, light) = (tokio::spawn(oldest.admitted()), tokio::spawn(light.admitted()));
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), oldest).await.unwrap().unwrap().unwrap();
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), light).await.unwrap().unwrap().unwrap();
        assert_eq!(admission.waiting("m"), 0);
    }

    #[tokio::test]
    async fn a_displaced_ticket_dropped_unread_frees_no_slot() {
        let limits = AdmissionLimits { max_in_flight: 1, max_queued: 2 };
        let admission = Admission::new(QueuePolicy::Fair);
        let running = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let queued = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let displaced = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let light = admission.enter("m", limits, &tenant("light")).expect("takes heavy's newest place");
        drop(displaced); // its client left before reading that it was displaced
        let waiting = [tokio::spawn(queued.admitted()), tokio::spawn(light.admitted())];
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|w| !w.is_finished()), "the one slot is still the running request's");
        drop(running);
        // Heavy's older request first (its turn came first), then light's once that one is done.
        let [heavy, light] = waiting;
        let timeout = std::time::Duration::from_secs(5);
        let permit = tokio::time::timeout(timeout, heavy).await.unwrap().unwrap().unwrap();
        tokio::task::yield_now().await;
        assert!(!light.is_finished(), "one slot, one request");
        drop(permit);
        tokio::time::timeout(timeout, light).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn under_fcfs_a_full_queue_refuses_the_newcomer() {
        let limits = AdmissionLimits { max_in_flight: 1, max_queued: 1 };
        let admission = Admission::new(QueuePolicy::Fcfs);
        let _running = admission.enter("m", limits, &tenant("heavy")).unwrap();
        let _queued = admission.enter("m", limits, &tenant("heavy")).unwrap();
        assert!(matches!(admission.enter("m", limits, &tenant("light")), Err(ApiError::Overloaded(_))));
    }

    #[tokio::test]
    async fn a_dropped_ticket_leaves_the_queue() {
        let admission = Admission::default();
        let _running = admission.enter("m", LIMITS, &anyone()).unwrap();
        let queued = admission.enter("m", LIMITS, &anyone()).unwrap();
        drop(queued);
        assert_eq!(admission.waiting("m"), 0);
        assert!(matches!(admission.enter("m", LIMITS, &anyone()), Ok(Ticket::Queued(_))));
    }

    #[tokio::test]
    async fn zero_queue_refuses_as_soon_as_slots_are_taken() {
        let admission = Admission::default();
        let limits = AdmissionLimits { max_in_flight: 2, max_queued: 0 };
        let _a = admission.enter("m", limits, &anyone()).unwrap();
        let _b = admission.enter("m", limits, &anyone()).unwrap();
        assert!(admission.enter("m", limits, &anyone()).is_err());
    }

    #[tokio::test]
    async fn a_burst_of_one_tenant_does_not_hold_back_another() {
        let admission = Admission::new(QueuePolicy::Fair);
        let who = ["heavy", "heavy", "heavy", "heavy", "heavy", "heavy", "light", "light"];
        let order = release_order(&admission, &who).await;
        assert_eq!(order, ["heavy", "light", "heavy", "light", "heavy", "heavy", "heavy", "heavy"]);
        assert_eq!(admission.waiting("m"), 0);
    }

    #[tokio::test]
    async fn fcfs_releases_in_arrival_order() {
        let admission = Admission::new(QueuePolicy::Fcfs);
        let who = ["heavy", "heavy", "heavy", "light"];
        assert_eq!(release_order(&admission, &who).await, who);
    }

    #[tokio::test]
    async fn a_ticket_dropped_after_its_slot_was_handed_over_passes_it_on() {
        let admission = Admission::default();
        let limits = AdmissionLimits { max_in_flight: 1, max_queued: 4 };
        let running = admission.enter("m", limits, &anyone()).unwrap();
        let first = admission.enter("m", limits, &tenant("a")).unwrap();
        let second = admission.enter("m", limits, &tenant("b")).unwrap();
        // The slot goes to `first`, whose client leaves before it ever runs.
        drop(running);
        assert_eq!(admission.waiting("m"), 1);
        drop(first);
        let permit = second.admitted().await.unwrap();
        drop(permit);
        // Every slot came back: the next two requests run at once and a third waits.
        let again = admission.enter("m", limits, &anyone()).unwrap();
        assert!(matches!(again, Ticket::Ready(_)));
        assert!(matches!(admission.enter("m", limits, &anyone()).unwrap(), Ticket::Queued(_)));
    }

    #[tokio::test]
    async fn a_tenant_under_its_share_runs_in_the_headroom_while_another_holds_every_slot() {
        let limits = AdmissionLimits { max_in_flight: 8, max_queued: 100 };
        let admission = Admission::new(QueuePolicy::Fair);
        let mut heavy: Vec<Ticket> = (0..8).map(|_| admission.enter("m", limits, &tenant("heavy")).unwrap()).collect();
        assert!(heavy.iter().all(|t| matches!(t, Ticket::Ready(_))));
        // Heavy alone gets no headroom: its ninth waits.
        let ninth = admission.enter("m", limits, &tenant("heavy")).unwrap();
        assert!(matches!(ninth, Ticket::Queued(_)));
        // Light holds nothing, heavy everything: light runs at once, one beyond the limit (an
        // eighth of 8), though heavy's ninth waits ahead of it.
        let light = admission.enter("m", limits, &tenant("light")).unwrap();
        assert!(matches!(light, Ticket::Ready(_)), "light runs in the headroom");
        // The headroom is used up: light's next waits like anyone's.
        let light2 = admission.enter("m", limits, &tenant("light")).unwrap();
        assert!(matches!(light2, Ticket::Queued(_)));
        assert_eq!(admission.waiting("m"), 2);
        // Nine run for a limit of eight. A heavy request ending brings it back to eight: the
        // headroom is free again and light, still under heavy's share, waits, so light's
        // queued request takes it out of the queue's turn; heavy's ninth still waits.
        let timeout = std::time::Duration::from_secs(5);
        let ninth = tokio::spawn(ninth.admitted());
        drop(heavy.pop());
        let light2 = tokio::time::timeout(timeout, light2.admitted()).await.unwrap().unwrap();
        tokio::task::yield_now().await;
        assert!(!ninth.is_finished(), "nine run again: heavy's ninth waits for a slot under the limit");
        assert_eq!(admission.waiting("m"), 1);
        // The next heavy request ending leaves eight running (six heavy, two light): at the
        // limit, and light has nothing waiting, so nobody is woken. A light request ending
        // then hands its slot to heavy's ninth.
        drop(heavy.pop());
        tokio::task::yield_now().await;
        assert!(!ninth.is_finished(), "eight run: the limit");
        drop(light);
        let ninth = tokio::time::timeout(timeout, ninth).await.unwrap().unwrap().unwrap();
        assert_eq!(admission.waiting("m"), 0);
        drop((ninth, light2));
        // Every slot came back: eight run at once again, the ninth waits.
        drop(heavy);
        let again: Vec<Ticket> = (0..8).map(|_| admission.enter("m", limits, &tenant("heavy")).unwrap()).collect();
        assert!(again.iter().all(|t| matches!(t, Ticket::Ready(_))));
        assert!(matches!(admission.enter("m", limits, &tenant("heavy")).unwrap(), Ticket::Queued(_)));
    }

    #[tokio::test]
    async fn no_headroom_under_fcfs_nor_for_a_tenant_at_its_share() {
        let limits = AdmissionLimits { max_in_flight: 8, max_queued: 100 };
        let fcfs = Admission::new(QueuePolicy::Fcfs);
        let _heavy: Vec<Ticket> = (0..8).map(|_| fcfs.enter("m", limits, &tenant("heavy")).unwrap()).collect();
        assert!(matches!(fcfs.enter("m", limits, &tenant("light")).unwrap(), Ticket::Queued(_)));

        // Four each of weight 1: light is not under heavy's share, so it waits.
        let fair = Admission::new(QueuePolicy::Fair);
        let _a: Vec<Ticket> = (0..4).map(|_| fair.enter("m", limits, &tenant("heavy")).unwrap()).collect();
        let _b: Vec<Ticket> = (0..4).map(|_| fair.enter("m", limits, &tenant("light")).unwrap()).collect();
        assert!(matches!(fair.enter("m", limits, &tenant("light")).unwrap(), Ticket::Queued(_)));
        // A third tenant holding nothing is under both.
        assert!(matches!(fair.enter("m", limits, &tenant("third")).unwrap(), Ticket::Ready(_)));
        // Weight counts: heavy of weight 3 holding 4 is under light's 4 of weight 1.
        let weighted = Waiter { tenant: Arc::from("heavy"), weight: 3, priority: 0 };
        let fair = Admission::new(QueuePolicy::Fair);
        let _l: Vec<Ticket> = (0..4).map(|_| fair.enter("m", limits, &tenant("light")).unwrap()).collect();
        let _h: Vec<Ticket> = (0..4).map(|_| fair.enter("m", limits, &weighted).unwrap()).collect();
        assert!(matches!(fair.enter("m", limits, &weighted).unwrap(), Ticket::Ready(_)), "4/3 < 4/1");
    }

    #[tokio::test]
    async fn requests_without_a_key_get_no_headroom() {
        // They carry no tenant to the router, which would refuse them past the limit.
        let limits = AdmissionLimits { max_in_flight: 8, max_queued: 100 };
        let admission = Admission::new(QueuePolicy::Fair);
        let _heavy: Vec<Ticket> = (0..8).map(|_| admission.enter("m", limits, &tenant("heavy")).unwrap()).collect();
        assert!(matches!(admission.enter("m", limits, &anyone()).unwrap(), Ticket::Queued(_)));
        assert!(matches!(admission.enter("m", limits, &tenant("light")).unwrap(), Ticket::Ready(_)));
    }

    #[tokio::test]
    async fn a_waiter_dropped_while_awaiting_leaves_no_trace() {
        let admission = Admission::default();
        let running = admission.enter("m", LIMITS, &anyone()).unwrap();
        let queued = admission.enter("m", LIMITS, &tenant("a")).unwrap();
        let waiter = tokio::spawn(queued.admitted());
        tokio::task::yield_now().await;
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(admission.waiting("m"), 0);
        drop(running);
        assert!(matches!(admission.enter("m", LIMITS, &anyone()).unwrap(), Ticket::Ready(_)));
    }
}
