//! Per-request block tables over the BlockPool, and the prefix cache's use of them:
//! finding a new request's longest cached prefix, sharing those blocks, and registering
//! each request's full blocks once their keys and values are (being) computed.

use std::collections::HashMap;

use super::block_hash::BlockHash;
use super::block_pool::{BlockId, BlockPool};

/// The engine's internal request key (unique for the engine's lifetime, unlike the
/// caller's request id, which may be reused once a request has finished).
pub type SeqId = u64;

/// Prefix-cache lookups of requests admitted for the first time (tokens, as vLLM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    pub requests: u64,
    /// Prompt tokens looked up.
    pub queries: u64,
    /// Of those, tokens found in the cache.
    pub hits: u64,
}

#[derive(Default)]
struct Table {
    blocks: Vec<BlockId>,
    /// Leading blocks already registered in the prefix cache (or found there).
    num_cached: usize,
}

pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    prefix_caching: bool,
    tables: HashMap<SeqId, Table>,
    stats: PrefixCacheStats,
}

impl KvCacheManager {
    /// A manager with prefix caching on.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        KvCacheManager {
            pool: BlockPool::new(num_blocks),
            block_size,
            prefix_caching: true,
            tables: HashMap::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    pub fn with_prefix_caching(mut self, enabled: bool) -> Self {
        self.prefix_caching = enabled;
        self
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }
    /// Fraction of blocks held by requests (cached free blocks count as free).
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks();
        if total == 0 {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / total as f64
    }
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached blocks starting the prompt whose full blocks hash to
    /// `hashes`. Never all `num_tokens`: the last token is always computed, so the
    /// request gets logits to sample from.
    pub fn find_cached_prefix(&self, hashes: &[BlockHash], num_tokens: usize) -> Vec<BlockId> {
        if !self.prefix_caching || num_tokens == 0 {
            return Vec::new();
        }
        let max_blocks = (num_tokens - 1) / self.block_size;
        hashes
            .iter()
            .take(max_blocks)
            .map_while(|&h| self.pool.lookup(h))
            .collect()
    }

    /// Counts one first-time lookup in the hit-rate statistics.
    pub fn record_lookup(&mut self, num_tokens: usize, num_hit_tokens: usize) {
        self.stats.requests += 1;
        self.stats.queries += num_tokens as u64;
        self.stats.hits += num_hit_tokens as u64;
    }

    /// Makes room for `num_new_tokens` after the request's `num_computed_tokens`. All or
    /// nothing: on false the request's table is unchanged.
    pub fn allocate_slots(&mut self, seq: SeqId, num_computed_tokens: usize, num_new_tokens: usize) -> bool {
        let needed = self.blocks_for(num_computed_tokens + num_new_tokens);
        let held = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        if needed <= held {
            return true;
        }
        match self.pool.allocate(needed - held) {
            Some(blocks) => {
                self.tables.entry(seq).or_default().blocks.extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Starts a request's table with cached blocks `hits` (from `find_cached_prefix`)
    /// and room for `num_new_tokens` after them. All or nothing.
    pub fn allocate_with_prefix(&mut self, seq: SeqId, hits: &[BlockId], num_new_tokens: usize) -> bool {
        debug_assert!(self.tables.get(&seq).is_none_or(|t| t.blocks.is_empty()));
        let needed = self.blocks_for(hits.len() * self.block_size + num_new_tokens);
        let fresh = needed.saturating_sub(hits.len());
        // Hits sitting in the free queue stop being free once touched.
        let free_hits = hits.iter().filter(|&&b| self.pool.ref_count(b) == 0).count();
        if self.pool.num_free_blocks() < free_hits + fresh {
            return false;
        }
        for &b in hits {
            self.pool.touch(b);
        }
        let Some(blocks) = self.pool.allocate(fresh) else {
            // Unreachable after the check above; undo rather than leak.
            self.pool.release(hits.iter().copied());
            return false;
        };
        let table = self.tables.entry(seq).or_default();
        table.blocks.extend_from_slice(hits);
        table.blocks.extend(blocks);
        table.num_cached = hits.len();
        true
    }

    /// Registers the request's full blocks among its first `num_tokens` tokens in the
    /// prefix cache; `hashes` are its full blocks' hashes. Call only for tokens whose keys
    /// and values are computed by the end of the step that is being scheduled.
    pub fn cache_blocks(&mut self, seq: SeqId, hashes: &[BlockHash], num_tokens: usize) {
        if !self.prefix_caching {
            return;
        }
        let Some(table) = self.tables.get_mut(&seq) else { return };
        let full = (num_tokens / self.block_size).min(hashes.len()).min(table.blocks.len());
        for (&block, &hash) in table.blocks[..full].iter().zip(hashes).skip(table.num_cached) {
            self.pool.cache(block, hash);
        }
        table.num_cached = table.num_cached.max(full);
    }

    /// Returns every block of the request to the pool (unknown requests are ignored). The
    /// tail goes first, so it is evicted before the prefix other requests may share.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            self.pool.release(table.blocks.into_iter().rev());
        }
    }

    /// Forgets every cached prefix; false (nothing done) while any request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], |t| t.blocks.as_slice())
    }

