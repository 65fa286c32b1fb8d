//! Launchers of the kernels in kernels/ops.cu. Each checks what it can about its operands,
//! allocates its output on the stream's pool and launches on candle's stream.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Tensor};

use super::{device_ptr, optional_ptr, Kernels};
use crate::error::{EngineError, Result};

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Must match ATT_THREADS, ATT_TILE, ATT_MAX_OUT, ATT_MAX_HEAD_DIM and ATT_MAX_GROUP in ops.cu.
const ATT_THREADS: u32 = 128;
const ATT_TILE: usize = 128;
const ATT_MAX_OUT: usize = 16;
pub const ATT_MAX_HEAD_DIM: usize = 256;
pub const ATT_MAX_GROUP: usize = 8;
/// Queries per KV head the attention kernel holds (ATT_MAX_OUT * ATT_THREADS / head_dim).
pub const ATT_MAX_GROUP_WIDTH: usize = ATT_MAX_OUT * ATT_THREADS as usize;
/// Aim for at least this many attention blocks (two waves on a 132-SM H100/H200) before
/// splitting contexts.
const ATT_TARGET_BLOCKS: usize = 264;

/// The per-token metadata of one step on the device, shared by every layer.
pub struct StepMeta {
    pub num_tokens: usize,
    /// u32 [num_tokens]: absolute position of each token.
    pub positions: Tensor,
    /// u32 [num_tokens]: index of each token's sequence (its row of block_tables).
    pub token_seq: Tensor,
    /// u32 [num_seqs, max_blocks]: block tables, padded with 0.
    pub block_tables: Tensor,
    pub max_blocks: usize,
    pub block_size: usize,
    /// The longest context any token attends over (for splitting).
    pub max_context: usize,
}

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// 0: no sliding window.
    pub window: usize,
}

fn launch_err(name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA kernel {name} failed to launch: {e}"))
}

fn grid(blocks: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// An uninitialised tensor; every caller's kernel writes all of it.
fn empty(shape: (usize, usize), dtype: DType, like: &Tensor) -> Result<Tensor> {
    // SAFETY: the kernel launched next writes every element before anything reads it.
    Ok(unsafe { Tensor::empty(shape, dtype, like.device())? })
}

/// Rows `ids` of `table` [vocab, hidden].
pub fn embedding(k: &Kernels, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, hidden) = table.dims2()?;
    let n = ids.elem_count();
    let out = empty((n, hidden), table.dtype(), table)?;
    if n == 0 {
        return Ok(out);
    }
    let f = k.function("embedding", table.dtype())?;
    let (o, t, i, h) = (device_ptr(&out)?, device_ptr(table)?, device_ptr(ids)?, hidden as i32);
    let mut b = k.stream().launch_builder(f);
    b.arg(&o).arg(&t).arg(&i).arg(&h);
    unsafe { b.launch(grid(n, ROW_THREADS, 0)) }.map_err(|e| launch_err("embedding", e))?;
    Ok(out)
}

/// Rows `rows` (u32) of `src` [n, width].
pub fn gather_rows(k: &Kernels, src: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let (_, width) = src.dims2()?;
    let r = rows.elem_count();
    let out = empty((r, width), src.dtype(), src)?;
    if r == 0 {
        return Ok(out);
    }
    let f = k.function("gather_rows", src.dtype())?;
    let (o, s, i, w) = (device_ptr(&out)?, device_ptr(src)?, device_ptr(rows)?, width as i32);
    let mut b = k.stream().launch_builder(f);
    b.arg(&o).arg(&s).arg(&i).arg(&w);
    unsafe { b.launch(grid(r, ROW_THREADS, 0)) }.map_err(|e| launch_err("gather_rows", e))?;
    Ok(out)
}

