//! Launchers of the kernels in kernels/ops.cu. Each checks what it can about its operands,
//! allocates its output on the stream's pool and launches on candle's stream.

use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::{DType, Tensor};

use super::blas::Blas;
use super::{attention_batch, attention_prefill, device_ptr, optional_ptr, Kernels};
use crate::error::{EngineError, Result};

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;
/// Must match ARGMAX_THREADS in ops.cu.
const ARGMAX_THREADS: u32 = 1024;
/// Must match ATT_THREADS, ATT_TILE, ATT_MAX_OUT, ATT_MAX_HEAD_DIM and ATT_MAX_GROUP in ops.cu.
const ATT_THREADS: u32 = 128;
const ATT_TILE: usize = 128;
const ATT_MAX_OUT: usize = 16;
pub const ATT_MAX_HEAD_DIM: usize = 256;
pub const ATT_MAX_GROUP: usize = 8;
/// Queries per KV head the attention kernel holds (ATT_MAX_OUT * ATT_THREADS / head_dim).
pub const ATT_MAX_GROUP_WIDTH: usize = ATT_MAX_OUT * ATT_THREADS as usize;
/// Splits the kernel combines itself at most (ATT_MAX_REDUCE_SPLITS in ops.cu); more go
/// through attention_reduce.
const ATT_MAX_REDUCE_SPLITS: usize = 16;
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
    /// Steps with prefill chunks, when attention_prefill serves the model: its tiles (u32
    /// pairs: first token, token count) and how many.
    pub prefill_tiles: Option<(Tensor, usize)>,
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

#[cfg(test)]
impl AttentionDims {
    /// A geometry with scale 1 and no window, for the launchers' unit tests.
    pub fn unscaled(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        AttentionDims {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0,
            window: 0,
        }
    }
}

fn launch_err(name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA kernel {name} failed to launch: {e}"))
}

pub(super) fn grid(blocks: usize, threads: u32, shared: usize) -> LaunchConfig {
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
    let out = empty((n, hidden), DType::F32, table)?;
    if n == 0 {
        return Ok(out);
    }
    launch_embedding(
        k,
        table.dtype(),
        device_ptr(&out)?,
        device_ptr(table)?,
        device_ptr(ids)?,
        n,
        hidden,
    )?;
    Ok(out)
}

/// `embedding` on raw device addresses: rows `ids[..n]` of `table` (in `dtype`) into `out`,
/// the float32 residual stream.
pub fn launch_embedding(
    k: &Kernels,
    dtype: DType,
    out: u64,
    table: u64,
    ids: u64,
    n: usize,
    hidden: usize,
) -> Result<()> {
    let f = k.function("embedding", dtype)?;
    let h = hidden as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&out).arg(&table).arg(&ids).arg(&h);
    unsafe { b.launch(grid(n, ROW_THREADS, 0)) }.map_err(|e| launch_err("embedding", e))?;
    Ok(())
}

/// Marks an id of `launch_graph_embedding` as a row of `ahead` (EMBED_AHEAD in kernels/ops.cu).
pub const EMBED_AHEAD: u32 = 0x8000_0000;

/// A decode graph's first kernel: the step's inputs from `staged` (page-locked host memory,
/// replay_slots.rs's layout) into `meta` (the graph buffers' layout, rows 0..n), then
/// `launch_embedding`'s rows with the ids read from there, an id `EMBED_AHEAD | j` taking
/// its token from `ahead[j]`.
#[allow(clippy::too_many_arguments)]
pub fn launch_graph_embedding(
    k: &Kernels,
    dtype: DType,
    (out, table): (u64, u64),
    (staged, meta, ahead): (u64, u64, u64),
    n: usize,
    hidden: usize,
    max_batch: usize,
    max_blocks: usize,
) -> Result<()> {
    let f = k.function("graph_embedding", dtype)?;
    let (h, mb, mbl) = (hidden as i32, max_batch as i32, max_blocks as i32);
    let mut b = k.stream().launch_builder(f);
    b.arg(&out)
        .arg(&table)
        .arg(&staged)
        .arg(&meta)
        .arg(&ahead)
        .arg(&h)
        .arg(&mb)
        .arg(&mbl);
    unsafe { b.launch(grid(n, ROW_THREADS, 0)) }.map_err(|e| launch_err("graph_embedding", e))?;
    Ok(())
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
    let dtype = weight.dtype();
    if residual.dtype() != DType::F32 {
        return Err(EngineError::internal("add_rms_norm: the residual stream is float32"));
    }
    if let Some(d) = delta {
        if d.dims2()? != (n, hidden) || d.dtype() != dtype {
            return Err(EngineError::internal("add_rms_norm: delta does not match the residual"));
        }
    }
    let out = empty((n, hidden), dtype, residual)?;
    if n == 0 {
        return Ok(out);
    }
    let rows = RowsPtrs {
        residual: device_ptr(residual)?,
        delta: optional_ptr(delta)?,
        weight: device_ptr(weight)?,
        out: device_ptr(&out)?,
    };
    launch_add_rms_norm(k, dtype, &rows, n, hidden, eps)?;
    Ok(out)
}

