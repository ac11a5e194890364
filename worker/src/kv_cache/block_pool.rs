//! The pool of KV cache blocks: reference counts, an O(1) free list in eviction order, and the
//! prefix cache (full blocks findable by the hash of their tokens and everything before them).
//!
//! Invariants:
//! - a block is either in use (`ref_count > 0`, not in the free list) or free (`ref_count == 0`,
//!   in the free list exactly once);
//! - a free block may still be cached (it keeps its hash and stays findable) until it is handed
//!   out again, at which point its hash is dropped: freed cached blocks are reused least recently
//!   freed first;
//! - `cached` maps each hash to at most one block, and that block carries the hash.

use std::collections::HashMap;

use crate::TokenId;

/// A block's index in the cache.
pub type BlockId = u32;

/// Identity of a full block: a hash of its parent block's hash and its own token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// The hash of a full block with the given parent (`None` for the first block).
    pub fn of(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        let mut bytes = Vec::with_capacity(16 + tokens.len() * 4);
        bytes.extend_from_slice(&parent.map_or(0u128, |p| p.0).to_le_bytes());
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        BlockHash(xxhash_rust::xxh3::xxh3_128(&bytes))
    }

    /// The parent of a salted sequence's first block (vLLM's `cache_salt`): sequences share
    /// cached blocks only when their salts are equal (or both absent).
    pub fn of_salt(salt: &str) -> BlockHash {
        BlockHash(xxhash_rust::xxh3::xxh3_128_with_seed(salt.as_bytes(), 0x5a17))
    }
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Meta {
    ref_count: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    in_free_list: bool,
}

/// Prefix cache counters (in tokens, as vLLM reports them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub queries: u64,
    pub hits: u64,
}

