//! Per-request block tables over the BlockPool: how many blocks a request holds and which.

use std::collections::HashMap;

use super::block_pool::{BlockId, BlockPool};

/// The engine's internal request key (unique for the engine's lifetime, unlike the
/// caller's request id, which may be reused once a request has finished).
pub type SeqId = u64;

pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        KvCacheManager {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
        }
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

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Makes room for `num_new_tokens` after the request's `num_computed_tokens`. All or
    /// nothing: on false the request's table is unchanged.
    pub fn allocate_slots(&mut self, seq: SeqId, num_computed_tokens: usize, num_new_tokens: usize) -> bool {
        let needed = self.blocks_for(num_computed_tokens + num_new_tokens);
        let held = self.tables.get(&seq).map_or(0, Vec::len);
        if needed <= held {
            return true;
        }
        match self.pool.allocate(needed - held) {
            Some(blocks) => {
                self.tables.entry(seq).or_default().extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Returns every block of the request to the pool (unknown requests are ignored).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(blocks) = self.tables.remove(&seq) {
            self.pool.release(&blocks);
        }
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

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

    #[derive(Debug, Clone)]
    enum Op {
        Grow { seq: u64, tokens: usize },
        Free { seq: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..6, 1usize..40).prop_map(|(seq, tokens)| Op::Grow { seq, tokens }),
            (0u64..6).prop_map(|seq| Op::Free { seq }),
        ]
    }

    proptest! {
        #[test]
        fn blocks_are_never_shared_and_never_lost(ops in proptest::collection::vec(op(), 1..200)) {
            let mut m = KvCacheManager::new(16, 4);
            let mut computed: HashMap<u64, usize> = HashMap::new();
            for op in ops {
                match op {
                    Op::Grow { seq, tokens } => {
                        let before = m.block_table(seq).to_vec();
                        let done = *computed.get(&seq).unwrap_or(&0);
                        if m.allocate_slots(seq, done, tokens) {
                            computed.insert(seq, done + tokens);
                            prop_assert_eq!(m.block_table(seq).len(), m.blocks_for(done + tokens));
                        } else {
                            prop_assert_eq!(m.block_table(seq), before.as_slice());
                        }
                    }
                    Op::Free { seq } => {
                        m.free(seq);
                        computed.remove(&seq);
                    }
                }
                let mut seen = HashSet::new();
                let mut used = 0;
                for seq in 0..6 {
                    for &b in m.block_table(seq) {
                        prop_assert!(seen.insert(b), "block {} in two tables", b);
                        used += 1;
                    }
                }
                prop_assert_eq!(used + m.num_free_blocks(), m.num_blocks());
            }
        }
    }
}
