//! Key and value memory of every layer, in fixed-size blocks.

/// Per layer, values laid out [num_blocks, block_size, num_kv_heads, head_dim] and keys
/// transposed inside each block, [num_blocks, num_kv_heads, head_dim, block_size] (the CPU
/// attention scores 16 keys per vector FMA; see backend/cpu/attention.rs).
pub struct PagedKvCache {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub layers: Vec<LayerKv>,
    /// The cache of a model on a GPU; `layers` is then empty.
    #[cfg(feature = "cuda")]
    pub device: Option<crate::backend::cuda::DeviceKvCache>,
}

pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl PagedKvCache {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let n = num_blocks * block_size * num_kv_heads * head_dim;
        let layers = (0..num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        PagedKvCache {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            layers,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// A cache whose memory is on a GPU (no host buffers).
    #[cfg(feature = "cuda")]
    pub fn on_device(
        device_cache: crate::backend::cuda::DeviceKvCache,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        PagedKvCache {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            layers: Vec::new(),
            device: Some(device_cache),
        }
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(num_layers: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }
}
