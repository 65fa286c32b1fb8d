//! CPU implementations of the hot ops.

pub mod attention;
pub mod encoder_attention;
pub mod qmatmul;
pub mod qmatmul_avx2;
