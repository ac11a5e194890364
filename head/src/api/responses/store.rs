//! The in-memory store of past responses (`store: true`, the default): what `GET
//! /v1/responses/{id}` returns and what `previous_response_id` continues.
//!
//! Invariants: the store never holds more than `max_entries` responses nor more than `max_bytes`
//! of them (each entry's size is its response object's and its conversation's JSON length); an
//! entry larger than `max_bytes` alone is not kept. When full, the least recently used entry
//! (inserted or read) goes first. Entries are immutable once stored; the conversation of an entry
//! is the whole chat history it ends (earlier turns, this turn's input, this turn's answer as an
//! assistant message), without any turn's `instructions`, which OpenAI does not carry over.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// Default bound on the number of stored responses.
pub const DEFAULT_MAX_ENTRIES: usize = 1024;
/// Default bound on the bytes of stored responses (64 MiB).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// One stored response.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The response object, as returned.
    pub response: Value,
    /// The chat messages of the conversation so far (see the module docs).
    pub messages: Vec<Value>,
}

impl Stored {
    fn bytes(&self) -> usize {
        self.response.to_string().len() + self.messages.iter().map(|m| m.to_string().len()).sum::<usize>()
    }
}

struct Entry {
    stored: Arc<Stored>,
    bytes: usize,
    /// Its key in `Inner::order`.
    stamp: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Least recently used first.
    order: BTreeMap<u64, String>,
    bytes: usize,
    clock: u64,
}

/// A bounded LRU map from response id to [`Stored`].
pub struct ResponseStore {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl Default for ResponseStore {
    fn default() -> Self {
        ResponseStore::new(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    }
}

impl ResponseStore {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        ResponseStore { max_entries, max_bytes, inner: Mutex::new(Inner::default()) }
    }

    /// Stores `stored` under `id`, evicting the least recently used entries to stay in bounds.
    /// Returns whether it was kept.
    pub fn insert(&self, id: &str, stored: Stored) -> bool {
        let bytes = stored.bytes();
        if self.max_entries == 0 || bytes > self.max_bytes {
            return false;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.remove(id);
        while inner.entries.len() >= self.max_entries || inner.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else { break };
            inner.remove(&oldest);
        }
        inner.clock += 1;
        let stamp = inner.clock;
        inner.order.insert(stamp, id.to_string());
        inner.bytes += bytes;
        inner.entries.insert(id.to_string(), Entry { stored: Arc::new(stored), bytes, stamp });
        true
    }

    /// The entry under `id`, now the most recently used.
    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let stamp = inner.clock;
        let entry = inner.entries.get_mut(id)?;
        let old = std::mem::replace(&mut entry.stamp, stamp);
        let stored = entry.stored.clone();
        inner.order.remove(&old);
        inner.order.insert(stamp, id.to_string());
        Some(stored)
    }

    /// Removes the entry under `id`; whether there was one.
    pub fn remove(&self, id: &str) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(id)
    }

    /// (entries, bytes) held now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.entries.len(), inner.bytes)
    }
}

impl Inner {
    fn remove(&mut self, id: &str) -> bool {
        let Some(entry) = self.entries.remove(id) else { return false };
        self.order.remove(&entry.stamp);
        self.bytes -= entry.bytes;
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn stored(text: &str) -> Stored {
        Stored { response: json!({"text": text}), messages: vec![json!({"role": "user", "content": text})] }
    }

    #[test]
    fn evicts_the_least_recently_used_beyond_the_entry_bound() {
        let store = ResponseStore::new(2, usize::MAX);
        store.insert("a", stored("a"));
        store.insert("b", stored("b"));
        assert!(store.get("a").is_some(), "reading `a` makes `b` the oldest");
        store.insert("c", stored("c"));
        assert!(store.get("b").is_none());
        assert!(store.get("a").is_some() && store.get("c").is_some());
        assert_eq!(store.size().0, 2);
    }

    #[test]
    fn stays_within_the_byte_bound_and_refuses_an_entry_larger_than_it() {
        let one = stored("x").bytes();
        let store = ResponseStore::new(100, one * 2);
        for id in ["a", "b", "c"] {
            assert!(store.insert(id, stored("x")));
        }
        assert_eq!(store.size(), (2, one * 2));
        assert!(store.get("a").is_none());
        assert!(!store.insert("big", stored(&"y".repeat(one * 2))));
        assert_eq!(store.size(), (2, one * 2));
    }

    #[test]
    fn removing_frees_its_bytes() {
        let store = ResponseStore::new(10, 10_000);
        store.insert("a", stored("a"));
        assert!(store.remove("a"));
        assert!(!store.remove("a"));
        assert_eq!(store.size(), (0, 0));
    }
}