/// Operands of `add_rms_norm` as device addresses (`delta` 0: none); `residual` is float32,
/// the others in the model's dtype.
pub struct RowsPtrs {
    pub residual: u64,
    pub delta: u64,
    pub weight: u64,
    pub out: u64,
}

/// `add_rms_norm` on raw device addresses, `n` rows of `hidden`.
pub fn launch_add_rms_norm(k: &Kernels, dtype: DType, p: &RowsPtrs, n: usize, hidden: usize, eps: f32) -> Result<()> {
    let f = k.function("add_rms_norm", dtype)?;
    let h = hidden as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&p.residual)
        .arg(&p.delta)
        .arg(&p.weight)
        .arg(&p.out)
        .arg(&h)
        .arg(&eps);
    unsafe { b.launch(grid(n, ROW_THREADS, 0)) }.map_err(|e| launch_err("add_rms_norm", e))?;
    Ok(())
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
    launch_silu_mul(k, gate_up.dtype(), device_ptr(&out)?, device_ptr(gate_up)?, n, inter)?;
    Ok(out)
}

/// `silu_mul` on raw device addresses: `n` rows of 2 * `inter` into `n` rows of `inter`.
pub fn launch_silu_mul(k: &Kernels, dtype: DType, out: u64, gate_up: u64, n: usize, inter: usize) -> Result<()> {
    let total = (n * inter) as i64;
    let f = k.function("silu_mul", dtype)?;
    let i = inter as i32;
    let blocks = (total as usize).div_ceil(ROW_THREADS as usize).clamp(1, 65_535);
    let mut b = k.stream().launch_builder(f);
    b.arg(&out).arg(&gate_up).arg(&i).arg(&total);
    unsafe { b.launch(grid(blocks, ROW_THREADS, 0)) }.map_err(|e| launch_err("silu_mul", e))?;
    Ok(())
}

/// Optional per-layer operands of `qkv_prepare`.
pub struct QkvExtras<'a> {
    pub bias: Option<&'a Tensor>,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    pub eps: f32,
}

/// Step metadata as device addresses (what the kernels read).
#[derive(Debug, Clone, Copy)]
pub struct MetaPtrs {
    pub positions: u64,
    pub token_seq: u64,
    pub block_tables: u64,
    /// Row stride of block_tables.
    pub max_blocks: usize,
    pub block_size: usize,
}

impl StepMeta {
    pub fn ptrs(&self) -> Result<MetaPtrs> {
        Ok(MetaPtrs {
            positions: device_ptr(&self.positions)?,
            token_seq: device_ptr(&self.token_seq)?,
            block_tables: device_ptr(&self.block_tables)?,
            max_blocks: self.max_blocks,
            block_size: self.block_size,
        })
    }
}

/// Operands of `qkv_prepare` as device addresses (bias and norms 0 when absent).
pub struct QkvPtrs {
    pub qkv: u64,
    pub bias: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub cos: u64,
    pub sin: u64,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
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
    let p = QkvPtrs {
        qkv: device_ptr(qkv)?,
        bias: optional_ptr(extras.bias)?,
        q_norm: optional_ptr(extras.q_norm)?,
        k_norm: optional_ptr(extras.k_norm)?,
        cos: device_ptr(cos)?,
        sin: device_ptr(sin)?,
        q_out: device_ptr(&q)?,
        k_cache: device_ptr(k_cache)?,
        v_cache: device_ptr(v_cache)?,
    };
    launch_qkv_prepare(k, qkv.dtype(), &p, &meta.ptrs()?, n, dims, extras.eps)?;
    Ok(q)
}