/// `residual += delta` in place (when given), then RMSNorm of `residual` with `weight`.
pub fn add_rms_norm(
    k: &Kernels,
    residual: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (n, hidden) = residual.dims2()?;
    if let Some(d) = delta {
        if d.dims2()? != (n, hidden) || d.dtype() != residual.dtype() {
            return Err(EngineError::internal("add_rms_norm: delta does not match the residual"));
        }
    }
    let out = empty((n, hidden), residual.dtype(), residual)?;
    if n == 0 {
        return Ok(out);
    }
    let f = k.function("add_rms_norm", residual.dtype())?;
    let (r, d, w, o) = (
        device_ptr(residual)?,
        optional_ptr(delta)?,
        device_ptr(weight)?,
        device_ptr(&out)?,
    );
    let h = hidden as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&r).arg(&d).arg(&w).arg(&o).arg(&h).arg(&eps);
    unsafe { b.launch(grid(n, ROW_THREADS, 0)) }.map_err(|e| launch_err("add_rms_norm", e))?;
    Ok(out)
}

/// silu(gate) * up from fused [n, 2 * inter] rows.
pub fn silu_mul(k: &Kernels, gate_up: &Tensor) -> Result<Tensor> {
    let (n, width) = gate_up.dims2()?;
    let inter = width / 2;
    let out = empty((n, inter), gate_up.dtype(), gate_up)?;
    let total = (n * inter) as i64;
    if total == 0 {
        return Ok(out);
    }
    let f = k.function("silu_mul", gate_up.dtype())?;
    let (o, g, i) = (device_ptr(&out)?, device_ptr(gate_up)?, inter as i32);
    let blocks = (total as usize).div_ceil(ROW_THREADS as usize).min(65_535);
    let mut b = k.stream().launch_builder(f);
    b.arg(&o).arg(&g).arg(&i).arg(&total);
    unsafe { b.launch(grid(blocks, ROW_THREADS, 0)) }.map_err(|e| launch_err("silu_mul", e))?;
    Ok(out)
}

/// Optional per-layer operands of `qkv_prepare`.
pub struct QkvExtras<'a> {
    pub bias: Option<&'a Tensor>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    pub eps: f32,
}

