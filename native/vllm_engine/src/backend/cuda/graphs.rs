//! CUDA graphs for decode steps. At start-up every buffer a decode step touches is
//! allocated once (activations, step metadata, partial sums, logits, argmax output, the
//! cuBLAS workspace), and the whole step (embedding, every layer, final norm, lm_head and
//! the greedy argmax) is captured per padded batch size, once for each of the two replay
//! slots (replay_slots.rs). A step then costs its inputs (token ids, positions, block
//! tables) written into a slot's page-locked memory, which the graph's first kernel reads,
//! and one graph launch, whose argmax lands in the same slot: ~250 launches become one.
//!
//! Padding rows decode token 0 at position 0 into a scratch KV block (the cache holds one
//! block more than the scheduler manages), so they never touch a real sequence's cache.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
use candle_core::{DType, Device, Tensor};

use super::blas::Blas;
use super::graph_events::GraphEvents;
use super::lora::{DeviceLora, FusedParts};
use super::ops::{self, AttentionDims, AttentionPtrs, GemvEpilogue, MetaPtrs, QkvPtrs, RowsPtrs};
use super::replay_slots::{ReplaySlots, INPUTS_HEADER};
use super::{decode_small, gemv_staged};
use super::{device_ptr, Kernels};
use crate::decode_lookahead::DecodeInputs;
use crate::error::{EngineError, Result};
use crate::models::ForwardBatch;

/// What the captured step must cover.
#[derive(Debug, Clone, Copy)]
pub struct GraphLimits {
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// Blocks the scheduler manages; block `num_blocks` is the padding rows' scratch.
    pub num_blocks: usize,
}

/// Device addresses of one layer's weights and KV cache.
pub struct LayerPtrs {
    pub input_norm: u64,
    pub qkv: u64,
    pub qkv_bias: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub o_proj: u64,
    pub post_norm: u64,
    pub gate_up: u64,
    pub down: u64,
    pub k_cache: u64,
    pub v_cache: u64,
}

/// Device addresses and shapes of the whole model.
pub struct ModelPtrs {
    pub dtype: DType,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    pub dims: AttentionDims,
    pub embed: u64,
    pub final_norm: u64,
    pub lm_head: u64,
    pub cos: u64,
    pub sin: u64,
    pub layers: Vec<LayerPtrs>,
}

impl ModelPtrs {
    fn q_width(&self) -> usize {
        self.dims.num_heads * self.dims.head_dim
    }
    fn qkv_width(&self) -> usize {
        (self.dims.num_heads + 2 * self.dims.num_kv_heads) * self.dims.head_dim
    }
}

/// The fixed buffers of the captured step, sized for `max_batch` rows.
struct Buffers {
    /// u32: ids [max_batch], positions [max_batch], block tables [max_batch, max_blocks].
    meta: Tensor,
    /// u32 [max_batch]: row i belongs to sequence i (constant).
    token_seq: Tensor,
    h: Tensor,
    x: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    o: Tensor,
    gate_up: Tensor,
    act: Tensor,
    delta: Tensor,
    logits: Tensor,
    part_acc: Tensor,
    part_ml: Tensor,
    /// u32 [max_batch * num_kv_heads]: attention's split counters (zero between steps).
    done_counts: Tensor,
    /// u32 [2 * max_batch]: argmax ids then max values' bits.
    argmax: Tensor,
    /// u32 [max_batch, ARGMAX_SPLITS, 2]: the split argmax's partials; at least
    /// gemv_staged::argmax_scratch_len for the one-row logits' fused argmax.
    argmax_part: Tensor,
}

/// A step the lookahead launched: its inputs (tokens filled in once the step before it is
/// back), padded size and replay slot.
struct Lookahead {
    inputs: DecodeInputs,
    b: usize,
    slot: usize,
}