/// `qkv_prepare` on raw device addresses for `n` tokens.
pub fn launch_qkv_prepare(
    k: &Kernels,
    dtype: DType,
    p: &QkvPtrs,
    meta: &MetaPtrs,
    n: usize,
    dims: &AttentionDims,
    eps: f32,
) -> Result<()> {
    let width = (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim;
    let f = k.function("qkv_prepare", dtype)?;
    let ptrs = [
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
    let outs = [p.q_out, p.k_cache, p.v_cache];
    let ints = [dims.num_heads as i32, dims.num_kv_heads as i32, dims.head_dim as i32];
    let mut b = k.stream().launch_builder(f);
    for ptr in &ptrs {
        b.arg(ptr);
    }
    b.arg(&max_blocks).arg(&block_size);
    for ptr in &outs {
        b.arg(ptr);
    }
    for i in &ints {
        b.arg(i);
    }
    b.arg(&eps);
    let shared = width * 4;
    unsafe { b.launch(grid(n, ROW_THREADS, shared)) }.map_err(|e| launch_err("qkv_prepare", e))?;
    Ok(())
}

/// How many pieces each context is split into so that a step has enough blocks in flight,
/// and the positions each piece covers: (splits, partition).
pub fn choose_splits(num_tokens: usize, dims: &AttentionDims, max_context: usize) -> (usize, usize) {
    let blocks = num_tokens * dims.num_kv_heads;
    let max_splits = max_context.div_ceil(ATT_TILE).max(1);
    let splits = ATT_TARGET_BLOCKS.div_ceil(blocks.max(1)).clamp(1, max_splits);
    // Whole tiles per split; recompute the count so no split is empty by construction.
    let partition = max_context.div_ceil(splits).div_ceil(ATT_TILE) * ATT_TILE;
    let partition = partition.max(ATT_TILE);
    (max_context.div_ceil(partition).max(1), partition)
}

/// The split of a captured decode step of `batch` rows, which must serve every context up
/// to `max_model_len`: small batches split into single tiles (the splits past a context
/// return at once, so the work follows the actual context), large ones as `choose_splits`.
/// Batches attention_batch takes split into its fixed partition instead.
pub fn graph_splits(batch: usize, dims: &AttentionDims, dtype: DType, max_model_len: usize) -> (usize, usize) {
    if let Some(partition) = attention_batch::partition_for(batch, dims, dtype) {
        attention_batch::splits_for(max_model_len, partition)
    } else if batch * dims.num_kv_heads < ATT_TARGET_BLOCKS / 2 {
        (max_model_len.div_ceil(ATT_TILE).max(1), ATT_TILE)
    } else {
        choose_splits(batch, dims, max_model_len)
    }
}

/// Float32 elements of the two partial-sum buffers `paged_attention` needs for `n` tokens
/// split `splits` ways: (accumulators, max and denominator pairs).
pub fn partials_len(n: usize, dims: &AttentionDims, splits: usize) -> (usize, usize) {
    (
        n * dims.num_heads * splits * dims.head_dim,
        n * dims.num_heads * splits * 2,
    )
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
    let out = empty((n, dims.num_heads * dims.head_dim), q.dtype(), q)?;
    if n == 0 {
        return Ok(out);
    }
    if let Some((tiles, num_tiles)) = &meta.prefill_tiles {
        attention_prefill::launch(
            k,
            q.dtype(),
            device_ptr(&out)?,
            device_ptr(q)?,
            device_ptr(k_cache)?,
            device_ptr(v_cache)?,
            &meta.ptrs()?,
            device_ptr(tiles)?,
            *num_tiles,
            dims,
        )?;
        return Ok(out);
    }
    let (splits, partition) = match attention_batch::partition_for(n, dims, q.dtype()) {
        Some(partition) => attention_batch::splits_for(meta.max_context, partition),
        None => choose_splits(n, dims, meta.max_context),
    };
    let device = q.device();
    // Partial sums only when contexts are split; otherwise the kernel writes `out` directly.
    let partials = if splits > 1 {
        let (acc_len, ml_len) = partials_len(n, dims, splits);
        // SAFETY: paged_attention writes every split's partials before the reduce reads them.
        unsafe {
            Some((
                Tensor::empty(acc_len, DType::F32, device)?,
                Tensor::empty(ml_len, DType::F32, device)?,
            ))
        }
    } else {
        None
    };
    let (part_acc, part_ml) = match &partials {
        Some((acc, ml)) => (device_ptr(acc)?, device_ptr(ml)?),
        None => (0, 0),
    };
    // The splits' counters for the in-kernel reduce, zeroed here (the kernel leaves them so).
    let counts = if splits > 1 {
        Some(Tensor::zeros(n * dims.num_kv_heads, DType::U32, device)?)
    } else {
        None
    };
    let p = AttentionPtrs {
        out: device_ptr(&out)?,
        part_acc,
        part_ml,
        done_counts: optional_ptr(counts.as_ref())?,
        q: device_ptr(q)?,
        k_cache: device_ptr(k_cache)?,
        v_cache: device_ptr(v_cache)?,
    };
    launch_paged_attention(k, q.dtype(), &p, &meta.ptrs()?, n, dims, splits, partition)?;
    Ok(out)
}

/// Operands of `paged_attention` as device addresses; the partials are 0 when unsplit.
pub struct AttentionPtrs {
    pub out: u64,
    pub part_acc: u64,
    pub part_ml: u64,
    /// u32 [tokens * num_kv_heads], zero between launches (the kernel resets what it
    /// uses): with it, the last split of each head combines the splits itself (v2 only);
    /// 0: a separate attention_reduce launch.
    pub done_counts: u64,
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
}

/// The arguments every paged attention kernel takes first, in this order (ops.cu's
/// paged_attention and paged_attention_v2, attention_batch.cu): buffers and step metadata,
/// the geometry, the scale, then window, partition and splits.
pub struct AttentionArgs {
    ptrs: [u64; 9],
    ints: [i32; 5],
    scale: f32,
    tail: [i32; 3],
}

impl AttentionArgs {
    pub fn new(p: &AttentionPtrs, meta: &MetaPtrs, dims: &AttentionDims, partition: usize, splits: usize) -> Self {
        AttentionArgs {
            ptrs: [
                p.out,
                p.part_acc,
                p.part_ml,
                p.q,
                p.k_cache,
                p.v_cache,
                meta.positions,
                meta.token_seq,
                meta.block_tables,
            ],
            ints: [
                meta.max_blocks as i32,
                meta.block_size as i32,
                dims.num_heads as i32,
                dims.num_kv_heads as i32,
                dims.head_dim as i32,
            ],
            scale: dims.scale,
            tail: [dims.window as i32, partition as i32, splits as i32],
        }
    }

    /// Pushes them onto a launch (which borrows them until it is launched).
    pub fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        for ptr in &self.ptrs {
            b.arg(ptr);
        }
        for i in &self.ints {
            b.arg(i);
        }
        b.arg(&self.scale);
        for i in &self.tail {
            b.arg(i);
        }
    }
}

/// `paged_attention` (and, when split, its reduce) on raw device addresses. Splits past
/// a token's context are empty and the reduce skips them, so a fixed split (a captured
/// graph's) serves every context up to splits * partition.
#[allow(clippy::too_many_arguments)]
pub fn launch_paged_attention(
    k: &Kernels,
    dtype: DType,
    p: &AttentionPtrs,
    meta: &MetaPtrs,
    n: usize,
    dims: &AttentionDims,
    splits: usize,
    partition: usize,
) -> Result<()> {
    // Batches of more than 8 rows (by default): attention_batch.cu, which combines split
    // contexts itself and so needs the counters whenever it splits.
    if attention_batch::partition_for(n, dims, dtype).is_some() && (splits == 1 || p.done_counts != 0) {
        return attention_batch::launch(k, dtype, p, meta, n, dims, splits, partition);
    }
    let group = dims.num_heads / dims.num_kv_heads;
    // Floats: queries, scores, three per-head statistics (+ alignment), then 8-byte slots.
    let floats = group * dims.head_dim + group * ATT_TILE + 3 * group + (group & 1) + 2;
    let mut shared = floats * 4 + ATT_TILE * 8;
    // v2 (coalesced 16-byte row reads) where the row splits into a power-of-two number of
    // 16-byte chunks of at most a warp; it adds the row groups' partial outputs.
    let vec = 16 / dtype.size_in_bytes();
    let chunks = dims.head_dim / vec;
    let v2_extra = (ATT_THREADS as usize)
        .checked_div(chunks)
        .map_or(0, |row_groups| row_groups * group * dims.head_dim * 4);
    let use_v2 = !k.attention_v1
        && dims.head_dim.is_multiple_of(vec)
        && chunks.is_power_of_two()
        && chunks <= 32
        && shared + v2_extra <= 48 * 1024;
    if use_v2 {
        shared += v2_extra;
    }
    // v2 sized for this exact group when instantiated (fewer registers), else for any.
    let exact = format!("paged_attention_v2_g{group}");
    let f = match (use_v2, k.try_function(&exact, dtype)) {
        (true, Some(f)) => f,
        (true, None) => k.function("paged_attention_v2", dtype)?,
        (false, _) => k.function("paged_attention", dtype)?,
    };
    let args = AttentionArgs::new(p, meta, dims, partition, splits);
    let mut b = k.stream().launch_builder(f);
    args.push(&mut b);
    let reduce_inside = use_v2 && p.done_counts != 0 && splits <= ATT_MAX_REDUCE_SPLITS;
    let no_counts = 0u64;
    if use_v2 {
        b.arg(if reduce_inside { &p.done_counts } else { &no_counts });
    }
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_kv_heads as u32, splits as u32),
        block_dim: (ATT_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    unsafe { b.launch(cfg) }.map_err(|e| launch_err("paged_attention", e))?;
    if splits > 1 && !reduce_inside {
        let f = k.function("attention_reduce", dtype)?;
        let ptrs = [p.out, p.part_acc, p.part_ml, meta.positions];
        let ints = [
            dims.num_heads as i32,
            dims.head_dim as i32,
            splits as i32,
            dims.window as i32,
            partition as i32,
        ];
        let mut b = k.stream().launch_builder(f);
        for ptr in &ptrs {
            b.arg(ptr);
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
    Ok(())
}

/// Items each warp of `gemv_fused` keeps in flight at most (GEMV_DEPTH in ops.cu).
pub const GEMV_DEPTH: usize = 5;
/// Rows a `gemv_fused` launch takes at most (its largest instantiation).
pub const GEMV_MAX_ROWS: usize = 8;
/// Must match GEMV_THREADS and GEMV_PASS_CHUNKS in ops.cu.
const GEMV_THREADS: u32 = 256;
const GEMV_WARPS: usize = GEMV_THREADS as usize / 32;
const GEMV_PASS_CHUNKS: usize = 128;
/// Dynamic shared memory a GEMV launch may use without opting in (48 KB, less the
/// kernel's static red[] for the norm prologue).
const GEMV_MAX_SHARED: usize = 47 * 1024;
/// The GEMV launch geometry: a launch takes more rows per block until it has at most
/// `max_blocks` blocks (default two per SM of an H100/H200: gemv_fused's registers allow
/// two 256-thread blocks per SM, so the launch is one wave of resident blocks, each paying
/// its norm prologue once while its warps stream items GEMV_DEPTH deep), with at most
/// `max_items` items per block (the lm_head: 576 rows per block by default).
/// `VLLM_GEMV_MAX_BLOCKS` / `VLLM_GEMV_MAX_ITEMS` override them to compare geometries.
#[derive(Debug, Clone, Copy)]
pub struct GemvLimits {
    pub max_blocks: usize,
    pub max_items: usize,
}

impl Default for GemvLimits {
    fn default() -> Self {
        GemvLimits {
            max_blocks: 264,
            max_items: 1024,
        }
    }
}

impl GemvLimits {
    pub fn from_env() -> Self {
        let read = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        let d = GemvLimits::default();
        GemvLimits {
            max_blocks: read("VLLM_GEMV_MAX_BLOCKS", d.max_blocks),
            max_items: read("VLLM_GEMV_MAX_ITEMS", d.max_items),
        }
    }
}

/// What `gemv_fused` does with a product before storing it (GEMV_* in ops.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvEpilogue {
    /// y = x · wᵀ
    Store = 0,
    /// y (the float32 residual stream) += x · wᵀ (the sum rounded to the weights' type first,
    /// as the unfused path stores it)
    AddTo = 1,
    /// w is the fused [2 * out, inner] gate/up matrix: y = silu(gate) * up
    SiluMul = 2,
    /// y (float32, whatever the weights' type) = x · wᵀ, unrounded: the logits
    StoreF32 = 3,
}

/// The launch geometry of `gemv_fused`: (rows per block, passes, blocks, shared bytes).
fn gemv_geometry(
    dtype: DType,
    n: usize,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
    limits: GemvLimits,
) -> (usize, usize, usize, usize) {
    let chunks = inner / (16 / dtype.size_in_bytes());
    let passes = chunks.div_ceil(GEMV_PASS_CHUNKS).max(1);
    let halves = if epilogue == GemvEpilogue::SiluMul { 2 } else { 1 };
    let nr = gemv_instance(n);
    // Items per block also within what the partial sums leave of the shared memory.
    let items_fit = GEMV_MAX_SHARED.saturating_sub(n * inner * dtype.size_in_bytes()) / (nr * 4);
    let least = (GEMV_WARPS / (halves * passes)).max(1);
    let most = (limits.max_items.min(items_fit) / (halves * passes)).max(least);
    let rows_per_block = out.div_ceil(limits.max_blocks.max(1)).clamp(least, most);
    let items = rows_per_block * halves * passes;
    let shared = n * inner * dtype.size_in_bytes() + items * nr * 4;
    (rows_per_block, passes, out.div_ceil(rows_per_block), shared)
}

/// The `gemv_fused_rN` instantiation for n rows.
fn gemv_instance(n: usize) -> usize {
    n.next_power_of_two().max(1)
}

/// Whether our GEMV serves y[n, out] = x[n, inner] · w[out, inner]ᵀ: batches of at most
/// `Kernels::gemv_max_rows` rows whose inputs fit the kernel's shared memory.
pub fn gemv_fits(k: &Kernels, dtype: DType, n: usize, inner: usize) -> bool {
    n >= 1
        && n <= k.gemv_max_rows.min(GEMV_MAX_ROWS)
        && inner.is_multiple_of(16 / dtype.size_in_bytes())
        && gemv_geometry(dtype, n, 1, inner, GemvEpilogue::SiluMul, k.gemv_limits).3 <= GEMV_MAX_SHARED
}

/// y[n, out] = x[n, inner] · w[out, inner]ᵀ for small n (`gemv_fits`), raw addresses.
#[allow(clippy::too_many_arguments)]
pub fn launch_gemv(
    k: &Kernels,
    dtype: DType,
    y: u64,
    x: u64,
    w: u64,
    n: usize,
    out: usize,
    inner: usize,
) -> Result<()> {
    launch_gemv_fused(k, dtype, y, x, w, 0, 0.0, n, out, inner, GemvEpilogue::Store)
}

/// `gemv_fused` on raw addresses: y = epilogue(x' · wᵀ), x' = RMSNorm(x) * norm (eps)
/// when `norm` is not 0, else x. For SiluMul, `out` is the width of y (half of w's rows).
/// One-row products go to gemv_staged.rs where it serves them.
#[allow(clippy::too_many_arguments)]
pub fn launch_gemv_fused(
    k: &Kernels,
    dtype: DType,
    y: u64,
    x: u64,
    w: u64,
    norm: u64,
    eps: f32,
    n: usize,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
) -> Result<()> {
    if n == 0 || n > GEMV_MAX_ROWS {
        return Err(EngineError::internal(format!("gemv: {n} rows (1 to {GEMV_MAX_ROWS})")));
    }
    if n == 1 && k.gemv_staged {
        if let Some(plan) = super::gemv_staged::plan(dtype, out, inner, epilogue, k.sms, norm != 0) {
            return super::gemv_staged::launch(k, dtype, (y, x, w, norm), eps, out, inner, epilogue, plan);
        }
    }
    let (rows_per_block, passes, blocks, shared) = gemv_geometry(dtype, n, out, inner, epilogue, k.gemv_limits);
    if shared > GEMV_MAX_SHARED {
        return Err(EngineError::internal("gemv: the inputs do not fit shared memory"));
    }
    let f = k.function(&format!("gemv_fused_r{}", gemv_instance(n)), dtype)?;
    let ints = [
        n as i32,
        out as i32,
        inner as i32,
        rows_per_block as i32,
        passes as i32,
        epilogue as i32,
    ];
    let depth = k.gemv_depth as i32;
    let cfg = grid(blocks, GEMV_THREADS, shared);
    let (ptrs, tail) = ([y, x, w, norm], [depth]);
    let mut params = gemv_params(&ptrs, &ints, &eps, &tail);
    // SAFETY: the parameters are gemv_fused's, in order; it waits (pdl_wait) before reading x
    // or writing y.
    unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, "gemv_fused", k.pdl) }
}

