//! Per-request block tables over the BlockPool.
pub struct KvCacheManager;
