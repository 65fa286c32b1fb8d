//! Block ids: a free list with reference counts (prefix-cache hashes come later).
pub struct BlockPool;