/// A GEMV kernel's parameters for pdl::launch: y, x, w and the norm weights, then `ints`,
/// eps and `tail`. The pointers point into the arguments: pass locals that outlive the
/// launch, not temporaries.
pub(super) fn gemv_params(ptrs: &[u64; 4], ints: &[i32], eps: &f32, tail: &[i32]) -> Vec<*mut std::ffi::c_void> {
    use super::pdl::arg;
    ptrs.iter()
        .map(arg)
        .chain(ints.iter().map(arg))
        .chain([arg(eps)])
        .chain(tail.iter().map(arg))
        .collect()
}

/// x [n, inner] · w [out, inner]ᵀ: our GEMV kernel for decode-sized batches, cuBLAS
/// (candle) otherwise; the captured decode makes the same choice.
pub fn linear(k: &Kernels, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, inner) = x.dims2()?;
    let (out, w_inner) = w.dims2()?;
    let aligned = |t: &Tensor| t.is_contiguous() && device_ptr(t).is_ok_and(|p| p % 16 == 0);
    if n == 0
        || !gemv_fits(k, x.dtype(), n, inner)
        || w_inner != inner
        || w.dtype() != x.dtype()
        || !aligned(x)
        || !aligned(w)
    {
        return Ok(x.matmul(&w.t()?)?);
    }
    let y = empty((n, out), x.dtype(), x)?;
    launch_gemv(
        k,
        x.dtype(),
        device_ptr(&y)?,
        device_ptr(x)?,
        device_ptr(w)?,
        n,
        out,
        inner,
    )?;
    Ok(y)
}

