//! Sharing the engine's sequence slots and KV cache fairly across tenants.
//!
//! A sequence may carry a tenant (the head sends its API key's tenant name and weight under
//! its fair queue policy; requests without a named key are one tenant, `None`). While any
//! tenanted sequence is in the engine, two things change, both within one priority class (a
//! better class still goes first, and the priority policy's preemption comes before this):
//!
//! - **Admission order**: the next waiting sequence to admit is the earliest one of the tenant
//!   with the fewest running sequences per unit of weight, not simply the earliest one (ties:
//!   the tenant admitted least recently, then arrival order, so tenants at equal shares take
//!   turns); a tenant's burst queued in the engine therefore does not hold back another
//!   tenant's request.
//! - **Preemption for a share**: when that sequence cannot be admitted (every sequence slot is
//!   taken, or too few blocks are free for its first chunk), the newest running sequence of
//!   the tenant furthest over its share is preempted (recomputed later, as any preemption), but
//!   only while the move narrows the gap: after it the newcomer's tenant must still have no more
//!   running sequences per weight than the victim's. Two tenants therefore never preempt each
//!   other back and forth, and a tenant at or under its weighted share is never preempted for
//!   fairness.
//!
//! Without tenanted sequences (no named keys, or the head's `fcfs` queue policy) nothing here
//! runs: the waiting queue's front is admitted and only the priority policy preempts.

use std::cmp::Ordering;
use std::sync::Arc;

use super::{Scheduler, SeqId, Sequence};

/// Running sequences per tenant slot (`Sequence::tenant_slot`, every slot of the scheduler),
/// and each tenant's weight.
pub(super) struct Shares {
    running: Vec<(usize, u64)>,
}

impl Shares {
    /// Counts `s` as running.
    pub(super) fn add(&mut self, s: &Sequence) {
        let slot = &mut self.running[s.tenant_slot];
        *slot = (slot.0 + 1, s.weight());
    }

    fn count(&self, slot: usize) -> usize {
        self.running[slot].0
    }
}

/// Compares `a` running of weight `wa` with `b` of weight `wb` by running sequences per weight.
fn per_weight((a, wa): (usize, u64), (b, wb): (usize, u64)) -> Ordering {
    ((a as u64) * wb).cmp(&((b as u64) * wa))
}

impl Scheduler {
    /// True when fairness applies: some sequence in the engine carries a tenant.
    pub(super) fn tenanted(&self) -> bool {
        self.tenanted > 0
    }

    /// The small number of `tenant` (0 for none), numbering it if new.
    pub(super) fn tenant_slot(&mut self, tenant: Option<&Arc<str>>) -> usize {
        let Some(tenant) = tenant else { return 0 };
        let next = self.tenant_slots.len() + 1;
        *self.tenant_slots.entry(tenant.clone()).or_insert(next)
    }

    /// Forgets every tenant's number and turn (no tenanted sequence is left).
    pub(super) fn forget_tenants(&mut self) {
        self.tenant_slots.clear();
        self.admitted_at.clear();
    }

    /// Running sequences per tenant now.
    pub(super) fn shares(&self) -> Shares {
        let mut shares = Shares { running: vec![(0, 1); self.tenant_slots.len() + 1] };
        for id in &self.running {
            shares.add(&self.seqs[id]);
        }
        shares
    }

    /// The position in `waiting` of the next sequence to admit: the front without tenants
    /// (`shares` is `None` then); else, among the waiting sequences of the front's priority
    /// class, the earliest of the tenant with the fewest running sequences per weight. One pass
    /// over the waiting queue with no hashing (tenants are compared by their small numbers).
    pub(super) fn next_waiting(&self, shares: Option<&Shares>) -> Option<usize> {
        let front = self.seqs.get(self.waiting.front()?)?;
        let Some(shares) = shares.filter(|_| self.tenanted()) else {
            return Some(0);
        };
        let class = front.priority.0;
        let turn = |slot: usize| self.admitted_at.get(slot).copied().unwrap_or(0);
        let mut best: Option<(usize, usize, u64, u64)> = None;
        let mut seen = vec![false; self.tenant_slots.len() + 1];
        let mut unseen = seen.len();
        for (at, id) in self.waiting.iter().enumerate() {
            let s = &self.seqs[id];
            if s.priority.0 != class {
                break;
            }
            if std::mem::replace(&mut seen[s.tenant_slot], true) {
                continue; // only a tenant's earliest waiting sequence competes
            }
            unseen -= 1;
            let (n, w, t) = (shares.count(s.tenant_slot), s.weight(), turn(s.tenant_slot));
            let better = best.is_none_or(|(_, bn, bw, bt)| match per_weight((n, w), (bn, bw)) {
                Ordering::Less => true,
                Ordering::Equal => t < bt,
                Ordering::Greater => false,
            });
            if better {
                best = Some((at, n, w, t));
            }
            if unseen == 0 {
                break; // every tenant's earliest has competed
            }
        }
        best.map(|(at, _, _, _)| at)
    }

