//! The paged KV cache: block ids and their bookkeeping (block_pool, manager) and the
//! memory that holds keys and values (paged_cache).

pub mod block_pool;
pub mod manager;
pub mod paged_cache;

pub use block_pool::BlockPool;
pub use manager::KvCacheManager;
pub use paged_cache::PagedKvCache;