/// The logits y = x [n, inner] · w [vocab, inner]ᵀ as float32 whatever the weights' type
/// (rounding them to bf16 alone moves a logprob by up to ~0.1): our GEMV for decode-sized
/// batches, cuBLAS otherwise, on raw addresses (x and w 16-byte aligned).
#[allow(clippy::too_many_arguments)]
pub fn launch_logits(
    k: &Kernels,
    blas: &Blas,
    dtype: DType,
    y: u64,
    x: u64,
    w: u64,
    n: usize,
    vocab: usize,
    inner: usize,
) -> Result<()> {
    if gemv_fits(k, dtype, n, inner) {
        launch_gemv_fused(k, dtype, y, x, w, 0, 0.0, n, vocab, inner, GemvEpilogue::StoreF32)
    } else {
        blas.linear_to(dtype, DType::F32, y, x, w, n, vocab, inner)
    }
}

/// `launch_logits` on tensors: float32 [n, vocab].
pub fn logits(k: &Kernels, blas: &Blas, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, inner) = x.dims2()?;
    let (vocab, w_inner) = w.dims2()?;
    if w_inner != inner || w.dtype() != x.dtype() {
        return Err(EngineError::internal(
            "logits: the hidden states do not fit the lm_head",
        ));
    }
    let x = x.contiguous()?;
    let y = empty((n, vocab), DType::F32, &x)?;
    if n > 0 {
        let (xp, wp) = (device_ptr(&x)?, device_ptr(w)?);
        if xp % 16 != 0 || wp % 16 != 0 {
            blas.linear_to(x.dtype(), DType::F32, device_ptr(&y)?, xp, wp, n, vocab, inner)?;
        } else {
            launch_logits(k, blas, x.dtype(), device_ptr(&y)?, xp, wp, n, vocab, inner)?;
        }
    }
    Ok(y)
}