    /// Every invariant of the pool, plus: a block's ref count is exactly the number of
    /// table slots holding it. Panics on the first broken one (tests).
    pub fn check_invariants(&self) {
        self.pool.check_invariants();
        let mut holders = vec![0u32; self.num_blocks()];
        for t in self.tables.values() {
            for &b in &t.blocks {
                holders[b as usize] += 1;
            }
        }
        for (b, &n) in holders.iter().enumerate() {
            assert_eq!(self.pool.ref_count(b as BlockId), n, "block {b}: ref count vs holders");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_a_table_block_by_block() {
        let mut m = KvCacheManager::new(4, 16);
        assert!(m.allocate_slots(1, 0, 10));
        assert_eq!(m.block_table(1).len(), 1);
        assert!(m.allocate_slots(1, 10, 6));
        assert_eq!(m.block_table(1).len(), 1);
        assert!(m.allocate_slots(1, 16, 1));
        assert_eq!(m.block_table(1).len(), 2);
        assert!(!m.allocate_slots(2, 0, 49));
        assert_eq!(m.block_table(2).len(), 0);
        assert_eq!(m.num_free_blocks(), 2);
        m.free(1);
        assert_eq!(m.num_free_blocks(), 4);
    }

    #[test]
    fn a_second_request_shares_the_cached_prefix_but_computes_its_last_token() {
        use crate::kv_cache::block_hash::{extend_block_hashes, ExtraKeys};
        let mut m = KvCacheManager::new(8, 4);
        let tokens: Vec<u32> = (0..8).collect();
        let mut hashes = Vec::new();
        extend_block_hashes(&mut hashes, &tokens, 4, &ExtraKeys::default());
        assert!(m.allocate_with_prefix(1, &[], 8));
        m.cache_blocks(1, &hashes, 8);
        // Exactly two full blocks: only the first may be reused (the last token is computed).
        let hits = m.find_cached_prefix(&hashes, 8);
        assert_eq!(hits, m.block_table(1)[..1].to_vec());
        assert!(m.allocate_with_prefix(2, &hits, 4));
        assert_eq!(m.block_table(2)[0], m.block_table(1)[0]);
        assert_eq!(m.pool().ref_count(hits[0]), 2);
        m.free(1);
        m.free(2);
        m.check_invariants();
        assert_eq!(m.num_free_blocks(), 8);
        // Freed but still cached.
        assert_eq!(m.find_cached_prefix(&hashes, 9).len(), 2);
        assert!(m.reset_prefix_cache());
        assert!(m.find_cached_prefix(&hashes, 9).is_empty());
    }
}
