//! Paged attention on the CPU: writes new keys/values into the cache and attends over it.