/// Blocks per row of the split argmax (ARGMAX_SPLITS in ops.cu).
pub const ARGMAX_SPLITS: usize = 64;
/// Must match ARGMAX_SPLIT_THREADS in ops.cu.
const ARGMAX_SPLIT_THREADS: u32 = 256;

/// `launch_argmax_rows` spread over ARGMAX_SPLITS blocks per row (one block per row
/// leaves a decode step's argmax to one SM): `scratch` holds 2 * ARGMAX_SPLITS u32 per row.
/// `host_out`, when not 0, gets the same values as `out` (a decode graph's page-locked slot).
#[allow(clippy::too_many_arguments)]
pub fn launch_argmax_split(
    k: &Kernels,
    dtype: DType,
    (out, host_out): (u64, u64),
    scratch: u64,
    logits: u64,
    n: usize,
    vocab: usize,
) -> Result<()> {
    let f = k.function("argmax_split", dtype)?;
    let v = vocab as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&scratch).arg(&logits).arg(&v);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, ARGMAX_SPLITS as u32, 1),
        block_dim: (ARGMAX_SPLIT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.map_err(|e| launch_err("argmax_split", e))?;
    let f = k.plain_function("argmax_split_reduce")?;
    let splits = ARGMAX_SPLITS as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&out).arg(&scratch).arg(&splits).arg(&host_out);
    unsafe { b.launch(grid(n, 32, 0)) }.map_err(|e| launch_err("argmax_split_reduce", e))?;
    Ok(())
}

