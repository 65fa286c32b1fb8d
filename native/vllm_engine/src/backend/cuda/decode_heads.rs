//! Launcher of kernels/decode_heads.cu: decode attention for small batches, one block per
//! (sequence, query head), qkv_prepare fused in, the context's key and value rows staged in
//! shared memory by cp.async before pdl_wait. decode_small::launch hands over to it where
//! `Kernels::ds_heads` says so (VLLM_DS_KIND: `heads` everywhere, `cluster` never, default
//! for groups of at least MIN_GROUP query heads per KV head, where the cluster kernel's
//! per-SM arithmetic is largest). `VLLM_DS_SPLIT=n` (1, 2, 4, 8) cuts each head's context
//! into n ranges, one block each in a cluster of n (SPLITS, kernels/decode_heads.cu);
//! `VLLM_DS_TABLE=0` stages only a chunk's block-table entries, after the position, instead
//! of the whole row beside it. In bf16 / f16, head_dim 64 and 128 (rows of 8 and 16
//! sixteen-byte chunks) take kernels built for that row, which score on the tensor cores
//! (`VLLM_DS_TENSOR=0`: the kernels for any head_dim).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, LaunchConfig};
use candle_core::DType;

use super::ops::{AttentionDims, MetaPtrs, QkvPtrs};
use super::{decode_small, embedded, Kernels};
use crate::error::{EngineError, Result};

/// Must match DH_THREADS, DH_WARPS and DH_ROWS_PT in decode_heads.cu.
const DH_THREADS: usize = 256;
const DH_WARPS: usize = 8;
const DH_ROWS_PT: usize = 4;
/// Dynamic shared memory the kernels are opted in to (Hopper allows 227 KB a block).
const SHARED_LIMIT: usize = 200 * 1024;
/// Default: query heads per KV head from which the heads kernel replaces the cluster one.
const MIN_GROUP: usize = 4;

/// Which small-batch decode attention kernel serves a geometry (VLLM_DS_KIND).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Per geometry: heads for groups of at least MIN_GROUP.
    Auto,
    Heads,
    Cluster,
    /// Measurement only: the attention replaced by a copy of the query (wrong tokens), to
    /// time the step without it.
    Stub,
}

impl Kind {
    pub fn from_env() -> Self {
        match std::env::var("VLLM_DS_KIND").as_deref() {
            Ok("heads") => Kind::Heads,
            Ok("cluster") => Kind::Cluster,
            Ok("stub") => Kind::Stub,
            _ => Kind::Auto,
        }
    }
}

/// Context ranges a head's attention is cut into, each one block of a cluster (the
/// kernels' `decode_attention_heads_s{n}_*`; 1 is the plain kernel).
const SPLITS: [usize; 4] = [1, 2, 4, 8];
/// Default split (VLLM_DS_SPLIT overrides, one of SPLITS). On an H200: W3 0.677 -> 0.637 ms
/// with 4 (session 9); with the merge pushed by st.async and no fences, 0.404 with 4 against
/// 0.406 with 2, ~0.43 with 1 or 8 (bench/RESULTS.md, issue 7, session 21).
const DEFAULT_SPLIT: usize = 4;
/// Chunks a row the 16-bit kernels are also built for (`decode_attention_heads*_c{n}_*`).
const TENSOR_CHUNKS: [usize; 2] = [8, 16];
/// Must match DH_WHOLE_TABLE in decode_heads.cu: a flag in the kernels' `cap` argument.
const WHOLE_TABLE: i32 = 1 << 30;
/// Longest block-table row staged whole (VLLM_DS_TABLE=0: never).
const WHOLE_TABLE_MAX: usize = 1024;

fn whole_table_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VLLM_DS_TABLE").is_none_or(|v| v != "0"))
}

fn tensor_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VLLM_DS_TENSOR").is_none_or(|v| v != "0"))
}

/// The split of every launch: VLLM_DS_SPLIT, else DEFAULT_SPLIT.
fn split() -> usize {
    static SPLIT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = *SPLIT.get_or_init(|| {
        std::env::var("VLLM_DS_SPLIT")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| SPLITS.contains(n))
    });
    forced.unwrap_or(DEFAULT_SPLIT)
}

/// The 16-byte chunks of a row of `dims` in `dtype` when tensor-core kernels are built for
/// that row (and VLLM_DS_TENSOR allows them), else None.
fn tensor_chunks(dtype: DType, dims: &AttentionDims) -> Option<usize> {
    let bytes = dims.head_dim * dtype.size_in_bytes();
    let chunks = bytes / 16;
    (tensor_from_env() && dtype.size_in_bytes() == 2 && bytes.is_multiple_of(16) && TENSOR_CHUNKS.contains(&chunks))
        .then_some(chunks)
}

fn kernel_name(split: usize, chunks: Option<usize>) -> String {
    let mut name = "decode_attention_heads".to_string();
    if split > 1 {
        name += &format!("_s{split}");
    }
    if let Some(c) = chunks {
        name += &format!("_c{c}");
    }
    name
}