    /// Records that `id` was admitted now (for the turns of tenants at equal shares).
    pub(super) fn note_admitted(&mut self, id: SeqId) {
        self.admissions += 1;
        let slot = self.seqs[&id].tenant_slot;
        if self.admitted_at.len() <= slot {
            self.admitted_at.resize(slot + 1, 0);
        }
        self.admitted_at[slot] = self.admissions;
    }

    /// The running sequence to preempt so that waiting sequence `id` gets in: the newest one of
    /// the same or a worse priority class from the tenant furthest over its share that has one,
    /// if moving one slot from that tenant to `id`'s still leaves `id`'s tenant at or under it
    /// per weight. A tenant furthest over its share whose running sequences are all of a better
    /// class is passed over for the next one.
    pub(super) fn fairness_victim(&self, id: SeqId, shares: &Shares) -> Option<SeqId> {
        let newcomer = &self.seqs[&id];
        let (n, w) = (shares.count(newcomer.tenant_slot), newcomer.weight());
        let mut tenants: Vec<(usize, (usize, u64))> =
            shares.running.iter().copied().enumerate().filter(|&(slot, _)| slot != newcomer.tenant_slot).collect();
        // Furthest over its share first; among equals the later slot, as a maximum search would.
        tenants.sort_by(|(sa, a), (sb, b)| per_weight(*b, *a).then(sb.cmp(sa)));
        tenants.into_iter().find_map(|(tenant, (vn, vw))| {
            // After the move, the newcomer's tenant must not be above the victim's.
            if vn == 0 || per_weight((n + 1, w), (vn - 1, vw)) == Ordering::Greater {
                return None;
            }
            self.running.iter().rev().copied().find(|r| {
                let s = &self.seqs[r];
                s.tenant_slot == tenant && s.priority.0 >= newcomer.priority.0
            })
        })
    }