/// Per row of `logits` [n, vocab]: the argmax (lowest id on ties) and the largest value as
/// float32, written to `out` (u32 [2 * n]: the ids, then the values' bits).
pub fn launch_argmax_rows(k: &Kernels, dtype: DType, out: u64, logits: u64, n: usize, vocab: usize) -> Result<()> {
    let f = k.function("argmax_rows", dtype)?;
    let v = vocab as i32;
    let mut b = k.stream().launch_builder(f);
    b.arg(&out).arg(&logits).arg(&v);
    unsafe { b.launch(grid(n, ARGMAX_THREADS, 0)) }.map_err(|e| launch_err("argmax_rows", e))?;
    Ok(())
}

/// Per row of `logits` [n, vocab] on the device: (argmax ids, largest values), one copy back.
pub fn argmax_rows(k: &Kernels, logits: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    let (n, vocab) = logits.dims2()?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    // SAFETY: the split argmax writes all 2 * n values and every partial it reads.
    let (out, scratch) = unsafe {
        (
            Tensor::empty(2 * n, DType::U32, logits.device())?,
            Tensor::empty(2 * n * ARGMAX_SPLITS, DType::U32, logits.device())?,
        )
    };
    launch_argmax_split(
        k,
        logits.dtype(),
        (device_ptr(&out)?, 0),
        device_ptr(&scratch)?,
        device_ptr(logits)?,
        n,
        vocab,
    )?;
    let all = out.to_vec1::<u32>()?;
    Ok(split_argmax(&all, n))
}

