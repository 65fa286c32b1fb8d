//! The paged KV cache: block ids and their bookkeeping (block_pool, free_queue, manager),
//! prefix-cache keys (block_hash) and the memory that holds keys and values (paged_cache).

pub mod block_hash;
pub mod block_pool;
pub mod free_queue;
pub mod manager;
pub mod paged_cache;
#[cfg(test)]
mod properties;

pub use block_hash::{BlockHash, ExtraKeys};
pub use block_pool::BlockPool;
pub use manager::{KvCacheManager, PrefixCacheStats};
pub use paged_cache::PagedKvCache;
