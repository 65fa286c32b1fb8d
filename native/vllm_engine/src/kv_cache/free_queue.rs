//! The free block queue: an intrusive doubly linked list over block ids.
//!
//! Allocation takes from the front, freeing appends at the back, and a prefix-cache hit
//! on a free block takes it out of the middle: all O(1). The front is therefore the
//! least recently freed block, the one eviction should take first.

use super::block_pool::BlockId;

const NONE: BlockId = BlockId::MAX;

pub struct FreeQueue {
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
    /// Whether each block is in the queue (guards against double insertion or removal).
    queued: Vec<bool>,
    head: BlockId,
    tail: BlockId,
    len: usize,
}

impl FreeQueue {
    /// A queue holding every block, in id order.
    pub fn full(num_blocks: usize) -> Self {
        let mut q = FreeQueue {
            prev: vec![NONE; num_blocks],
            next: vec![NONE; num_blocks],
            queued: vec![false; num_blocks],
            head: NONE,
            tail: NONE,
            len: 0,
        };
        for b in 0..num_blocks as BlockId {
            q.push_back(b);
        }
        q
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, block: BlockId) -> bool {
        self.queued[block as usize]
    }

    pub fn push_back(&mut self, block: BlockId) {
        let b = block as usize;
        assert!(!self.queued[b], "block {block} is already free (double free)");
        self.queued[b] = true;
        self.prev[b] = self.tail;
        self.next[b] = NONE;
        if self.tail == NONE {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<BlockId> {
        if self.head == NONE {
            return None;
        }
        let block = self.head;
        self.remove(block);
        Some(block)
    }

    /// Takes a block out wherever it is.
    pub fn remove(&mut self, block: BlockId) {
        let b = block as usize;
        assert!(self.queued[b], "block {block} is not free");
        let (p, n) = (self.prev[b], self.next[b]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b] = NONE;
        self.next[b] = NONE;
        self.queued[b] = false;
        self.len -= 1;
    }

    /// Front to back (for tests and invariant checks).
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut at = self.head;
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let b = at;
            at = self.next[b as usize];
            Some(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_from_the_middle_and_keeps_order() {
        let mut q = FreeQueue::full(5);
        q.remove(2);
        q.remove(0);
        q.remove(4);
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![1, 3]);
        q.push_back(0);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![3, 0]);
        assert_eq!(q.len(), 2);
        q.remove(0);
        q.remove(3);
        assert!(q.is_empty());
        assert_eq!(q.pop_front(), None);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn a_double_free_is_caught() {
        let mut q = FreeQueue::full(2);
        q.push_back(1);
    }
}
