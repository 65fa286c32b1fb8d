//! Block ids: a free queue with reference counts.
//!
//! Freed blocks go to the back of the queue and allocation takes from the front, so the
//! queue is already in least-recently-freed order: prefix caching (a later issue) will
//! keep a block's hash while it sits there and evict from the front. Reference counts let
//! one block be shared by several block tables (prefix hits, copy-on-write).

use std::collections::VecDeque;

pub type BlockId = u32;

pub struct BlockPool {
    /// How many block tables hold each block; 0 means the block is in `free`.
    ref_counts: Vec<u32>,
    free: VecDeque<BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let blocks: Vec<BlockId> = self.free.drain(..n).collect();
        for &b in &blocks {
            self.ref_counts[b as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds a holder to a block that is in use (sharing).
    pub fn add_ref(&mut self, block: BlockId) {
        let count = &mut self.ref_counts[block as usize];
        debug_assert!(*count > 0, "add_ref on free block {block}");
        *count += 1;
    }

    /// Drops one holder of each block; a block whose last holder is gone becomes free.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let count = &mut self.ref_counts[b as usize];
            assert!(*count > 0, "block {b} released while free (double free)");
            *count -= 1;
            if *count == 0 {
                self.free.push_back(b);
            }
        }
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4);
        assert!(pool.allocate(5).is_none());
        assert_eq!(pool.num_free_blocks(), 4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(pool.num_free_blocks(), 1);
        assert!(pool.allocate(2).is_none());
        pool.release(&a);
        assert_eq!(pool.num_free_blocks(), 4);
    }

    #[test]
    fn shared_block_is_freed_by_its_last_holder() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate(1).unwrap();
        pool.add_ref(a[0]);
        pool.release(&a);
        assert_eq!(pool.num_free_blocks(), 1);
        pool.release(&a);
        assert_eq!(pool.num_free_blocks(), 2);
    }

    #[test]
    fn freed_blocks_are_reused_last() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate(1).unwrap();
        pool.release(&a);
        assert_eq!(pool.allocate(3).unwrap(), vec![1, 2, a[0]]);
    }
}