/// Steps replayed through any decode graph in this process (tests check that a path
/// really ran captured, e.g. after a wake-up re-captured the graphs).
static REPLAYS_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn replays_total() -> u64 {
    REPLAYS_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Steps whose results came from a lookahead launch, in this process (tests).
static LOOKAHEAD_USED_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn lookahead_used_total() -> u64 {
    LOOKAHEAD_USED_TOTAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Captured decode graphs, one per padded batch size.
pub struct DecodeGraphs {
    stream: Arc<CudaStream>,
    blas: Blas,
    buffers: Buffers,
    /// Ascending captured batch sizes and their graphs, one per replay slot.
    sizes: Vec<usize>,
    graphs: [Vec<CudaGraph>; 2],
    /// With LoRA enabled: the same sizes captured with the LoRA kernels after every
    /// projection (backend/cuda/lora.rs), replayed for decode steps with LoRA rows.
    lora_graphs: [Vec<CudaGraph>; 2],
    max_batch: usize,
    /// Row stride of the block tables (blocks of max_model_len).
    max_blocks: usize,
    block_size: usize,
    num_blocks: usize,
    max_model_len: usize,
    vocab: usize,
    /// The KV cache the graphs were captured against (layer 0's keys).
    kv_key: u64,
    /// The page-locked inputs and argmax of the launches, two slots taken in turn.
    slots: ReplaySlots,
    /// The decode lookahead (on unless VLLM_LOOKAHEAD=0) and the step it launched ahead.
    lookahead: bool,
    pending: Option<Lookahead>,
    /// Lookahead steps used and launched in vain (reported with VLLM_STEP_TIMING).
    lookahead_used: u64,
    lookahead_missed: u64,
    /// Steps run through a graph (reported with VLLM_STEP_TIMING).
    replays: u64,
    /// VLLM_GRAPH_EVENTS: device times around each replay (measurement).
    events: Option<GraphEvents>,
}

impl Drop for DecodeGraphs {
    fn drop(&mut self) {
        // A lookahead step may still run on these buffers and graphs.
        self.stream.synchronize().ok();
        if std::env::var_os("VLLM_STEP_TIMING").is_some() {
            eprintln!(
                "decode graphs: sizes {:?}, {} replays ({} lookahead steps used, {} in vain)",
                self.sizes, self.replays, self.lookahead_used, self.lookahead_missed
            );
        }
    }
}

// SAFETY: graphs and the cuBLAS handle are only used by whoever holds the model's lock,
// one thread at a time (CUDA requires serialized access, not a fixed thread).
unsafe impl Send for DecodeGraphs {}

/// Decode batches of more rows run eagerly (vLLM's largest captured size too): such a
/// step is long enough that launching its kernels one by one costs little, and every
/// captured row holds its own buffers.
pub const MAX_CAPTURED_BATCH: usize = 512;

impl GraphLimits {
    /// The largest batch captured.
    pub fn captured_batch(&self) -> usize {
        self.max_num_seqs.clamp(1, MAX_CAPTURED_BATCH)
    }
}

/// The batch sizes to capture: 1, 2, 4, 8, then every multiple of 16, up to `max`.
pub fn capture_sizes(max: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4, 8].into_iter().filter(|&s| s < max).collect();
    sizes.extend((16..max).step_by(16));
    sizes.push(max);
    sizes
}

/// Bytes the fixed buffers take for these limits (reserved before sizing the KV cache).
pub fn buffer_bytes(m: &ModelShape, limits: &GraphLimits) -> usize {
    let b = limits.captured_batch();
    let elems = b * (4 * m.hidden + m.qkv_width + 2 * m.q_width + 3 * m.intermediate + m.vocab);
    let (acc, ml) = partials_for(&capture_sizes(b), &m.dims, m.dtype, limits.max_model_len);
    let meta =
        b * (3 + limits.max_model_len.div_ceil(limits.block_size) + 2 + 2 * ops::ARGMAX_SPLITS + m.dims.num_kv_heads);
    elems * m.dtype.size_in_bytes() + 4 * (acc + ml + meta) + (32 << 20)
}

/// The partial-sum buffer lengths the largest of the captured sizes' splits needs.
fn partials_for(sizes: &[usize], dims: &AttentionDims, dtype: DType, max_model_len: usize) -> (usize, usize) {
    sizes
        .iter()
        .map(|&b| {
            let (splits, _) = ops::graph_splits(b, dims, dtype, max_model_len);
            if splits > 1 {
                ops::partials_len(b, dims, splits)
            } else {
                (0, 0)
            }
        })
        .fold((0, 0), |(a, m), (x, y)| (a.max(x), m.max(y)))
}

/// Shapes `buffer_bytes` needs.
pub struct ModelShape {
    pub dtype: DType,
    pub hidden: usize,
    pub q_width: usize,
    pub qkv_width: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub dims: AttentionDims,
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA graph {what}: {e}"))
}

impl DecodeGraphs {
    /// Allocates the buffers, runs every size once uncaptured (loads lazily loaded kernels
    /// and lets cuBLAS pick its algorithms), then captures each size.
    pub fn capture(
        device: &Device,
        kernels: &Kernels,
        model: &ModelPtrs,
        limits: &GraphLimits,
        lora: Option<&DeviceLora>,
    ) -> Result<Self> {
        let stream = kernels.stream().clone();
        let max_batch = limits.captured_batch();
        let max_blocks = limits.max_model_len.div_ceil(limits.block_size).max(1);
        let sizes = capture_sizes(max_batch);
        let (acc_len, ml_len) = partials_for(&sizes, &model.dims, model.dtype, limits.max_model_len);
        let dt = model.dtype;
        let zeros = |n: usize, dtype: DType| -> Result<Tensor> { Ok(Tensor::zeros(n.max(1), dtype, device)?) };
        let token_seq: Vec<u32> = (0..max_batch as u32).collect();
        let buffers = Buffers {
            meta: zeros(max_batch * (2 + max_blocks), DType::U32)?,
            token_seq: Tensor::from_vec(token_seq, max_batch, device)?,
            // The residual stream, float32 whatever the model's dtype (kernels/ops.cu).
            h: zeros(max_batch * model.hidden, DType::F32)?,
            x: zeros(max_batch * model.hidden, dt)?,
            qkv: zeros(max_batch * model.qkv_width(), dt)?,
            q: zeros(max_batch * model.q_width(), dt)?,
            attn: zeros(max_batch * model.q_width(), dt)?,
            o: zeros(max_batch * model.hidden, dt)?,
            gate_up: zeros(max_batch * 2 * model.intermediate, dt)?,
            act: zeros(max_batch * model.intermediate, dt)?,
            delta: zeros(max_batch * model.hidden, dt)?,
            logits: zeros(max_batch * model.vocab, DType::F32)?,
            part_acc: zeros(acc_len, DType::F32)?,
            part_ml: zeros(ml_len, DType::F32)?,
            done_counts: zeros(max_batch * model.dims.num_kv_heads, DType::U32)?,
            argmax: zeros(2 * max_batch, DType::U32)?,
            argmax_part: zeros(
                (2 * max_batch * ops::ARGMAX_SPLITS).max(gemv_staged::argmax_scratch_len(kernels.sms)),
                DType::U32,
            )?,
        };
        let meta_len = max_batch * (2 + max_blocks);
        let slots = ReplaySlots::new(&stream, INPUTS_HEADER + meta_len, 2 * max_batch)?;
        let mut graphs = DecodeGraphs {
            blas: Blas::new(&stream)?,
            stream,
            buffers,
            sizes: Vec::new(),
            graphs: [Vec::new(), Vec::new()],
            lora_graphs: [Vec::new(), Vec::new()],
            max_batch,
            max_blocks,
            block_size: limits.block_size,
            num_blocks: limits.num_blocks,
            max_model_len: limits.max_model_len,
            vocab: model.vocab,
            kv_key: model.layers.first().map_or(0, |l| l.k_cache),
            slots,
            lookahead: std::env::var("VLLM_LOOKAHEAD").map_or(true, |v| v != "0"),
            pending: None,
            lookahead_used: 0,
            lookahead_missed: 0,
            replays: 0,
            events: GraphEvents::from_env(),
        };
        // Every row a padding row (scratch block), so the warm-up writes no real cache.
        let (warm_slot, staged) = graphs.slots.take()?;
        stage_padding(staged, max_batch, max_blocks, limits.num_blocks, 0, max_batch)?;
        staged[0] = 1;
        // LoRA graphs only when its fixed buffers exist (not with enforce_eager).
        let lora = lora.filter(|l| l.has_graph_buffers());
        for &b in &sizes {
            graphs.record(kernels, model, b, limits.max_model_len, None, warm_slot)?;
            if lora.is_some() {
                graphs.record(kernels, model, b, limits.max_model_len, lora, warm_slot)?;
            }
        }
        graphs.stream.synchronize().map_err(|e| cuda_err("warm-up", e))?;
        graphs.sizes = sizes;
        for slot in 0..2 {
            for &b in &graphs.sizes {
                let graph = graphs.capture_one(kernels, model, b, limits.max_model_len, None, slot)?;
                graph.upload().map_err(|e| cuda_err("upload", e))?;
                graphs.graphs[slot].push(graph);
                if lora.is_some() {
                    let graph = graphs.capture_one(kernels, model, b, limits.max_model_len, lora, slot)?;
                    graph.upload().map_err(|e| cuda_err("upload", e))?;
                    graphs.lora_graphs[slot].push(graph);
                }
            }
        }
        graphs.stream.synchronize().map_err(|e| cuda_err("capture", e))?;
        Ok(graphs)
    }

    /// Graphs a replay can take (each is captured once a replay slot).
    pub fn num_graphs(&self) -> usize {
        self.graphs[0].len() + self.lora_graphs[0].len()
    }

    fn capture_one(
        &self,
        kernels: &Kernels,
        model: &ModelPtrs,
        b: usize,
        max_model_len: usize,
        lora: Option<&DeviceLora>,
        slot: usize,
    ) -> Result<CudaGraph> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("begin capture", e))?;
        let recorded = self.record(kernels, model, b, max_model_len, lora, slot);
        // End the capture whatever happened, so the stream is usable again.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        ended
            .map_err(|e| cuda_err("end capture", e))?
            .ok_or_else(|| cuda_err("end capture", "no graph was captured"))
    }

    /// Issues one decode step of `b` rows on the fixed buffers (with `lora`: its deltas
    /// after every projection), its inputs read from replay slot `slot` and its argmax
    /// written there.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        k: &Kernels,
        m: &ModelPtrs,
        b: usize,
        max_model_len: usize,
        lora: Option<&DeviceLora>,
        slot: usize,
    ) -> Result<()> {
        let buf = &self.buffers;
        let p = |t: &Tensor| device_ptr(t);
        let dt = m.dtype;
        let (hidden, inter) = (m.hidden, m.intermediate);
        let meta_base = p(&buf.meta)?;
        let meta = MetaPtrs {
            positions: meta_base + 4 * self.max_batch as u64,
            token_seq: p(&buf.token_seq)?,
            block_tables: meta_base + 8 * self.max_batch as u64,
            max_blocks: self.max_blocks,
            block_size: self.block_size,
        };
        let (h, x, delta) = (p(&buf.h)?, p(&buf.x)?, p(&buf.delta)?);
        let (qkv, q, attn, o) = (p(&buf.qkv)?, p(&buf.q)?, p(&buf.attn)?, p(&buf.o)?);
        let (gate_up, act) = (p(&buf.gate_up)?, p(&buf.act)?);
        let (splits, partition) = ops::graph_splits(b, &m.dims, dt, max_model_len);
        let (part_acc, part_ml, done_counts) = if splits > 1 {
            (p(&buf.part_acc)?, p(&buf.part_ml)?, p(&buf.done_counts)?)
        } else {
            (0, 0, 0)
        };

        let kv_width = m.dims.num_kv_heads * m.dims.head_dim;
        let parts = FusedParts::new(hidden, m.q_width(), kv_width, inter);

        // Tokens a lookahead launch does not know yet are rows of the last step's argmax.
        let argmax = p(&buf.argmax)?;
        let (staged, host_argmax) = self.slots.device_ptrs(slot);
        let inputs = (staged, meta_base, argmax);
        ops::launch_graph_embedding(k, dt, (h, m.embed), inputs, b, hidden, self.max_batch, self.max_blocks)?;
        // Small batches: every product through our GEMV with the norms, residual adds and
        // SiLU fused in (h is the residual stream, updated in place by o_proj and down).
        // LoRA graphs keep the plain products: the adapters' shrink needs the normed input
        // and their expand must add before SiLU·mul, which the fused epilogues hide.
        let fused = lora.is_none()
            && [hidden, inter, m.q_width()]
                .iter()
                .all(|&inner| ops::gemv_fits(k, dt, b, inner));
        // Up to decode_small::MAX_ROWS rows (each a sequence's one decode token): qkv
        // preparation and attention in one launch per layer.
        let small_attention = decode_small::serves(k, dt, b, &m.dims);
        for (i, layer) in m.layers.iter().enumerate() {
            if fused {
                ops::launch_gemv_fused(
                    k,
                    dt,
                    qkv,
                    h,
                    layer.qkv,
                    layer.input_norm,
                    m.eps,
                    b,
                    m.qkv_width(),
                    hidden,
                    GemvEpilogue::Store,
                )?;
            } else {
                let norm_in = RowsPtrs {
                    residual: h,
                    delta: if i == 0 { 0 } else { delta },
                    weight: layer.input_norm,
                    out: x,
                };
                ops::launch_add_rms_norm(k, dt, &norm_in, b, hidden, m.eps)?;
                self.linear(k, dt, qkv, x, layer.qkv, b, m.qkv_width(), hidden)?;
                if let Some(l) = lora {
                    l.record(i, &parts.qkv, x, qkv, b, hidden, m.qkv_width())?;
                }
            }
            let qkv_ptrs = QkvPtrs {
                qkv,
                bias: layer.qkv_bias,
                q_norm: layer.q_norm,
                k_norm: layer.k_norm,
                cos: m.cos,
                sin: m.sin,
                q_out: q,
                k_cache: layer.k_cache,
                v_cache: layer.v_cache,
            };
            if small_attention {
                decode_small::launch(k, dt, &qkv_ptrs, attn, &meta, b, &m.dims, m.eps)?;
            } else {
                ops::launch_qkv_prepare(k, dt, &qkv_ptrs, &meta, b, &m.dims, m.eps)?;
                let att = AttentionPtrs {
                    out: attn,
                    part_acc,
                    part_ml,
                    done_counts,
                    q,
                    k_cache: layer.k_cache,
                    v_cache: layer.v_cache,
                };
                ops::launch_paged_attention(k, dt, &att, &meta, b, &m.dims, splits, partition)?;
            }
            if fused {
                ops::launch_gemv_fused(
                    k,
                    dt,
                    h,
                    attn,
                    layer.o_proj,
                    0,
                    0.0,
                    b,
                    hidden,
                    m.q_width(),
                    GemvEpilogue::AddTo,
                )?;
                ops::launch_gemv_fused(
                    k,
                    dt,
                    act,
                    h,
                    layer.gate_up,
                    layer.post_norm,
                    m.eps,
                    b,
                    inter,
                    hidden,
                    GemvEpilogue::SiluMul,
                )?;
                ops::launch_gemv_fused(k, dt, h, act, layer.down, 0, 0.0, b, hidden, inter, GemvEpilogue::AddTo)?;
                continue;
            }
            self.linear(k, dt, o, attn, layer.o_proj, b, hidden, m.q_width())?;
            if let Some(l) = lora {
                l.record(i, &parts.o, attn, o, b, m.q_width(), hidden)?;
            }
            let norm_post = RowsPtrs {
                residual: h,
                delta: o,
                weight: layer.post_norm,
                out: x,
            };
            ops::launch_add_rms_norm(k, dt, &norm_post, b, hidden, m.eps)?;
            self.linear(k, dt, gate_up, x, layer.gate_up, b, 2 * inter, hidden)?;
            if let Some(l) = lora {
                l.record(i, &parts.gate_up, x, gate_up, b, hidden, 2 * inter)?;
            }
            ops::launch_silu_mul(k, dt, act, gate_up, b, inter)?;
            self.linear(k, dt, delta, act, layer.down, b, hidden, inter)?;
            if let Some(l) = lora {
                l.record(i, &parts.down, act, delta, b, inter, hidden)?;
            }
        }
        let (logits, argmax_part) = (p(&buf.logits)?, p(&buf.argmax_part)?);
        // One row: the argmax inside the logits' launch where gemv_staged serves them.
        let head = (logits, h, m.lm_head, m.final_norm);
        if fused
            && b == 1
            && gemv_staged::launch_logits_argmax(
                k,
                dt,
                head,
                m.eps,
                m.vocab,
                hidden,
                (argmax, argmax_part, host_argmax),
            )?
        {
            return Ok(());
        }
        if fused {
            ops::launch_gemv_fused(
                k,
                dt,
                logits,
                h,
                m.lm_head,
                m.final_norm,
                m.eps,
                b,
                m.vocab,
                hidden,
                GemvEpilogue::StoreF32,
            )?;
        } else {
            let norm_final = RowsPtrs {
                residual: h,
                delta: if m.layers.is_empty() { 0 } else { delta },
                weight: m.final_norm,
                out: x,
            };
            ops::launch_add_rms_norm(k, dt, &norm_final, b, hidden, m.eps)?;
            ops::launch_logits(k, &self.blas, dt, logits, x, m.lm_head, b, m.vocab, hidden)?;
        }
        ops::launch_argmax_split(k, DType::F32, (argmax, host_argmax), argmax_part, logits, b, m.vocab)
    }

    /// y[b, out] = x[b, inner] · w[out, inner]ᵀ: `ops::linear`'s choice on raw buffers.
    #[allow(clippy::too_many_arguments)]
    fn linear(&self, k: &Kernels, dt: DType, y: u64, x: u64, w: u64, b: usize, out: usize, inner: usize) -> Result<()> {
        if ops::gemv_fits(k, dt, b, inner) {
            ops::launch_gemv(k, dt, y, x, w, b, out, inner)
        } else {
            self.blas.linear(dt, y, x, w, b, out, inner)
        }
    }

    /// The captured size for a pure decode batch of `n` rows, or None when the batch is
    /// not one the graphs cover (a prefill chunk, prompt logprobs, too many rows, too long,
    /// or a KV cache other than the captured one).
    fn size_for(&self, batch: &ForwardBatch, kv_key: u64) -> Option<usize> {
        let n = batch.token_ids.len();
        let plain_decode = batch.seqs.len() == n
            && batch
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.query_len == 1 && s.query_start == i && s.want_logits && !s.logits_for_all_tokens);
        let fits = batch
            .seqs
            .iter()
            .all(|s| s.context_len <= self.max_model_len && (s.lora_slot.is_none() || !self.lora_graphs.is_empty()));
        if n == 0 || !plain_decode || !fits || kv_key != self.kv_key {
            return None;
        }
        self.sizes.iter().copied().find(|&b| b >= n)
    }

    /// The padded size and inputs of `batch` when a captured graph covers it.
    fn covered(&self, batch: &ForwardBatch, kv_key: u64, vocab_size: usize) -> Result<Option<(usize, DecodeInputs)>> {
        let Some(b) = self.size_for(batch, kv_key) else {
            return Ok(None);
        };
        let inputs = DecodeInputs::from_batch(batch, self.block_size)?;
        if let Some(&token) = inputs.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(EngineError::validation(format!(
                "token id {token} is outside the vocabulary of {vocab_size}"
            )));
        }
        for r in 0..inputs.rows() {
            if let Some(&bad) = inputs.blocks(r).iter().find(|&&x| x as usize >= self.num_blocks) {
                return Err(EngineError::internal(format!(
                    "forward batch: block {bad} is outside the cache"
                )));
            }
        }
        Ok(Some((b, inputs)))
    }

    /// Whether the step's rows take the LoRA graphs (their slots uploaded when they do).
    fn lora_rows(&self, batch: &ForwardBatch, b: usize, lora: Option<&DeviceLora>) -> Result<bool> {
        match lora {
            Some(l) if !self.lora_graphs[0].is_empty() => l.upload_graph_rows(batch, b),
            _ => Ok(false),
        }
    }

    /// Stages `inputs` padded to `b` rows in the next replay slot and launches the graph of
    /// size `b` that reads them there: the slot. With `ahead` (the lookahead: the host does
    /// not know the tokens yet) row r's token is row `ahead[r]` of the previous replay's
    /// argmax, which the graph's embedding reads there (ops::EMBED_AHEAD).
    fn launch(&mut self, inputs: &DecodeInputs, b: usize, with_lora: bool, ahead: Option<&[usize]>) -> Result<usize> {
        let (mb, max_blocks) = (self.max_batch, self.max_blocks);
        let (slot, staged) = self.slots.take()?;
        // Padding rows need their first entry (the scratch block).
        let mut entries = 1;
        {
            let meta = &mut staged[INPUTS_HEADER..];
            for r in 0..inputs.rows() {
                let blocks = inputs.blocks(r);
                meta[r] = match ahead {
                    Some(at) => ops::EMBED_AHEAD | at[r] as u32,
                    None => inputs.tokens[r],
                };
                meta[mb + r] = inputs.positions[r];
                meta[2 * mb + r * max_blocks..][..blocks.len()].copy_from_slice(blocks);
                entries = entries.max(blocks.len());
            }
        }
        stage_padding(staged, mb, max_blocks, self.num_blocks, inputs.rows(), b)?;
        staged[0] = entries as u32;
        let index = self.sizes.iter().position(|&s| s == b).unwrap_or(0);
        let graph = if with_lora {
            &self.lora_graphs[slot][index]
        } else {
            &self.graphs[slot][index]
        };
        let raw_stream = self.stream.cu_stream();
        if let Some(e) = self.events.as_mut() {
            e.before_launch(raw_stream);
        }
        graph.launch().map_err(|e| cuda_err("launch", e))?;
        if let Some(e) = self.events.as_mut() {
            e.after_launch(raw_stream);
        }
        self.slots.launched(&self.stream, slot)?;
        self.replays += 1;
        REPLAYS_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(slot)
    }

    /// Forgets the step launched ahead (a step of other rows comes first), counting it.
    fn drop_lookahead(&mut self) {
        self.lookahead_missed += u64::from(self.pending.take().is_some());
    }

    /// Runs `batch` through the captured graph of its padded size when it qualifies:
    /// Some(rows) after the launch (the logits and argmax buffers then hold its results),
    /// None when the caller must run the step eagerly.
    pub fn replay(
        &mut self,
        batch: &ForwardBatch,
        kv_key: u64,
        vocab_size: usize,
        lora: Option<&DeviceLora>,
    ) -> Result<Option<usize>> {
        // A lookahead in flight is overtaken: its outputs are about to be overwritten.
        self.drop_lookahead();
        let Some((b, inputs)) = self.covered(batch, kv_key, vocab_size)? else {
            return Ok(None);
        };
        let with_lora = self.lora_rows(batch, b, lora)?;
        self.launch(&inputs, b, with_lora, None)?;
        Ok(Some(b))
    }

    /// A greedy decode step through its graph: the rows' argmax ids and largest logits,
    /// or None when the caller must run the step eagerly. When the lookahead launched this
    /// step already (or a step of these rows and others that have since finished), only its
    /// result is waited for; either way the next step is launched behind it before waiting
    /// (decode_lookahead.rs), unless `batch` says a step of other rows is likely next.
    pub fn replay_greedy(
        &mut self,
        batch: &ForwardBatch,
        kv_key: u64,
        vocab_size: usize,
        lora: Option<&DeviceLora>,
    ) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        let Some((b, inputs)) = self.covered(batch, kv_key, vocab_size)? else {
            self.drop_lookahead();
            return Ok(None);
        };
        let pending = self.pending.take();
        let with_lora = self.lora_rows(batch, b, lora)?;
        let ahead = pending.and_then(|p| {
            let at = inputs.rows_within(&p.inputs).filter(|_| !with_lora);
            self.lookahead_missed += u64::from(at.is_none());
            at.map(|at| (p, at))
        });
        // The launched step holding this one's results: its argmax slot and padded size,
        // and where each of this step's rows is in it.
        let (slot, launched_b, at) = match ahead {
            Some((p, at)) => {
                self.lookahead_used += 1;
                LOOKAHEAD_USED_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (p.slot, p.b, at)
            }
            None => {
                let slot = self.launch(&inputs, b, with_lora, None)?;
                (slot, b, (0..inputs.rows()).collect())
            }
        };
        let next = (self.lookahead && batch.lookahead && !with_lora && self.events.is_none())
            .then(|| inputs.next(batch, self.block_size, self.max_model_len))
            .flatten();
        if let Some(next) = next {
            let slot = self.launch(&next, b, false, Some(&at))?;
            self.pending = Some(Lookahead { inputs: next, b, slot });
        }
        let out = self.slots.wait(slot, 2 * launched_b)?;
        let ids: Vec<u32> = at.iter().map(|&j| out[j]).collect();
        let values = at.iter().map(|&j| f32::from_bits(out[launched_b + j])).collect();
        if let Some(e) = self.events.as_mut() {
            e.collect();
        }
        if let Some(p) = self.pending.as_mut() {
            p.inputs.tokens.copy_from_slice(&ids);
        }
        Ok(Some((ids, values)))
    }

    /// After `replay` of `n` real rows: their logits as float32 [n, vocab] (a new tensor).
    pub fn logits(&self, n: usize) -> Result<Tensor> {
        let rows = self
            .buffers
            .logits
            .narrow(0, 0, n * self.vocab)?
            .reshape((n, self.vocab))?;
        // A copy: the buffer is the next replay's output.
        Ok(rows.copy()?)
    }
}

/// Rows `from..to` of a replay slot's inputs (`staged`: INPUTS_HEADER, then the graph
/// buffers' meta layout) become padding rows: token 0 at position 0 in the scratch block
/// `num_blocks` (see GraphLimits).
fn stage_padding(
    staged: &mut [u32],
    max_batch: usize,
    max_blocks: usize,
    num_blocks: usize,
    from: usize,
    to: usize,
) -> Result<()> {
    let scratch = u32::try_from(num_blocks).map_err(|_| EngineError::internal("too many KV blocks"))?;
    let meta = &mut staged[INPUTS_HEADER..];
    for r in from..to {
        meta[r] = 0;
        meta[max_batch + r] = 0;
        meta[2 * max_batch + r * max_blocks] = scratch;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sizes_cover_every_batch_once() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(3), vec![1, 2, 3]);
        assert_eq!(capture_sizes(16), vec![1, 2, 4, 8, 16]);
        assert_eq!(capture_sizes(40), vec![1, 2, 4, 8, 16, 32, 40]);
        let s = capture_sizes(256);
        assert_eq!(s.len(), 4 + 16);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*s.last().unwrap(), 256);
    }
}
