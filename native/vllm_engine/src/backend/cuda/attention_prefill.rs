//! Launcher of kernels/attention_prefill.cu: flash-style paged attention on the tensor
//! cores for steps with prefill chunks (bf16 / f16, head_dim 64 or 128), a block per
//! (tile of query tokens of one sequence, KV head). The host lists the tiles with the
//! step's metadata (`ForwardBatch::query_tiles`); decode rows of a mixed step are tiles of
//! one token.
//!
//! `VLLM_ATT_PREFILL=0` sends those steps through attention_batch / paged_attention_v2 as
//! before (a query token at a time over its whole context), to compare.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use candle_core::DType;

use super::ops::{AttentionDims, MetaPtrs};
use super::{embedded, Kernels};
use crate::error::{EngineError, Result};

/// Must match AP_WARPS in attention_prefill.cu; each warp holds 16 query rows.
const WARPS: usize = 4;
const ROWS_PER_WARP: usize = 16;
/// Head sizes instantiated.
const HEAD_DIMS: [usize; 2] = [64, 128];

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VLLM_ATT_PREFILL").is_none_or(|v| v != "0"))
}

/// Loads the module and adds its functions; None (prefill keeps the other kernels) when
/// it does not load.
pub(super) fn load_into(
    context: &Arc<CudaContext>,
    functions: &mut HashMap<String, CudaFunction>,
) -> Option<Arc<CudaModule>> {
    let module = super::load_embedded(
        context,
        embedded::ATTENTION_PREFILL_CUBIN,
        embedded::ATTENTION_PREFILL_PTX,
    )
    .ok()?;
    for d in HEAD_DIMS {
        for suffix in ["bf16", "f16"] {
            let name = format!("attention_prefill_d{d}_{suffix}");
            let f = module.load_function(&name).ok()?;
            functions.insert(name, f);
        }
    }
    Some(module)
}

/// Query tokens per tile for this geometry, None when the kernel does not serve it (off,
/// float32, a head size or group it has no form for).
pub fn tokens_per_tile(loaded: bool, dims: &AttentionDims, dtype: DType) -> Option<usize> {
    if !loaded || !enabled() || !matches!(dtype, DType::BF16 | DType::F16) || dims.num_kv_heads == 0 {
        return None;
    }
    let group = dims.num_heads / dims.num_kv_heads;
    let fits = dims.num_heads.is_multiple_of(dims.num_kv_heads)
        && (1..=ROWS_PER_WARP).contains(&group)
        && HEAD_DIMS.contains(&dims.head_dim);
    fits.then_some(WARPS * (ROWS_PER_WARP / group))
}

/// attention_prefill on raw device addresses: `out`, `q` [tokens, num_heads * head_dim],
/// `tiles` `num_tiles` pairs from `ForwardBatch::query_tiles`.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    out: u64,
    q: u64,
    k_cache: u64,
    v_cache: u64,
    meta: &MetaPtrs,
    tiles: u64,
    num_tiles: usize,
    dims: &AttentionDims,
) -> Result<()> {
    let f = k.function(&format!("attention_prefill_d{}", dims.head_dim), dtype)?;
    let ints = [
        meta.max_blocks as i32,
        meta.block_size as i32,
        dims.num_heads as i32,
        dims.num_kv_heads as i32,
    ];
    let window = dims.window as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&out)
        .arg(&q)
        .arg(&k_cache)
        .arg(&v_cache)
        .arg(&meta.positions)
        .arg(&meta.token_seq)
        .arg(&meta.block_tables);
    for i in &ints {
        b.arg(i);
    }
    b.arg(&dims.scale).arg(&window).arg(&tiles);
    let cfg = LaunchConfig {
        grid_dim: (num_tiles as u32, dims.num_kv_heads as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }
        .map_err(|e| EngineError::internal(format!("CUDA kernel attention_prefill failed to launch: {e}")))?;
    Ok(())
}
