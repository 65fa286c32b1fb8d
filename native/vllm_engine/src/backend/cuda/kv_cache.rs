//! The KV cache of a model on the GPU: per layer, keys and values in one buffer each,
//! laid out [num_blocks, block_size, num_kv_heads, head_dim] like the CPU cache.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub struct DeviceKvCache {
    pub dtype: DType,
    /// Per layer: (keys, values), each a flat tensor of num_blocks * block_size * kv width.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl DeviceKvCache {
    pub fn new(
        device: &Device,
        dtype: DType,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_width: usize,
    ) -> Result<Self> {
        let n = num_blocks * block_size * kv_width;
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            // Zeroed once: attention reads only written slots, but NaN-free memory keeps a
            // stray read visible as a wrong number rather than a NaN cascade.
            layers.push((Tensor::zeros(n, dtype, device)?, Tensor::zeros(n, dtype, device)?));
        }
        Ok(DeviceKvCache { dtype, layers })
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(dtype: DType, num_layers: usize, block_size: usize, kv_width: usize) -> usize {
        2 * num_layers * block_size * kv_width * dtype.size_in_bytes()
    }
}
