//! The order in which requests waiting at a model's admission gate are released: weighted fair
//! across tenants, by priority then arrival within a tenant.
//!
//! Model: every tenant with waiting requests has its own queue, ordered by (vLLM `priority`,
//! lower first; then arrival). Tenants take turns by virtual time (weighted fair queuing with a
//! cost of one per request): releasing a request of a tenant of weight `w` advances that
//! tenant's tag by `1 / w`, and the next request released is the head of the tenant whose next
//! tag is the smallest (ties: the tenant whose tag was set first). A tenant that starts waiting
//! begins at the virtual time of the last release, so idling earns no credit and a newcomer
//! waits behind at most one release of each tenant already waiting.
//!
//! Invariants:
//! - while tenants with weights `w_i` all have requests waiting, each one's share of the
//!   releases converges to `w_i / sum(w)`, whatever the sizes of their backlogs;
//! - no starvation: a tenant of weight `w` with a request waiting sees at most `w_i / w + 1`
//!   releases of each other tenant `i` before its own; requests of one tenant leave in
//!   (priority, arrival) order;
//! - [`FairQueue::displace_for`] (a full queue) gives up only the last request of a tenant over
//!   its weighted share of the places, and only while that narrows the gap, so tenants never
//!   displace each other back and forth and a tenant at or under its share keeps its places;
//! - [`FairQueue::remove`] takes a request out wherever it waits; a tenant with nothing waiting
//!   keeps no state (a returning tenant starts at the last release's virtual time plus its cost,
//!   never earlier than any tag it had, so forgetting it gains it nothing). [`FairQueue::len`] is exactly the requests waiting.
//!
//! Requests without a tenant (an open API) share the tenant `""`; under [`QueuePolicy::Fcfs`]
//! the gate puts every request there with priority 0, which makes this a plain FIFO.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How the head releases requests waiting for a model's slot (`--queue-policy`): `fair`,
/// weighted fair across tenants (their keys' `weight`) and by priority then arrival within one;
/// `fcfs`, in arrival order whoever sent them.
// The variants carry no `///` docs: clap would print `--help` in its long form for every flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    #[default]
    Fair,
    Fcfs,
}

/// The virtual time one request of a weight-1 tenant costs (exact for every weight dividing it).
const UNIT: u128 = 1 << 64;

/// Who a waiting request belongs to and where it sorts.
#[derive(Clone, Debug)]
pub struct Waiter {
    /// `""` for requests without a tenant.
    pub tenant: Arc<str>,
    /// The tenant's share, at least 1.
    pub weight: u32,
    /// vLLM's `priority`: lower leaves first within the tenant.
    pub priority: i64,
}

/// Where one request waits; [`FairQueue::remove`] takes it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    tenant: Arc<str>,
    key: (i64, u64),
}

struct TenantQueue<T> {
    weight: u32,
    /// The virtual time at which this tenant's head is released (its key in `turns`).
    tag: (u128, u64),
    waiting: BTreeMap<(i64, u64), T>,
}

/// Waiting items of many tenants, released fairly (see the module's docs).
pub struct FairQueue<T> {
    tenants: HashMap<Arc<str>, TenantQueue<T>>,
    /// The tenants with something waiting, by their next tag.
    turns: BTreeMap<(u128, u64), Arc<str>>,
    /// The tag of the last release.
    now: u128,
    /// Arrival and tag order, to break ties.
    seq: u64,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue { tenants: HashMap::new(), turns: BTreeMap::new(), now: 0, seq: 0, len: 0 }
    }
}

fn cost(weight: u32) -> u128 {
    UNIT / u128::from(weight.max(1))
}