/// Loads the module, opts its functions in to SHARED_LIMIT bytes of dynamic shared memory
/// and adds them to `functions`; None (the cluster kernel stays) when any step fails.
pub(super) fn load_into(
    context: &Arc<CudaContext>,
    functions: &mut HashMap<String, CudaFunction>,
) -> Option<Arc<CudaModule>> {
    let module = super::load_embedded(context, embedded::DECODE_HEADS_CUBIN, embedded::DECODE_HEADS_PTX).ok()?;
    for suffix in ["f32", "bf16", "f16"] {
        let stub = format!("decode_attention_stub_{suffix}");
        functions.insert(stub.clone(), module.load_function(&stub).ok()?);
        let chunks: &[usize] = if suffix == "f32" { &[] } else { &TENSOR_CHUNKS };
        let variants = SPLITS.iter().flat_map(|&split| {
            std::iter::once(None)
                .chain(chunks.iter().map(|&c| Some(c)))
                .map(move |c| kernel_name(split, c))
        });
        for base in variants {
            let name = format!("{base}_{suffix}");
            let f = module.load_function(&name).ok()?;
            // SAFETY: a valid function of a loaded module; the attribute is a plain integer.
            let r = unsafe {
                sys::cuFuncSetAttribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    SHARED_LIMIT as i32,
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            functions.insert(name, f);
        }
    }
    Some(module)
}

/// Must match DH_RECV in decode_heads.cu: shared floats where rank 0 of a split's cluster
/// receives the other ranks' partials, with its mbarrier.
fn recv_floats(split: usize, hd: usize) -> usize {
    if split > 1 {
        ((split - 1) * (hd + 2) + 2).div_ceil(4) * 4
    } else {
        0
    }
}

/// Rows of context one chunk of shared memory holds for this launch, and its bytes; None
/// when the kernel does not serve the geometry (head_dim not a power-of-two count of
/// 16-byte chunks of at most a warp, or larger than the block). `split`: the context
/// ranges (rank 0 of more than one receives the others' partials); `max_context`: the most
/// positions a block can hold (block-table width times block size, over the split);
/// `max_rows`: the VLLM_DS_ROWS cap, if any; `table_entries`: block-table entries staged
/// whole (0: the chunk's only).
fn plan(
    dtype: DType,
    dims: &AttentionDims,
    split: usize,
    max_context: usize,
    block_size: usize,
    max_rows: Option<usize>,
    table_entries: usize,
) -> Option<(usize, usize)> {
    let size = dtype.size_in_bytes();
    let vec = 16 / size;
    let hd = dims.head_dim;
    if dims.num_kv_heads == 0 || !dims.num_heads.is_multiple_of(dims.num_kv_heads) || hd == 0 || block_size == 0 {
        return None;
    }
    let chunks = hd / vec;
    if !hd.is_multiple_of(vec) || !chunks.is_power_of_two() || chunks > 32 || hd > DH_THREADS {
        return None;
    }
    let bytes_for = |cap: usize| {
        let buffers = 2 * cap * hd * size;
        let floats = hd + 3 * hd + cap + (DH_WARPS * vec).max(hd) + 20 + recv_floats(split, hd);
        buffers + 4 * floats + 2 * hd * size + 4 * (cap / block_size + 2).max(table_entries)
    };
    let mut cap = max_context.clamp(1, DH_THREADS * DH_ROWS_PT);
    if let Some(m) = max_rows {
        cap = cap.min(m.max(4));
    }
    cap = cap.div_ceil(4) * 4;
    while cap > 4 && bytes_for(cap) > SHARED_LIMIT {
        cap -= 4;
    }
    let bytes = bytes_for(cap);
    (bytes <= SHARED_LIMIT).then_some((cap, bytes))
}

/// Whether this kernel takes a captured decode step's attention (decode_small::serves
/// already holds: the batch is small and every row a sequence's one decode token).
pub fn serves(k: &Kernels, dtype: DType, dims: &AttentionDims) -> bool {
    let group = dims.num_heads.checked_div(dims.num_kv_heads).unwrap_or(0);
    let wanted = match k.ds_kind {
        Kind::Heads | Kind::Stub => true,
        Kind::Cluster => false,
        Kind::Auto => group >= MIN_GROUP,
    };
    // A block-size-1 plan stands in for the real one: serving depends on head_dim only.
    k.ds_heads_loaded && wanted && plan(dtype, dims, 1, 1, 1, None, 0).is_some()
}

/// As decode_small::launch: `n` decode tokens, one per sequence; queries from the fused
/// qkv rows at `p.qkv`, keys and values into the cache, output [n, heads * head_dim].
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
    let chunks = tensor_chunks(dtype, dims);
    let split = split();
    // Each block holds at most its range of the longest context.
    let max_context = (meta.max_blocks * meta.block_size).div_ceil(split);
    // graphs.rs (the only caller) maps row t to sequence t, as the whole-table form assumes.
    let whole_table = whole_table_from_env() && meta.max_blocks <= WHOLE_TABLE_MAX;
    let table_entries = if whole_table { meta.max_blocks } else { 0 };
    let (cap, shared) = plan(
        dtype,
        dims,
        split,
        max_context,
        meta.block_size,
        k.ds_rows,
        table_entries,
    )
    .ok_or_else(|| EngineError::internal("decode_attention_heads: unsupported attention geometry"))?;
    if k.ds_kind == Kind::Stub {
        let f = k.function("decode_attention_stub", dtype)?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, dims.num_heads as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        return decode_small::launch_fused(k, f, "decode_attention_stub", cfg, p, out, meta, dims, eps, cap as i32);
    }
    let name = kernel_name(split, chunks);
    let f = k.function(&name, dtype)?;
    // Grid z: the context ranges, one cluster (the kernel's __cluster_dims__) per head.
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_heads as u32, split as u32),
        block_dim: (DH_THREADS as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let cap_arg = cap as i32 | if whole_table { WHOLE_TABLE } else { 0 };
    decode_small::launch_fused(k, f, &name, cfg, p, out, meta, dims, eps, cap_arg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_holds_w3s_whole_context_within_the_shared_memory_limit() {
        // Qwen2.5-0.5B in bf16 with W3's 1024-position limit: 256 bytes a row, so 200 KB
        // holds ~780 rows; W3's contexts end at 640.
        let (cap, bytes) = plan(DType::BF16, &AttentionDims::unscaled(14, 2, 64), 1, 1024, 16, None, 0).unwrap();
        assert!((640..1024).contains(&cap), "cap {cap}");
        assert!(bytes <= SHARED_LIMIT);
        // A short limit keeps the chunk to the context; VLLM_DS_ROWS caps it (multiple of 4).
        assert_eq!(
            plan(DType::BF16, &AttentionDims::unscaled(14, 2, 64), 1, 96, 16, None, 0)
                .unwrap()
                .0,
            96
        );
        assert_eq!(
            plan(DType::F32, &AttentionDims::unscaled(4, 2, 16), 1, 1024, 16, Some(30), 0)
                .unwrap()
                .0,
            32
        );
        // Qwen3-0.6B (head_dim 128) fits too, with fewer rows.
        assert!(plan(DType::BF16, &AttentionDims::unscaled(16, 8, 128), 1, 4096, 16, None, 0).is_some());
    }

    #[test]
    fn the_whole_table_row_and_a_splits_partials_take_shared_memory_beside_the_rows() {
        let dims = AttentionDims::unscaled(14, 2, 64);
        let (cap, plain) = plan(DType::BF16, &dims, 1, 256, 16, None, 0).unwrap();
        let (cap_whole, whole) = plan(DType::BF16, &dims, 1, 256, 16, None, 1024).unwrap();
        let (cap_split, split4) = plan(DType::BF16, &dims, 4, 256, 16, None, 0).unwrap();
        assert_eq!((cap_whole, cap_split), (cap, cap));
        // The chunk's own entries (cap / 16 + 2) are replaced by the row's 1024.
        assert_eq!(whole - plain, 4 * (1024 - (cap / 16 + 2)));
        // Rank 0 receives three ranks' 64 sums, max and sum, then its mbarrier (8 bytes),
        // to a multiple of 16 bytes.
        assert_eq!(split4 - plain, 4 * 200);
    }

    #[test]
    fn head_dims_64_and_128_in_16_bits_take_the_tensor_core_kernels() {
        if std::env::var_os("VLLM_DS_TENSOR").is_some() || std::env::var_os("VLLM_DS_SPLIT").is_some() {
            return;
        }
        assert_eq!(tensor_chunks(DType::BF16, &AttentionDims::unscaled(14, 2, 64)), Some(8));
        assert_eq!(
            tensor_chunks(DType::F16, &AttentionDims::unscaled(32, 8, 128)),
            Some(16)
        );
        // float32 rows (the tiny fixtures' head_dim 32 is 8 chunks too) and other lengths keep
        // the kernels for any head_dim.
        assert_eq!(tensor_chunks(DType::F32, &AttentionDims::unscaled(4, 2, 32)), None);
        assert_eq!(tensor_chunks(DType::BF16, &AttentionDims::unscaled(4, 2, 32)), None);
        assert_eq!(tensor_chunks(DType::BF16, &AttentionDims::unscaled(4, 2, 68)), None);
        assert_eq!(kernel_name(1, Some(8)), "decode_attention_heads_c8");
        assert_eq!(kernel_name(4, Some(16)), "decode_attention_heads_s4_c16");
        assert_eq!(kernel_name(2, None), "decode_attention_heads_s2");
    }

    #[test]
    fn refuses_head_dims_the_kernel_cannot_split() {
        // 80 is 10 chunks of 8 bf16; f32 head_dim 256 is 64 chunks.
        assert!(plan(DType::BF16, &AttentionDims::unscaled(4, 4, 80), 1, 1024, 16, None, 0).is_none());
        assert!(plan(DType::F32, &AttentionDims::unscaled(64, 8, 256), 1, 1024, 16, None, 0).is_none());
        assert!(plan(DType::BF16, &AttentionDims::unscaled(4, 0, 64), 1, 1024, 16, None, 0).is_none());
    }
}
