//! Block ids: reference counts, the free queue and the prefix cache's hash table.
//!
//! A block is free when no block table holds it (ref count 0); it then sits in the free
//! queue. A free block may still be cached: it keeps its hash, so a later request with
//! the same prefix takes it back out of the queue (`touch`) instead of recomputing it.
//! Allocation takes the least recently freed block and evicts its hash if it had one.

use std::collections::HashMap;

use super::block_hash::BlockHash;
use super::free_queue::FreeQueue;

pub type BlockId = u32;

pub struct BlockPool {
    /// How many block tables hold each block; 0 means the block is in `free`.
    ref_counts: Vec<u32>,
    /// The hash of each cached block (full, computed, registered).
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    free: FreeQueue,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: FreeQueue::full(num_blocks),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no request holds (cached ones included: they can be evicted).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Takes `n` blocks, all or none, evicting the cached ones among them.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.free.pop_front()?;
            self.evict(b);
            self.ref_counts[b as usize] = 1;
            blocks.push(b);
        }
        Some(blocks)
    }

    /// The cached block holding this prefix, if any.
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Adds a holder to a block (a prefix-cache hit or sharing); a free block leaves the
    /// free queue.
    pub fn touch(&mut self, block: BlockId) {
        let count = &mut self.ref_counts[block as usize];
        if *count == 0 {
            self.free.remove(block);
        }
        *count += 1;
    }

    /// Registers a full, computed block under its hash. A block already cached, or a hash
    /// another block already holds, is left as it is (the other copy serves hits).
    pub fn cache(&mut self, block: BlockId, hash: BlockHash) {
        if self.hashes[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hashes[block as usize] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Drops one holder of each block, in the given order; a block whose last holder is
    /// gone joins the back of the free queue, keeping its hash.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let count = &mut self.ref_counts[b as usize];
            assert!(*count > 0, "block {b} released while free (double free)");
            *count -= 1;
            if *count == 0 {
                self.free.push_back(b);
            }
        }
    }

    /// Forgets every cached hash. Refused (false) while any block is in use, as vLLM:
    /// a running request's blocks would otherwise be shared under stale bookkeeping.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.free.len() != self.num_blocks() {
            return false;
        }
        self.cached.clear();
        self.hashes.iter_mut().for_each(|h| *h = None);
        true
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    pub fn block_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.hashes[block as usize]
    }

    fn evict(&mut self, block: BlockId) {
        if let Some(h) = self.hashes[block as usize].take() {
            if self.cached.get(&h) == Some(&block) {
                self.cached.remove(&h);
            }
        }
    }

    /// Checks every internal invariant; panics with the first broken one (tests).
    pub fn check_invariants(&self) {
        let mut in_queue = vec![false; self.num_blocks()];
        for b in self.free.iter() {
            assert!(!in_queue[b as usize], "block {b} twice in the free queue");
            in_queue[b as usize] = true;
        }
        for (b, &count) in self.ref_counts.iter().enumerate() {
            assert_eq!(count == 0, in_queue[b], "block {b}: ref count {count} vs free queue");
            assert_eq!(in_queue[b], self.free.contains(b as BlockId));
        }
        for (&h, &b) in &self.cached {
            assert_eq!(
                self.hashes[b as usize],
                Some(h),
                "cache entry of block {b} has a stale hash"
            );
        }
        let hashed = self.hashes.iter().filter(|h| h.is_some()).count();
        assert_eq!(hashed, self.cached.len(), "hashed blocks and cache entries differ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u128) -> BlockHash {
        BlockHash(x)
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4);
        assert!(pool.allocate(5).is_none());
        assert_eq!(pool.num_free_blocks(), 4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(pool.num_free_blocks(), 1);
        assert!(pool.allocate(2).is_none());
        pool.release(a);
        assert_eq!(pool.num_free_blocks(), 4);
    }

    #[test]
    fn shared_block_is_freed_by_its_last_holder() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap();
        pool.touch(a[0]);
        pool.release(a.clone());
        assert_eq!(pool.num_free_blocks(), 1);
        pool.release(a);
        assert_eq!(pool.num_free_blocks(), 2);
    }

    #[test]
    fn freed_blocks_are_reused_last() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate(1).unwrap();
        pool.release(a.clone());
        assert_eq!(pool.allocate(3).unwrap(), vec![1, 2, a[0]]);
    }

    #[test]
    fn a_free_cached_block_serves_hits_until_evicted() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap()[0];
        pool.cache(a, h(7));
        pool.release([a]);
        assert_eq!(pool.lookup(h(7)), Some(a));
        pool.touch(a);
        assert_eq!((pool.ref_count(a), pool.num_free_blocks()), (1, 1));
        pool.release([a]);
        // Block 1 was freed before `a`: it goes first, `a` keeps its hash.
        assert_eq!(pool.allocate(1).unwrap(), vec![1]);
        assert_eq!(pool.lookup(h(7)), Some(a));
        assert_eq!(pool.allocate(1).unwrap(), vec![a]);
        assert_eq!(pool.lookup(h(7)), None);
        pool.check_invariants();
    }

    #[test]
    fn reset_is_refused_while_blocks_are_in_use() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap()[0];
        pool.cache(a, h(1));
        assert!(!pool.reset_prefix_cache());
        pool.release([a]);
        assert!(pool.reset_prefix_cache());
        assert_eq!(pool.lookup(h(1)), None);
        pool.check_invariants();
    }
}
