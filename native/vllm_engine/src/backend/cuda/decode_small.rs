//! Launcher of kernels/decode_small.cu: decode attention for small batches, one cluster of
//! DS_CLUSTER blocks per (sequence, KV head), with qkv_prepare (bias, q/k norm, rotary, the
//! KV-cache write) fused in. Only for steps where every sequence has exactly one query token (the captured
//! decode graphs): a second token of a sequence would need a key another block writes.
//! Where decode_heads::serves (by default groups of at least 4 query heads per KV head, e.g.
//! Qwen2.5's 7), `launch` hands the step to decode_heads.rs's one-block-per-head kernel.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig};
use candle_core::DType;

use super::decode_heads;
use super::ops::{AttentionDims, MetaPtrs, QkvPtrs};
use super::{embedded, Kernels};
use crate::error::{EngineError, Result};

/// Rows (sequences) a captured decode step may have to take this path.
pub const MAX_ROWS: usize = 8;
/// Must match DS_THREADS, DS_WARPS and DS_CLUSTER in decode_small.cu.
const DS_THREADS: u32 = 256;
const DS_WARPS: usize = 8;
const DS_CLUSTER: u32 = 8;
/// Query heads per KV head the kernel is instantiated for.
const GROUPS: [usize; 5] = [1, 2, 4, 7, 8];
/// Dynamic shared memory without opting in.
const MAX_SHARED: usize = 48 * 1024;

/// Loads the module and adds its functions to `functions`; None (the old path stays) when
/// it does not load.
pub(super) fn load_into(
    context: &Arc<CudaContext>,
    functions: &mut HashMap<String, CudaFunction>,
) -> Option<Arc<CudaModule>> {
    let module = super::load_embedded(context, embedded::DECODE_SMALL_CUBIN, embedded::DECODE_SMALL_PTX).ok()?;
    for g in GROUPS {
        for suffix in ["f32", "bf16", "f16"] {
            let name = format!("decode_attention_small_g{g}_{suffix}");
            let f = module.load_function(&name).ok()?;
            functions.insert(name, f);
        }
    }
    Some(module)
}

/// Shared memory bytes of a launch, or None when the kernel does not serve this geometry
/// (group size not instantiated, head_dim not a power-of-two count of 16-byte chunks of
/// at most a warp, or too much shared memory).
fn shared_bytes(dtype: DType, dims: &AttentionDims) -> Option<usize> {
    let size = dtype.size_in_bytes();
    let vec = 16 / size;
    let hd = dims.head_dim;
    if dims.num_kv_heads == 0 || !dims.num_heads.is_multiple_of(dims.num_kv_heads) || hd == 0 {
        return None;
    }
    let group = dims.num_heads / dims.num_kv_heads;
    let chunks = hd / vec;
    if !GROUPS.contains(&group) || !hd.is_multiple_of(vec) || !chunks.is_power_of_two() || chunks > 32 {
        return None;
    }
    let scratch = ((group + 2) * hd).max(DS_WARPS * group * (hd + 2));
    // Queries, this token's key and value, the block's merged output and statistics, scratch.
    let bytes = 4 * group * hd + 2 * hd * size + 4 * (group * hd + 2 * group) + 4 * scratch;
    (bytes <= MAX_SHARED).then_some(bytes)
}

/// Whether a captured decode step of `rows` sequences takes this path (this module's
/// cluster kernel or decode_heads', see decode_heads::serves).
pub fn serves(k: &Kernels, dtype: DType, rows: usize, dims: &AttentionDims) -> bool {
    k.decode_small
        && (1..=MAX_ROWS).contains(&rows)
        && (decode_heads::serves(k, dtype, dims) || shared_bytes(dtype, dims).is_some())
}

/// qkv_prepare + paged_attention for `n` decode tokens, one per sequence: queries from the
/// fused qkv rows at `p.qkv` (p.q_out is not written), keys and values into the cache,
/// attention output [n, heads * head_dim] at `out`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    p: &QkvPtrs,
    out: u64,
    meta: &MetaPtrs,
    n: usize,
    dims: &AttentionDims,
    eps: f32,
) -> Result<()> {
    if decode_heads::serves(k, dtype, dims) {
        return decode_heads::launch(k, dtype, p, out, meta, n, dims, eps);
    }
    let shared = shared_bytes(dtype, dims)
        .ok_or_else(|| EngineError::internal("decode_attention_small: unsupported attention geometry"))?;
    let group = dims.num_heads / dims.num_kv_heads;
    let f = k.function(&format!("decode_attention_small_g{group}"), dtype)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_kv_heads as u32, DS_CLUSTER),
        block_dim: (DS_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    launch_fused(
        k,
        f,
        "decode_attention_small",
        cfg,
        p,
        out,
        meta,
        dims,
        eps,
        i32::from(k.ds_early),
    )
}

/// Launches a decode attention kernel with qkv_prepare fused in: decode_attention_small_g*
/// and decode_attention_heads take the same parameters up to the last, `last` (the
/// early-loads flag, the rows per chunk).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_fused(
    k: &Kernels,
    f: &CudaFunction,
    name: &str,
    cfg: LaunchConfig,
    p: &QkvPtrs,
    out: u64,
    meta: &MetaPtrs,
    dims: &AttentionDims,
    eps: f32,
    last: i32,
) -> Result<()> {
    let ptrs = [
        out,
        p.qkv,
        p.bias,
        p.q_norm,
        p.k_norm,
        p.cos,
        p.sin,
        meta.positions,
        meta.token_seq,
        meta.block_tables,
    ];
    let (max_blocks, block_size) = (meta.max_blocks as i32, meta.block_size as i32);
    let caches = [p.k_cache, p.v_cache];
    let ints = [dims.num_heads as i32, dims.num_kv_heads as i32, dims.head_dim as i32];
    let window = dims.window as i32;
    use super::pdl::arg;
    let mut params: Vec<_> = ptrs.iter().map(arg).collect();
    params.extend([arg(&max_blocks), arg(&block_size)]);
    params.extend(caches.iter().map(arg));
    params.extend(ints.iter().map(arg));
    params.extend([arg(&dims.scale), arg(&window), arg(&eps), arg(&last)]);
    // SAFETY: the parameters are the kernel's, in order; before its pdl_wait it reads only
    // step metadata, cache rows of earlier steps and weights (bias, rotary tables).
    unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, name, k.pdl) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_benchmark_shapes_and_refuses_the_rest() {
        // Qwen2.5-0.5B (W3) and Qwen3-0.6B (W1) in bf16, the tiny fixtures in f32.
        assert!(shared_bytes(DType::BF16, &AttentionDims::unscaled(14, 2, 64)).is_some());
        assert!(shared_bytes(DType::BF16, &AttentionDims::unscaled(16, 8, 128)).is_some());
        assert!(shared_bytes(DType::F32, &AttentionDims::unscaled(4, 2, 16)).is_some());
        // Group 3 is not instantiated; head_dim 80 is 10 chunks, f32 head_dim 256 is 64.
        assert!(shared_bytes(DType::BF16, &AttentionDims::unscaled(6, 2, 64)).is_none());
        assert!(shared_bytes(DType::BF16, &AttentionDims::unscaled(4, 4, 80)).is_none());
        assert!(shared_bytes(DType::F32, &AttentionDims::unscaled(64, 8, 256)).is_none());
    }
}