/// Splits argmax_rows' output (ids, then float bits) into its two halves.
pub fn split_argmax(all: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let ids = all[..n].to_vec();
    let values = all[n..2 * n].iter().map(|&b| f32::from_bits(b)).collect();
    (ids, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(kv: usize) -> AttentionDims {
        AttentionDims::unscaled(8, kv, 64)
    }

    #[test]
    fn gemv_geometry_covers_every_row_and_pass() {
        // W3's and W1's decode shapes: (out, inner, epilogue).
        let shapes = [
            (1152, 896, GemvEpilogue::Store),
            (896, 896, GemvEpilogue::AddTo),
            (4864, 896, GemvEpilogue::SiluMul),
            (896, 4864, GemvEpilogue::AddTo),
            (151_936, 896, GemvEpilogue::Store),
            (1024, 2048, GemvEpilogue::AddTo),
            (3072, 1024, GemvEpilogue::SiluMul),
            (7, 8, GemvEpilogue::Store),
        ];
        for (out, inner, e) in shapes {
            for n in [1, 3, 8] {
                let (rows, passes, blocks, shared) =
                    gemv_geometry(DType::BF16, n, out, inner, e, GemvLimits::default());
                assert!(blocks * rows >= out && (blocks - 1) * rows < out, "{out} {inner}");
                assert!(passes * GEMV_PASS_CHUNKS * 8 >= inner && (passes - 1) * GEMV_PASS_CHUNKS * 8 < inner);
                assert!(shared >= n * inner * 2, "{out} {inner}");
            }
        }
        // W3: qkv keeps 8 rows per block (144 blocks); gate_up (4,864 SiLU rows) grows to
        // 19 rows, 256 blocks; down (five passes per row) to 4 rows, 224 blocks; the
        // lm_head to 576 rows, 264 blocks: every launch one wave of two blocks per SM.
        assert_eq!(
            gemv_geometry(DType::BF16, 1, 1152, 896, GemvEpilogue::Store, GemvLimits::default()).0,
            8
        );
        assert_eq!(
            gemv_geometry(DType::BF16, 1, 4864, 896, GemvEpilogue::SiluMul, GemvLimits::default()).2,
            256
        );
        assert_eq!(
            gemv_geometry(DType::BF16, 1, 896, 4864, GemvEpilogue::AddTo, GemvLimits::default()).0,
            4
        );
        assert_eq!(
            gemv_geometry(DType::BF16, 1, 151_936, 896, GemvEpilogue::Store, GemvLimits::default()).0,
            576
        );
        assert!(
            gemv_geometry(
                DType::BF16,
                8,
                151_936,
                1024,
                GemvEpilogue::Store,
                GemvLimits::default()
            )
            .3 <= GEMV_MAX_SHARED
        );
        assert_eq!(gemv_instance(3), 4);
        assert_eq!(gemv_instance(8), 8);
        // Depth 5: every item of W3's gate_up block (19 rows × gate, up) is requested
        // before the prologue.
        let (rows, passes, _, _) =
            gemv_geometry(DType::BF16, 1, 4864, 896, GemvEpilogue::SiluMul, GemvLimits::default());
        assert!(rows * 2 * passes <= GEMV_WARPS * GEMV_DEPTH);
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
