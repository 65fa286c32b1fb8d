//! Compute backends: hot ops with a CPU path and, with feature `cuda`, a CUDA path.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod l2_prefetch;