/// From fused qkv rows: queries [n, heads * head_dim] (biased, normed, rotated); keys and
/// values written into the layer's cache at each token's slot.
#[allow(clippy::too_many_arguments)]
pub fn qkv_prepare(
    k: &Kernels,
    qkv: &Tensor,
    extras: &QkvExtras,
    cos: &Tensor,
    sin: &Tensor,
    meta: &StepMeta,
    k_cache: &Tensor,
    v_cache: &Tensor,
    dims: &AttentionDims,
) -> Result<Tensor> {
    let (n, width) = qkv.dims2()?;
    if width != (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim || n != meta.num_tokens {
        return Err(EngineError::internal("qkv_prepare: qkv rows do not match the model"));
    }
    let q = empty((n, dims.num_heads * dims.head_dim), qkv.dtype(), qkv)?;
    if n == 0 {
        return Ok(q);
    }
    let f = k.function("qkv_prepare", qkv.dtype())?;
    let ptrs = [
        device_ptr(qkv)?,
        optional_ptr(extras.bias)?,
        optional_ptr(extras.q_norm)?,
        optional_ptr(extras.k_norm)?,
        device_ptr(cos)?,
        device_ptr(sin)?,
        device_ptr(&meta.positions)?,
        device_ptr(&meta.token_seq)?,
        device_ptr(&meta.block_tables)?,
    ];
    let (max_blocks, block_size) = (meta.max_blocks as i32, meta.block_size as i32);
    let outs = [device_ptr(&q)?, device_ptr(k_cache)?, device_ptr(v_cache)?];
    let ints = [dims.num_heads as i32, dims.num_kv_heads as i32, dims.head_dim as i32];
    let mut b = k.stream().launch_builder(f);
    for p in &ptrs {
        b.arg(p);
    }
    b.arg(&max_blocks).arg(&block_size);
    for p in &outs {
        b.arg(p);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&extras.eps);
    let shared = width * 4;
    unsafe { b.launch(grid(n, ROW_THREADS, shared)) }.map_err(|e| launch_err("qkv_prepare", e))?;
    Ok(q)
}

/// How many pieces each context is split into so that a step has enough blocks in flight.
fn choose_splits(num_tokens: usize, dims: &AttentionDims, max_context: usize) -> (usize, usize) {
    let blocks = num_tokens * dims.num_kv_heads;
    let max_splits = max_context.div_ceil(ATT_TILE).max(1);
    let splits = ATT_TARGET_BLOCKS.div_ceil(blocks.max(1)).clamp(1, max_splits);
    // Whole tiles per split; recompute the count so no split is empty by construction.
    let partition = max_context.div_ceil(splits).div_ceil(ATT_TILE) * ATT_TILE;
    let partition = partition.max(ATT_TILE);
    (max_context.div_ceil(partition).max(1), partition)
}

/// Causal paged attention of every query token over its sequence's cached positions.
pub fn paged_attention(
    k: &Kernels,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &StepMeta,
    dims: &AttentionDims,
) -> Result<Tensor> {
    let n = meta.num_tokens;
    let group = dims.num_heads / dims.num_kv_heads;
    let out = empty((n, dims.num_heads * dims.head_dim), q.dtype(), q)?;
    if n == 0 {
        return Ok(out);
    }
    let (splits, partition) = choose_splits(n, dims, meta.max_context);
    let device = q.device();
    // Partial sums only when contexts are split; otherwise the kernel writes `out` directly.
    let partials = if splits > 1 {
        // SAFETY: paged_attention writes every split's partials before the reduce reads them.
        unsafe {
            Some((
                Tensor::empty(n * dims.num_heads * splits * dims.head_dim, DType::F32, device)?,
                Tensor::empty(n * dims.num_heads * splits * 2, DType::F32, device)?,
            ))
        }
    } else {
        None
    };
    let (acc_ptr, ml_ptr) = match &partials {
        Some((acc, ml)) => (device_ptr(acc)?, device_ptr(ml)?),
        None => (0, 0),
    };
    let f = k.function("paged_attention", q.dtype())?;
    let ptrs = [
        device_ptr(&out)?,
        acc_ptr,
        ml_ptr,
        device_ptr(q)?,
        device_ptr(k_cache)?,
        device_ptr(v_cache)?,
        device_ptr(&meta.positions)?,
        device_ptr(&meta.token_seq)?,
        device_ptr(&meta.block_tables)?,
    ];
    let ints = [
        meta.max_blocks as i32,
        meta.block_size as i32,
        dims.num_heads as i32,
        dims.num_kv_heads as i32,
        dims.head_dim as i32,
    ];
    let tail = [dims.window as i32, partition as i32, splits as i32];
    let mut b = k.stream().launch_builder(f);
    for p in &ptrs {
        b.arg(p);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&dims.scale);
    for i in &tail {
        b.arg(i);
    }
    // Floats: queries, scores, three per-head statistics (+ alignment), then 8-byte slots.
    let floats = group * dims.head_dim + group * ATT_TILE + 3 * group + (group & 1) + 2;
    let shared = floats * 4 + ATT_TILE * 8;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_kv_heads as u32, splits as u32),
        block_dim: (ATT_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    unsafe { b.launch(cfg) }.map_err(|e| launch_err("paged_attention", e))?;
    if splits > 1 {
        let f = k.function("attention_reduce", q.dtype())?;
        let ptrs = [device_ptr(&out)?, acc_ptr, ml_ptr];
        let ints = [dims.num_heads as i32, dims.head_dim as i32, splits as i32];
        let mut b = k.stream().launch_builder(f);
        for p in &ptrs {
            b.arg(p);
        }
        for i in &ints {
            b.arg(i);
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, dims.num_heads as u32, 1),
            block_dim: (dims.head_dim.min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(|e| launch_err("attention_reduce", e))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(kv: usize) -> AttentionDims {
        AttentionDims {
            num_heads: 8,
            num_kv_heads: kv,
            head_dim: 64,
            scale: 1.0,
            window: 0,
        }
    }

    #[test]
    fn splits_cover_the_context_with_whole_tiles() {
        for (tokens, ctx) in [(1, 640), (1, 1), (256, 900), (4096, 2048), (3, 65)] {
            let (splits, partition) = choose_splits(tokens, &dims(2), ctx);
            assert_eq!(partition % ATT_TILE, 0);
            assert!(splits * partition >= ctx, "{tokens} {ctx}");
            assert!((splits - 1) * partition < ctx, "{tokens} {ctx}: an empty split");
        }
        assert_eq!(choose_splits(4096, &dims(2), 2048).0, 1);
        assert!(choose_splits(1, &dims(2), 640).0 > 1);
    }
}
