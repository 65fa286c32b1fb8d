//! Compute backends: hot ops with a CPU path and, with feature `cuda`, a CUDA path.

pub mod cpu;
pub mod gemm_tuning;
#[cfg(feature = "cuda")]
pub mod cuda;
