//! CPU implementations of the hot ops.

pub mod attention;
mod attention_rows;
mod attention_tile;
mod contention;
#[cfg(test)]
mod decode_bench;
pub mod encoder_attention;
pub mod int8_dot;
mod int8_quantize;
pub mod matmul;
mod matmul_bf16dot;
pub mod matmul_x86;
pub mod phase_timer;
pub mod qmatmul;
pub mod qmatmul_avx2;
pub mod qmatmul_int8;
mod qmatmul_int8_avx2;
mod qmatmul_nibbles;
mod qmatmul_panel_decode;
pub mod simd;
pub mod team;