/// All blocks of the cache.
pub struct BlockPool {
    meta: Vec<Meta>,
    head: u32,
    tail: u32,
    free: usize,
    cached: HashMap<BlockHash, BlockId>,
    pub stats: PrefixCacheStats,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> BlockPool {
        let n = num_blocks as u32;
        let meta = (0..n)
            .map(|i| Meta {
                ref_count: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
                in_free_list: true,
            })
            .collect();
        BlockPool {
            meta,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n - 1 },
            free: num_blocks,
            cached: HashMap::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that can be handed out (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free
    }

    /// Fraction of blocks in use, 0..=1.
    pub fn usage(&self) -> f32 {
        if self.meta.is_empty() { 0.0 } else { 1.0 - self.free as f32 / self.meta.len() as f32 }
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.meta[id as usize].ref_count
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = (self.meta[id as usize].prev, self.meta[id as usize].next);
        if prev == NIL {
            self.head = next
        } else {
            self.meta[prev as usize].next = next
        }
        if next == NIL {
            self.tail = prev
        } else {
            self.meta[next as usize].prev = prev
        }
        let m = &mut self.meta[id as usize];
        m.prev = NIL;
        m.next = NIL;
        m.in_free_list = false;
        self.free -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let tail = self.tail;
        {
            let m = &mut self.meta[id as usize];
            m.prev = tail;
            m.next = NIL;
            m.in_free_list = true;
        }
        if tail == NIL {
            self.head = id
        } else {
            self.meta[tail as usize].next = id
        }
        self.tail = id;
        self.free += 1;
    }

    /// Takes `n` blocks (ref count 1 each), evicting the least recently freed cached blocks if
    /// needed; `None` (and nothing taken) if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            if let Some(h) = self.meta[id as usize].hash.take() {
                self.cached.remove(&h);
            }
            self.meta[id as usize].ref_count = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Drops one reference to each block; blocks reaching zero join the free list in the given
    /// order (pass a sequence's blocks last-first so its tail is evicted before its shared head).
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for id in blocks {
            let m = &mut self.meta[id as usize];
            assert!(m.ref_count > 0, "block {id} released more often than taken");
            m.ref_count -= 1;
            if m.ref_count == 0 {
                self.push_back(id);
            }
        }
    }

    /// Adds a reference to a block in use (a forked sequence sharing it).
    pub fn share(&mut self, id: BlockId) {
        let m = &mut self.meta[id as usize];
        assert!(m.ref_count > 0, "sharing a free block {id}");
        m.ref_count += 1;
    }

    /// The cached block holding `hash`, now referenced by the caller.
    pub fn lookup(&mut self, hash: BlockHash) -> Option<BlockId> {
        let id = *self.cached.get(&hash)?;
        if self.meta[id as usize].in_free_list {
            self.unlink(id);
        }
        self.meta[id as usize].ref_count += 1;
        Some(id)
    }

    /// Whether a block with this hash is cached (without taking it).
    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Makes a full, computed block findable by `hash`. If another block already holds the same
    /// content, this one simply stays uncached.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) {
        if self.meta[id as usize].hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.meta[id as usize].hash = Some(hash);
        self.cached.insert(hash, id);
    }

    /// Number of blocks currently findable in the prefix cache.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Drops every cached hash (blocks in use keep their contents).
    pub fn reset_prefix_cache(&mut self) {
        for m in &mut self.meta {
            m.hash = None;
        }
        self.cached.clear();
    }

    /// Checks the invariants; used by tests after arbitrary operation mixes.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.meta.len()];
        let (mut id, mut count, mut prev) = (self.head, 0usize, NIL);
        while id != NIL {
            let m = &self.meta[id as usize];
            if seen[id as usize] || !m.in_free_list || m.ref_count != 0 || m.prev != prev {
                return Err(format!("free list corrupt at block {id}: {m:?}"));
            }
            seen[id as usize] = true;
            count += 1;
            prev = id;
            id = m.next;
        }
        if count != self.free || prev != self.tail {
            return Err(format!("free count {} but list holds {count}", self.free));
        }
        for (i, m) in self.meta.iter().enumerate() {
            if !seen[i] && (m.ref_count == 0 || m.in_free_list) {
                return Err(format!("block {i} is neither free nor in use: {m:?}"));
            }
        }
        for (h, &id) in &self.cached {
            if self.meta[id as usize].hash != Some(*h) {
                return Err(format!("cache maps a hash to block {id} which does not carry it"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_refuses_without_taking_anything() {
        let mut p = BlockPool::new(4);
        let a = p.allocate(3).unwrap();
        assert_eq!(p.num_free(), 1);
        assert!(p.allocate(2).is_none());
        assert_eq!(p.num_free(), 1);
        p.release(a.iter().rev().copied());
        assert_eq!(p.num_free(), 4);
        p.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_blocks_stay_findable_until_reused_in_lru_order() {
        let mut p = BlockPool::new(3);
        let blocks = p.allocate(3).unwrap();
        let hashes: Vec<BlockHash> = (0..3).map(|i| BlockHash::of(None, &[i])).collect();
        for (&b, &h) in blocks.iter().zip(&hashes) {
            p.register(b, h);
        }
        // Free block 0 first, then 1, then 2: block 0 is the least recently freed.
        p.release(blocks.clone());
        assert!(hashes.iter().all(|&h| p.is_cached(h)));
        // A hit revives block 1 without evicting anything.
        assert_eq!(p.lookup(hashes[1]), Some(blocks[1]));
        assert_eq!(p.num_free(), 2);
        // A new allocation evicts the least recently freed (block 0) first.
        let fresh = p.allocate(1).unwrap();
        assert_eq!(fresh, vec![blocks[0]]);
        assert!(!p.is_cached(hashes[0]) && p.is_cached(hashes[2]));
        p.check_invariants().unwrap();
    }

    #[test]
    fn shared_blocks_are_freed_only_by_the_last_reference() {
        let mut p = BlockPool::new(2);
        let b = p.allocate(1).unwrap()[0];
        p.share(b);
        p.release([b]);
        assert_eq!((p.num_free(), p.ref_count(b)), (1, 1));
        p.release([b]);
        assert_eq!(p.num_free(), 2);
        p.check_invariants().unwrap();
    }

    #[test]
    fn block_hashes_chain_over_parents() {
        let a = BlockHash::of(None, &[1, 2, 3]);
        assert_eq!(a, BlockHash::of(None, &[1, 2, 3]));
        assert_ne!(BlockHash::of(Some(a), &[4]), BlockHash::of(None, &[4]));
        assert_ne!(BlockHash::of(None, &[1, 2, 3]), BlockHash::of(None, &[3, 2, 1]));
    }

    #[test]
    fn registering_duplicate_content_keeps_one_cached_copy() {
        let mut p = BlockPool::new(2);
        let b = p.allocate(2).unwrap();
        let h = BlockHash::of(None, &[7]);
        p.register(b[0], h);
        p.register(b[1], h);
        p.release(b.clone());
        assert_eq!(p.num_cached(), 1);
        assert_eq!(p.lookup(h), Some(b[0]));
        p.check_invariants().unwrap();
    }
}
