//! CPU implementations of the hot ops.

pub mod attention;