impl<T> FairQueue<T> {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `item` for `waiter`'s tenant (its weight is the one given last while it waits).
    pub fn push(&mut self, waiter: &Waiter, item: T) -> Place {
        self.seq += 1;
        let (seq, now) = (self.seq, self.now);
        let key = (waiter.priority, seq);
        let weight = waiter.weight.max(1);
        let queue = self.tenants.entry(waiter.tenant.clone()).or_insert_with(|| TenantQueue {
            weight,
            tag: (now + cost(weight), seq),
            waiting: BTreeMap::new(),
        });
        if queue.waiting.is_empty() {
            self.turns.insert(queue.tag, waiter.tenant.clone());
        }
        queue.weight = weight;
        queue.waiting.insert(key, item);
        self.len += 1;
        Place { tenant: waiter.tenant.clone(), key }
    }

    /// Takes the next item due (see the module's docs).
    pub fn pop(&mut self) -> Option<T> {
        let (&tag, tenant) = self.turns.iter().next()?;
        let tenant = tenant.clone();
        self.turns.remove(&tag);
        self.now = tag.0;
        let queue = self.tenants.get_mut(&tenant)?;
        let (_, item) = queue.waiting.pop_first()?;
        self.len -= 1;
        if queue.waiting.is_empty() {
            self.tenants.remove(&tenant);
        } else {
            self.seq += 1;
            queue.tag = (tag.0 + cost(queue.weight), self.seq);
            self.turns.insert(queue.tag, tenant);
        }
        Some(item)
    }

    /// Takes out the item waiting at `place`; `None` if it is no longer waiting (released).
    pub fn remove(&mut self, place: &Place) -> Option<T> {
        let queue = self.tenants.get_mut(&place.tenant)?;
        let item = queue.waiting.remove(&place.key)?;
        self.len -= 1;
        if queue.waiting.is_empty() {
            self.turns.remove(&queue.tag);
            self.tenants.remove(&place.tenant);
        }
        Some(item)
    }

    /// For `waiter` arriving at a full queue: takes out and returns the last request (worst
    /// priority, newest) of the tenant with the most waiting requests per weight, if after the
    /// swap `waiter`'s tenant would still have no more per weight than that one; else `None`
    /// (the newcomer is the one refused).
    pub fn displace_for(&mut self, waiter: &Waiter) -> Option<T> {
        let mine = self.tenants.get(&waiter.tenant).map_or(0, |q| q.waiting.len()) as u128;
        let weight = u128::from(waiter.weight.max(1));
        let (tenant, queue) = self
            .tenants
            .iter()
            .filter(|(t, _)| **t != waiter.tenant)
            .max_by_key(|(_, q)| (q.waiting.len() as u128 * UNIT) / u128::from(q.weight.max(1)))?;
        let (theirs, their_weight) = (queue.waiting.len() as u128, u128::from(queue.weight.max(1)));
        // After the swap: (mine + 1) / weight <= (theirs - 1) / their_weight.
        if (mine + 1) * their_weight > (theirs - 1) * weight {
            return None;
        }
        let last = Place { tenant: tenant.clone(), key: *queue.waiting.last_key_value()?.0 };
        self.remove(&last)
    }

    /// Tenants with something waiting (for tests and status).
    pub fn tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Whether `tenant` has a request waiting.
    pub fn has_waiting(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// The tenants with something waiting, with their weights.
    pub fn waiting_tenants(&self) -> impl Iterator<Item = (&Arc<str>, u32)> {
        self.tenants.iter().map(|(t, q)| (t, q.weight))
    }

    /// Takes `tenant`'s next item out of turn (its place in the turns is kept for the rest).
    pub fn pop_tenant(&mut self, tenant: &str) -> Option<T> {
        let queue = self.tenants.get_mut(tenant)?;
        let (_, item) = queue.waiting.pop_first()?;
        self.len -= 1;
        if queue.waiting.is_empty() {
            self.turns.remove(&queue.tag);
            self.tenants.remove(tenant);
        }
        Some(item)
    }
}

#[cfg(test)]
#[path = "fair_queue_tests.rs"]
mod tests;
