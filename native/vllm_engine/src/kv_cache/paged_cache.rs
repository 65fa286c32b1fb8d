//! Key and value memory of every layer, in fixed-size blocks.

use crate::backend::cpu::matmul::{from_bf16, to_bf16};

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

/// The element keys and values are stored as on the host. As vLLM's `kv_cache_dtype:
/// "auto"`, the model's dtype: a bfloat16 model, or one with GGML-quantized weights, gets a
/// bfloat16 cache (half the bytes a token takes, so twice the blocks in the same memory),
/// every other model float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(self, num_layers: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * self.size()
    }
}

/// A bfloat16 key or value: the high half of a float32's bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// How a cache element is stored and read back.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    /// Rounds to nearest even (exact for float32).
    fn store(x: f32) -> Self;
    /// Widens exactly.
    fn load(self) -> f32;
}

impl KvElement for f32 {
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
}

impl KvElement for Bf16 {
    #[inline(always)]
    fn store(x: f32) -> Self {
        Bf16(to_bf16(x))
    }
    #[inline(always)]
    fn load(self) -> f32 {
        from_bf16(self.0)
    }
}

/// One layer's keys and values of one element type.
pub struct KvBuffers<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: KvElement> KvBuffers<T> {
    pub fn zeroed(len: usize) -> Self {
        KvBuffers {
            k: vec![T::default(); len],
            v: vec![T::default(); len],
        }
    }
}

/// One layer's cache, float32 or bfloat16 (keys and values always alike).
pub enum LayerKv {
    F32(KvBuffers<f32>),
    Bf16(KvBuffers<Bf16>),
}

impl LayerKv {
    pub fn zeroed(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => LayerKv::F32(KvBuffers::zeroed(len)),
            KvDtype::Bf16 => LayerKv::Bf16(KvBuffers::zeroed(len)),
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            LayerKv::F32(_) => KvDtype::F32,
            LayerKv::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Elements in the keys and in the values.
    pub fn lens(&self) -> (usize, usize) {
        match self {
            LayerKv::F32(b) => (b.k.len(), b.v.len()),
            LayerKv::Bf16(b) => (b.k.len(), b.v.len()),
        }
    }

    /// Bytes the keys and values hold allocated.
    pub fn bytes(&self) -> usize {
        let elements = match self {
            LayerKv::F32(b) => b.k.capacity() + b.v.capacity(),
            LayerKv::Bf16(b) => b.k.capacity() + b.v.capacity(),
        };
        elements * self.dtype().size()
    }
}

impl PagedKvCache {
    /// A float32 cache.
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self::with_dtype(KvDtype::F32, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    }

    pub fn with_dtype(
        dtype: KvDtype,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let n = num_blocks * block_size * num_kv_heads * head_dim;
        let layers = (0..num_layers).map(|_| LayerKv::zeroed(dtype, n)).collect();
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

    /// Bytes one block of a float32 cache takes over all layers (keys and values).
    pub fn bytes_per_block(num_layers: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        KvDtype::F32.block_bytes(num_layers, block_size, num_kv_heads, head_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bfloat16 storage keeps values with 8 significant bits exactly, rounds others to the
    /// nearest (ties to even) within half a step, and widens back exactly.
    #[test]
    fn bf16_elements_round_to_nearest_and_widen_exactly() {
        let largest = f32::from_bits(0x7F7F_0000);
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.1875,
            largest,
            -(2f32.powi(-100)),
            f32::INFINITY,
        ] {
            assert_eq!(Bf16::store(x).load().to_bits(), x.to_bits(), "{x} is a bf16 value");
        }
        // 1 + 2^-8 is the tie between 1 and 1 + 2^-7: even is 1. 1 + 3·2^-8 ties up.
        assert_eq!(Bf16::store(1.0 + 1.0 / 256.0).load(), 1.0);
        assert_eq!(Bf16::store(1.0 + 3.0 / 256.0).load(), 1.0 + 4.0 / 256.0);
        assert!(Bf16::store(f32::NAN).load().is_nan());
        for i in 1..10_000 {
            let x = (i as f32 * 0.731).sin() * 10f32.powi(i % 7 - 3);
            let back = Bf16::store(x).load();
            assert!((back - x).abs() <= x.abs() / 256.0, "{x} -> {back}");
            assert_eq!(f32::store(x).load().to_bits(), x.to_bits());
        }
    }

    /// A bf16 cache takes half the bytes of a float32 one per block, and its layers hold
    /// exactly the elements the geometry asks for.
    #[test]
    fn bf16_blocks_take_half_the_bytes() {
        let (layers, blocks, bs, heads, hd) = (3, 5, 16, 2, 64);
        let f32_block = PagedKvCache::bytes_per_block(layers, bs, heads, hd);
        assert_eq!(f32_block, 2 * layers * bs * heads * hd * 4);
        assert_eq!(KvDtype::Bf16.block_bytes(layers, bs, heads, hd) * 2, f32_block);
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            let cache = PagedKvCache::with_dtype(dtype, layers, blocks, bs, heads, hd);
            assert_eq!(cache.layers.len(), layers);
            for layer in &cache.layers {
                assert_eq!(layer.dtype(), dtype);
                assert_eq!(layer.lens(), (blocks * bs * heads * hd, blocks * bs * heads * hd));
            }
            let bytes: usize = cache.layers.iter().map(LayerKv::bytes).sum();
            assert_eq!(bytes, blocks * dtype.block_bytes(layers, bs, heads, hd));
        }
    }
}