    /// The sequence to preempt when running sequence `id` needs a block and none is free: one
    /// not yet scheduled this step (`id` or after it in `running`) of the worst priority class
    /// among them; the newest such one, or among tenants the newest of the tenant furthest
    /// over its share.
    pub(super) fn block_victim(&self, id: SeqId) -> SeqId {
        let from = self.running.iter().position(|&r| r == id).expect("the sequence itself is running");
        let last = *self.running.last().expect("the sequence itself is running");
        if !self.tenanted() {
            return last;
        }
        let class = self.seqs[&last].priority.0;
        let shares = self.shares();
        let candidates = || self.running[from..].iter().rev().copied().filter(|r| self.seqs[r].priority.0 == class);
        let load = |r: &SeqId| {
            let s = &self.seqs[r];
            (shares.count(s.tenant_slot), s.weight())
        };
        // The first (newest) of the highest count per weight.
        candidates()
            .reduce(|best, r| if per_weight(load(&r), load(&best)) == Ordering::Greater { r } else { best })
            .unwrap_or(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Schedule, SchedulerConfig, SchedulingPolicy};

    fn scheduler(num_blocks: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: 64,
            block_size: 4,
            num_blocks,
            enable_prefix_caching: false,
            policy: SchedulingPolicy::Fcfs,
        })
    }

    /// A 3-token prompt (distinct per id) of `tenant` with `weight`; `None`: no tenant.
    fn seq(id: SeqId, tenant: Option<&str>, weight: u32) -> Sequence {
        let mut s = Sequence::new(id, id, vec![id as u32 * 10, 1, 2]);
        s.tenant = tenant.map(Arc::from);
        s.tenant_weight = weight;
        s
    }

    fn step(s: &mut Scheduler) -> Schedule {
        let sched = s.schedule();
        s.complete(&sched);
        for item in sched.seqs.iter().filter(|i| i.samples) {
            s.append_token(item.id, 7);
        }
        sched
    }

    /// Running sequences of each tenant, in the order given.
    fn running_of(s: &Scheduler, tenants: &[Option<&str>]) -> Vec<usize> {
        let of = |t: &Option<&str>| s.running.iter().filter(|r| s.seqs[r].tenant.as_deref() == *t).count();
        tenants.iter().map(of).collect()
    }

    #[test]
    fn a_newcomer_takes_slots_from_a_tenant_over_its_share_until_both_are_even() {
        let mut s = scheduler(64, 4);
        for id in 1..=6 {
            s.add(seq(id, Some("heavy"), 1));
        }
        step(&mut s);
        assert_eq!(running_of(&s, &[Some("heavy")]), vec![4]);
        s.add(seq(7, Some("light"), 1));
        s.add(seq(8, Some("light"), 1));
        // The light tenant's first request preempts heavy's newest running sequence (4), ahead
        // of heavy's two queued earlier.
        let sched = step(&mut s);
        assert_eq!(sched.preempted, vec![4]);
        assert!(sched.seqs.iter().any(|q| q.id == 7 && q.start == 0), "{sched:?}");
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![3, 1]);
        let sched = step(&mut s);
        assert_eq!(sched.preempted, vec![3]);
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![2, 2]);
        // Even now: nobody preempts anybody, and heavy's queue waits for a slot.
        for _ in 0..5 {
            assert!(step(&mut s).preempted.is_empty());
        }
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![2, 2]);
        // A finished light request hands its slot to heavy's earliest waiting sequence.
        s.remove(7);
        let sched = step(&mut s);
        assert!(sched.seqs.iter().any(|q| q.id == 3 && q.start == 0), "{sched:?}");
    }

    #[test]
    fn a_tenant_over_its_share_with_only_better_classes_running_is_passed_over() {
        let mut s = scheduler(64, 5);
        // vip runs three sequences of a better class (-1), bulk two of the default class.
        for id in 1..=3 {
            let mut q = seq(id, Some("vip"), 1);
            q.priority.0 = -1;
            s.add(q);
        }
        for id in 4..=5 {
            s.add(seq(id, Some("bulk"), 1));
        }
        step(&mut s);
        assert_eq!(running_of(&s, &[Some("vip"), Some("bulk")]), vec![3, 2]);
        // A newcomer of the default class cannot take vip's slots (a better class), but bulk is
        // over its share too: its newest sequence makes way.
        s.add(seq(6, Some("new"), 1));
        let sched = step(&mut s);
        assert_eq!(sched.preempted, vec![5]);
        assert_eq!(running_of(&s, &[Some("vip"), Some("bulk"), Some("new")]), vec![3, 1, 1]);
    }

    #[test]
    fn tenants_at_equal_shares_take_turns_for_a_freed_slot() {
        let mut s = scheduler(64, 3);
        for id in 1..=6 {
            s.add(seq(id, Some("heavy"), 1));
        }
        step(&mut s);
        s.add(seq(7, Some("light"), 1));
        s.add(seq(8, Some("light"), 1));
        step(&mut s); // light's first preempts heavy's newest (3): 2 and 1
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![2, 1]);
        let admitted = |sched: &Schedule| sched.seqs.iter().filter(|q| q.start == 0).map(|q| q.id).collect::<Vec<_>>();
        // A heavy request ends: 1 and 1, a tie. Light was admitted last, so heavy's turn.
        s.remove(1);
        assert_eq!(admitted(&step(&mut s)), vec![3]);
        // Another ends: a tie again, and now light's turn, though heavy's queued earlier.
        s.remove(2);
        assert_eq!(admitted(&step(&mut s)), vec![8]);
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![1, 2]);
    }

    #[test]
    fn shares_follow_the_weights() {
        let mut s = scheduler(64, 4);
        for id in 1..=6 {
            s.add(seq(id, Some("big"), 3));
        }
        step(&mut s);
        for id in 7..=9 {
            s.add(seq(id, Some("small"), 1));
        }
        for _ in 0..6 {
            step(&mut s);
        }
        assert_eq!(running_of(&s, &[Some("big"), Some("small")]), vec![3, 1]);
        assert_eq!(s.num_preemptions(), 1);
    }

    #[test]
    fn requests_without_a_key_are_one_tenant_among_the_named() {
        let mut s = scheduler(64, 4);
        for id in 1..=6 {
            s.add(seq(id, None, 1));
        }
        step(&mut s);
        s.add(seq(7, Some("team"), 1));
        for _ in 0..4 {
            step(&mut s);
        }
        assert_eq!(running_of(&s, &[None, Some("team")]), vec![3, 1]);
    }

    #[test]
    fn without_tenants_the_burst_keeps_its_slots() {
        let mut s = scheduler(64, 4);
        for id in 1..=8 {
            s.add(seq(id, None, 1));
        }
        for _ in 0..5 {
            assert!(step(&mut s).preempted.is_empty());
        }
        assert_eq!(s.running, vec![1, 2, 3, 4]);
    }

    #[test]
    fn out_of_blocks_the_tenant_over_its_share_gives_one_up_not_the_newest() {
        // Four 3-token prompts (one block each) fill 4 of 6 blocks; at their fifth token each
        // needs a second block and only two are free.
        let mut s = scheduler(6, 8);
        for id in 1..=3 {
            s.add(seq(id, Some("heavy"), 1));
        }
        s.add(seq(4, Some("light"), 1));
        step(&mut s);
        step(&mut s);
        let sched = step(&mut s);
        assert_eq!(sched.preempted, vec![3], "heavy's newest, though light's is newer");
        assert!(sched.seqs.iter().any(|q| q.id == 4), "light keeps decoding: {sched:?}");
        assert_eq!(running_of(&s, &[Some("heavy"), Some("light")]), vec![2, 1]);
    }
}
