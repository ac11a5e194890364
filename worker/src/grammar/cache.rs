//! A small least-recently-used map for compiled grammars: at most `capacity` entries; a lookup
//! refreshes its entry; inserting into a full cache evicts the entry used longest ago (a linear
//! scan: the cache holds tens of entries, each worth milliseconds of compilation).

use std::collections::HashMap;

#[derive(Debug)]
pub struct LruCache<V> {
    capacity: usize,
    clock: u64,
    entries: HashMap<String, (V, u64)>,
}

impl<V: Clone> LruCache<V> {
    pub fn new(capacity: usize) -> LruCache<V> {
        LruCache { capacity, clock: 0, entries: HashMap::new() }
    }

    /// The value under `key`, now the most recently used.
    pub fn get(&mut self, key: &str) -> Option<V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = clock;
            v.clone()
        })
    }

    /// Stores `value` under `key`, evicting the least recently used entry when full.
    pub fn insert(&mut self, key: String, value: V) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (value, self.clock));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_entry() {
        let mut cache = LruCache::new(2);
        cache.insert("a".into(), 1);
        cache.insert("b".into(), 2);
        assert_eq!(cache.get("a"), Some(1));
        cache.insert("c".into(), 3);
        assert_eq!((cache.get("a"), cache.get("b"), cache.get("c")), (Some(1), None, Some(3)));
        assert_eq!(cache.len(), 2);
        cache.insert("c".into(), 4);
        assert_eq!((cache.len(), cache.get("c")), (2, Some(4)));
    }

    #[test]
    fn a_zero_capacity_cache_keeps_nothing() {
        let mut cache = LruCache::new(0);
        cache.insert("a".into(), 1);
        assert_eq!(cache.get("a"), None);
    }
}
