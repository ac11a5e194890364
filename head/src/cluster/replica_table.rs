//! The registry's replicas: entries by replica id, and an index of the ids of each deployment,
//! so routing and each deployment's figures visit that deployment's replicas only, not the
//! cluster's (`lumen bench head`, issue 20).
//!
//! Invariants:
//! - `by_deployment[d]` holds exactly the ids of the entries whose `deployment` is `d`, and no
//!   deployment maps to an empty set. Every insertion and removal goes through this table; an
//!   entry's `deployment` is set when it is created and never reassigned (the mutable accessors
//!   hand out entries whose other fields change: phase, worker, stats).
//! - Iteration by id is in id order, as the `BTreeMap` it replaces.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::registry::ReplicaEntry;

#[derive(Debug, Default)]
pub(super) struct ReplicaTable {
    by_id: BTreeMap<String, ReplicaEntry>,
    by_deployment: HashMap<String, BTreeSet<String>>,
}

impl ReplicaTable {
    pub fn get(&self, id: &str) -> Option<&ReplicaEntry> {
        self.by_id.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut ReplicaEntry> {
        self.by_id.get_mut(id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every entry, in id order.
    pub fn values(&self) -> impl Iterator<Item = &ReplicaEntry> + Clone {
        self.by_id.values()
    }

    /// The entries of `deployment`, in id order.
    pub fn of_deployment<'a>(&'a self, deployment: &str) -> impl Iterator<Item = &'a ReplicaEntry> + Clone + 'a {
        self.by_deployment.get(deployment).into_iter().flatten().filter_map(|id| self.by_id.get(id))
    }

    /// Adds `entry` under its id, replacing (and returning) one with the same id.
    pub fn insert(&mut self, entry: ReplicaEntry) -> Option<ReplicaEntry> {
        let (id, deployment) = (entry.id.clone(), entry.deployment.clone());
        let old = self.by_id.insert(id.clone(), entry);
        if let Some(old) = &old {
            self.unindex(&old.deployment, &old.id);
        }
        self.by_deployment.entry(deployment).or_default().insert(id);
        old
    }

    /// The entry `id`, created by `make` when there is none.
    pub fn get_or_insert_with(&mut self, id: &str, make: impl FnOnce() -> ReplicaEntry) -> &mut ReplicaEntry {
        if !self.by_id.contains_key(id) {
            let entry = make();
            debug_assert_eq!(entry.id, id, "an entry is kept under its own id");
            self.insert(entry);
        }
        self.by_id.get_mut(id).expect("present or just inserted")
    }

    pub fn remove(&mut self, id: &str) -> Option<ReplicaEntry> {
        let entry = self.by_id.remove(id)?;
        self.unindex(&entry.deployment, id);
        Some(entry)
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &ReplicaEntry) -> bool) {
        let gone: Vec<String> = self.by_id.iter().filter(|(id, r)| !keep(id, r)).map(|(id, _)| id.clone()).collect();
        for id in gone {
            self.remove(&id);
        }
    }

    fn unindex(&mut self, deployment: &str, id: &str) {
        if let Some(ids) = self.by_deployment.get_mut(deployment) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_deployment.remove(deployment);
            }
        }
    }
}

impl std::ops::Index<&str> for ReplicaTable {
    type Output = ReplicaEntry;

    fn index(&self, id: &str) -> &ReplicaEntry {
        &self.by_id[id]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::registry::Phase;

    fn entry(id: &str, deployment: &str) -> ReplicaEntry {
        ReplicaEntry::new(id.into(), deployment.into(), "w".into(), Phase::Running)
    }

    fn ids<'a>(it: impl Iterator<Item = &'a ReplicaEntry>) -> Vec<&'a str> {
        it.map(|r| r.id.as_str()).collect()
    }

    /// Every entry is indexed under its deployment, and only there.
    fn consistent(table: &ReplicaTable) {
        let indexed: usize = table.by_deployment.values().map(BTreeSet::len).sum();
        assert_eq!(indexed, table.len());
        for (deployment, set) in &table.by_deployment {
            assert!(!set.is_empty());
            assert!(set.iter().all(|id| table[id.as_str()].deployment == *deployment));
        }
    }

    #[test]
    fn the_deployment_index_follows_every_insertion_and_removal() {
        let mut table = ReplicaTable::default();
        for (id, d) in [("a-1", "a"), ("b-1", "b"), ("a-2", "a"), ("odd", "a")] {
            assert!(table.insert(entry(id, d)).is_none());
        }
        assert_eq!(ids(table.of_deployment("a")), ["a-1", "a-2", "odd"]);
        assert_eq!(ids(table.of_deployment("b")), ["b-1"]);
        assert_eq!(ids(table.of_deployment("none")), Vec::<&str>::new());
        // Replacing an id under another deployment moves it in the index.
        assert!(table.insert(entry("odd", "b")).is_some());
        assert_eq!(ids(table.of_deployment("b")), ["b-1", "odd"]);
        consistent(&table);
        assert_eq!(table.remove("b-1").map(|r| r.id), Some("b-1".into()));
        table.retain(|id, _| id != "a-1");
        assert_eq!(ids(table.of_deployment("a")), ["a-2"]);
        table.get_or_insert_with("c-1", || entry("c-1", "c")).phase = Phase::Stopping;
        table.get_or_insert_with("c-1", || panic!("already there")).phase = Phase::Failed;
        assert_eq!(table["c-1"].phase, Phase::Failed);
        consistent(&table);
        table.retain(|_, _| false);
        assert!(table.is_empty() && table.by_deployment.is_empty());
        assert_eq!(ids(table.values()), Vec::<&str>::new());
    }
}
