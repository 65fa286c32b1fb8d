//! Compute backends: hot ops with a CPU path (and a CUDA path later).

pub mod cpu;
