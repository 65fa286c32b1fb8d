//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) on a CUDA GPU: the same model as
//! decoder.rs, with weights resident on the device in bf16/f16/f32, matrix products through
//! cuBLAS (candle) and every other op one of our kernels (backend/cuda). The KV cache is a
//! DeviceKvCache; one upload of step metadata per forward; logits in float32.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::backend::cuda::blas::Blas;
use crate::backend::cuda::graphs::{self, DecodeGraphs, GraphLimits, LayerPtrs, ModelPtrs, ModelShape};
use crate::backend::cuda::lora::{DeviceLora, FusedParts};
use crate::backend::cuda::op_timing::{OpClock, OpTiming};
use crate::backend::cuda::ops::{
    self, AttentionDims, QkvExtras, StepMeta, ATT_MAX_GROUP, ATT_MAX_GROUP_WIDTH, ATT_MAX_HEAD_DIM,
};
use crate::backend::cuda::{device_name, device_ptr, memory_info, optional_ptr, DeviceKvCache, Kernels};
use crate::batch_size::BatchSize;
use crate::config::{Architecture, EngineArgs, ModelConfig};
use crate::error::{EngineError, ErrorCategory, Result};
use crate::kv_cache::PagedKvCache;
use crate::loader::WeightSource;
use crate::lora::LoraAdapter;
use crate::models::layers::Rotary;
use crate::models::{CausalLM, DecodeCaptureLimits, ForwardBatch};

/// Rotary tables cover at most this many positions (max_position_embeddings beyond it is
/// unusual for the models served here and would only cost memory).
const MAX_ROTARY_POSITIONS: usize = 1 << 17;
/// Shared memory of qkv_prepare holds one fused row in f32: 48 KiB without opting in.
const MAX_QKV_WIDTH: usize = 12 * 1024;
/// Room kept free for cuBLAS workspaces and allocator slack when sizing the KV cache.
const DEVICE_SLACK_BYTES: usize = 512 << 20;

struct CudaLayer {
    input_norm: Tensor,
    /// [q + 2 kv, hidden]
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// [hidden, q]
    o_proj: Tensor,
    post_attention_norm: Tensor,
    /// [2 * intermediate, hidden]
    gate_up: Tensor,
    /// [hidden, intermediate]
    down: Tensor,
}

pub struct CudaDecoderLM {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    kernels: Kernels,
    embed: Tensor,
    layers: Vec<CudaLayer>,
    final_norm: Tensor,
    /// The embedding table itself when tied.
    lm_head: Tensor,
    /// float32 [positions, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
    rotary_positions: usize,
    dims: AttentionDims,
    weight_bytes: usize,
    /// Captured decode steps (None: eager, as with enforce_eager or before capture).
    graphs: Mutex<Option<DecodeGraphs>>,
    /// VLLM_OP_TIMING: per-op device time of eager steps.
    op_timing: Option<OpTiming>,
    /// Resident LoRA adapters (created with the graphs when LoRA is enabled). Decode steps
    /// with LoRA rows replay graphs captured with the LoRA kernels (backend/cuda/lora.rs).
    lora: Option<DeviceLora>,
    /// Tensor parallel (decoder_cuda_tp.rs): completes this rank's partial o_proj and
    /// down_proj outputs in place (an NCCL all-reduce); None on one GPU.
    all_reduce: Option<PartialSum>,
    /// Penalties, top-k/top-p/min-p and draws on the device (kernels/sampling.cu).
    sampler: crate::backend::cuda::sampling::DeviceSampler,
    /// The eager lm_head's cuBLAS handle (float32 logits from bf16 weights, which candle's
    /// matmul does not give).
    logits_blas: Mutex<Blas>,
}

/// Sums a tensor over the tensor-parallel ranks, in place.
pub type PartialSum = Box<dyn Fn(&Tensor) -> Result<()> + Send + Sync>;

/// Checks that our kernels cover the model's attention geometry.
fn check_geometry(c: &ModelConfig) -> Result<()> {
    let unsupported = |what: String| Err(EngineError::unsupported(format!("CUDA backend: {what}")));
    if c.num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return unsupported(format!(
            "{} attention heads are not a multiple of {} KV heads",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if !c.head_dim.is_multiple_of(2) || c.head_dim > ATT_MAX_HEAD_DIM {
        return unsupported(format!("head_dim {} (even, at most {ATT_MAX_HEAD_DIM})", c.head_dim));
    }
    let group = c.num_attention_heads / c.num_key_value_heads;
    if group > ATT_MAX_GROUP || group * c.head_dim > ATT_MAX_GROUP_WIDTH {
        return unsupported(format!(
            "{group} query heads per KV head of dim {} (at most {ATT_MAX_GROUP} heads, {ATT_MAX_GROUP_WIDTH} values)",
            c.head_dim
        ));
    }
    if (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim > MAX_QKV_WIDTH {
        return unsupported("a fused q/k/v row wider than 12288 values".into());
    }
    Ok(())
}

impl CudaDecoderLM {
    /// Builds the model from HF-named weights, uploading each in `dtype` as it is read.
    pub fn load(config: ModelConfig, weights: &mut dyn WeightSource, device: &Device, dtype: DType) -> Result<Self> {
        check_geometry(&config)?;
        let c = &config;
        let h = c.hidden_size;
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let mut weight_bytes = 0usize;
        let mut upload = |t: Tensor| -> Result<Tensor> {
            let t = t.to_device(device)?.to_dtype(dtype)?.contiguous()?;
            weight_bytes += t.elem_count() * dtype.size_in_bytes();
            Ok(t)
        };
        let embed = upload(weights.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{p}.{name}"), shape);
            let qkv = Tensor::cat(
                &[
                    get("self_attn.q_proj.weight", &[q_width, h])?,
                    get("self_attn.k_proj.weight", &[kv_width, h])?,
                    get("self_attn.v_proj.weight", &[kv_width, h])?,
                ],
                0,
            )?;
            let qkv_bias = if c.attention_bias {
                Some(Tensor::cat(
                    &[
                        get("self_attn.q_proj.bias", &[q_width])?,
                        get("self_attn.k_proj.bias", &[kv_width])?,
                        get("self_attn.v_proj.bias", &[kv_width])?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.architecture == Architecture::Qwen3 {
                (
                    Some(get("self_attn.q_norm.weight", &[c.head_dim])?),
                    Some(get("self_attn.k_norm.weight", &[c.head_dim])?),
                )
            } else {
                (None, None)
            };
            let o_proj = get("self_attn.o_proj.weight", &[h, q_width])?;
            let gate_up = Tensor::cat(
                &[
                    get("mlp.gate_proj.weight", &[c.intermediate_size, h])?,
                    get("mlp.up_proj.weight", &[c.intermediate_size, h])?,
                ],
                0,
            )?;
            let down = get("mlp.down_proj.weight", &[h, c.intermediate_size])?;
            let input_norm = get("input_layernorm.weight", &[h])?;
            let post_attention_norm = get("post_attention_layernorm.weight", &[h])?;
            layers.push(CudaLayer {
                input_norm: upload(input_norm)?,
                qkv: upload(qkv)?,
                qkv_bias: qkv_bias.map(&mut upload).transpose()?,
                q_norm: q_norm.map(&mut upload).transpose()?,
                k_norm: k_norm.map(&mut upload).transpose()?,
                o_proj: upload(o_proj)?,
                post_attention_norm: upload(post_attention_norm)?,
                gate_up: upload(gate_up)?,
                down: upload(down)?,
            });
        }
        let final_norm = upload(weights.tensor("model.norm.weight", &[h])?)?;
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            embed.clone()
        } else {
            upload(weights.tensor("lm_head.weight", &[c.vocab_size, h])?)?
        };

        let rotary_positions = c.max_position_embeddings.clamp(1, MAX_ROTARY_POSITIONS);
        let positions: Vec<usize> = (0..rotary_positions).collect();
        let (cos, sin) = Rotary::new(c.head_dim, c.rope_theta).tables(&positions);
        let half = c.head_dim / 2;
        let cos = Tensor::from_vec(cos, (rotary_positions, half), device)?;
        let sin = Tensor::from_vec(sin, (rotary_positions, half), device)?;

        let dims = AttentionDims {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: c.sliding_window.unwrap_or(0),
        };
        let kernels = Kernels::load(device)?;
        let logits_blas = Mutex::new(Blas::new(kernels.stream())?);
        Ok(CudaDecoderLM {
            config,
            device: device.clone(),
            dtype,
            kernels,
            embed,
            layers,
            final_norm,
            lm_head,
            cos,
            sin,
            rotary_positions,
            dims,
            weight_bytes,
            graphs: Mutex::new(None),
            op_timing: OpTiming::from_env(),
            lora: None,
            all_reduce: None,
            sampler: crate::backend::cuda::sampling::DeviceSampler::load(device)?,
            logits_blas,
        })
    }

    /// Makes this model one rank of a tensor-parallel group (eager steps only: its decode
    /// graphs hold no collectives, so the group never captures them).
    pub fn set_all_reduce(&mut self, f: PartialSum) {
        self.all_reduce = Some(f);
    }

    /// Completes a partial sum over the tensor-parallel ranks (nothing on one GPU).
    fn reduce_partial(&self, t: &Tensor) -> Result<()> {
        self.all_reduce.as_ref().map_or(Ok(()), |f| f(t))
    }

    fn shape(&self) -> ModelShape {
        let c = &self.config;
        ModelShape {
            dtype: self.dtype,
            hidden: c.hidden_size,
            q_width: c.num_attention_heads * c.head_dim,
            qkv_width: (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            dims: self.dims,
        }
    }

    /// Device addresses of the weights and of `cache`, for the captured step.
    fn model_ptrs(&self, cache: &DeviceKvCache) -> crate::error::Result<ModelPtrs> {
        let c = &self.config;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, (k_cache, v_cache)) in self.layers.iter().zip(&cache.layers) {
            layers.push(LayerPtrs {
                input_norm: device_ptr(&l.input_norm)?,
                qkv: device_ptr(&l.qkv)?,
                qkv_bias: optional_ptr(l.qkv_bias.as_ref())?,
                q_norm: optional_ptr(l.q_norm.as_ref())?,
                k_norm: optional_ptr(l.k_norm.as_ref())?,
                o_proj: device_ptr(&l.o_proj)?,
                post_norm: device_ptr(&l.post_attention_norm)?,
                gate_up: device_ptr(&l.gate_up)?,
                down: device_ptr(&l.down)?,
                k_cache: device_ptr(k_cache)?,
                v_cache: device_ptr(v_cache)?,
            });
        }
        Ok(ModelPtrs {
            dtype: self.dtype,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            dims: self.dims,
            embed: device_ptr(&self.embed)?,
            final_norm: device_ptr(&self.final_norm)?,
            lm_head: device_ptr(&self.lm_head)?,
            cos: device_ptr(&self.cos)?,
            sin: device_ptr(&self.sin)?,
            layers,
        })
    }

    fn device_cache<'a>(&self, kv: &'a PagedKvCache) -> Result<&'a DeviceKvCache> {
        let cache = kv
            .device
            .as_ref()
            .ok_or_else(|| EngineError::internal("the model is on a GPU but its KV cache is not"))?;
        if cache.layers.len() != self.layers.len() || cache.dtype != self.dtype {
            return Err(EngineError::internal("the KV cache does not match the model"));
        }
        Ok(cache)
    }

    /// The key of the cache the graphs were captured against: layer 0's keys.
    fn kv_key(cache: &DeviceKvCache) -> Result<u64> {
        cache.layers.first().map_or(Ok(0), |(k, _)| device_ptr(k))
    }

    /// Runs `replay` on the captured graphs with the current cache's key: None when there
    /// are no graphs (eager) or `replay` finds the batch not covered.
    fn with_graphs<T>(
        &self,
        kv: &PagedKvCache,
        replay: impl FnOnce(&mut DecodeGraphs, u64) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let mut guard = self
            .graphs
            .lock()
            .map_err(|_| EngineError::internal("the CUDA graph state was poisoned by a panic"))?;
        let Some(graphs) = guard.as_mut() else {
            return Ok(None);
        };
        replay(graphs, Self::kv_key(self.device_cache(kv)?)?)
    }

    /// The eager forward pass up to the logits, float32 [rows, vocab].
    fn forward_eager(&self, batch: &ForwardBatch, kv: &PagedKvCache) -> Result<Option<Tensor>> {
        let cache = self.device_cache(kv)?;
        let (ids, rows, meta, num_rows) = self.step_meta(batch, kv)?;
        let k = &self.kernels;
        let eps = self.config.rms_norm_eps as f32;

        let decode_only = batch.seqs.iter().all(|s| s.query_len == 1);
        let mut clock = OpClock::start(self.op_timing.as_ref(), k.stream(), decode_only)?;
        let h = ops::embedding(k, &self.embed, &ids)?;
        clock.lap("embed")?;
        let mut delta: Option<Tensor> = None;
        let lora = match &self.lora {
            Some(l) => l.row_slots(batch)?.map(|rows| (l, rows)),
            None => None,
        };
        let lora_parts = self.lora_parts();
        for (li, (layer, (k_cache, v_cache))) in self.layers.iter().zip(&cache.layers).enumerate() {
            // h += previous MLP output (fused into the norm), x = norm(h).
            let x = ops::add_rms_norm(k, &h, delta.as_ref(), &layer.input_norm, eps)?;
            clock.lap("norm")?;
            let qkv = ops::linear(k, &x, &layer.qkv)?;
            if let Some((l, rows)) = &lora {
                clock.lap("qkv_gemm")?;
                l.apply(rows, li, &lora_parts.qkv, &x, &qkv)?;
                clock.lap("lora")?;
            }
            clock.lap("qkv_gemm")?;
            let extras = QkvExtras {
                bias: layer.qkv_bias.as_ref(),
                q_norm: layer.q_norm.as_ref(),
                k_norm: layer.k_norm.as_ref(),
                eps,
            };
            let q = ops::qkv_prepare(
                k, &qkv, &extras, &self.cos, &self.sin, &meta, k_cache, v_cache, &self.dims,
            )?;
            clock.lap("qkv_prepare")?;
            let attn = ops::paged_attention(k, &q, k_cache, v_cache, &meta, &self.dims)?;
            clock.lap("attention")?;
            let o = ops::linear(k, &attn, &layer.o_proj)?;
            if let Some((l, rows)) = &lora {
                clock.lap("o_gemm")?;
                l.apply(rows, li, &lora_parts.o, &attn, &o)?;
                clock.lap("lora")?;
            }
            self.reduce_partial(&o)?;
            clock.lap("o_gemm")?;
            let x = ops::add_rms_norm(k, &h, Some(&o), &layer.post_attention_norm, eps)?;
            clock.lap("norm")?;
            let gate_up = ops::linear(k, &x, &layer.gate_up)?;
            if let Some((l, rows)) = &lora {
                clock.lap("gate_up_gemm")?;
                l.apply(rows, li, &lora_parts.gate_up, &x, &gate_up)?;
                clock.lap("lora")?;
            }
            clock.lap("gate_up_gemm")?;
            let act = ops::silu_mul(k, &gate_up)?;
            clock.lap("silu_mul")?;
            let down = ops::linear(k, &act, &layer.down)?;
            if let Some((l, rows)) = &lora {
                clock.lap("down_gemm")?;
                l.apply(rows, li, &lora_parts.down, &act, &down)?;
                clock.lap("lora")?;
            }
            self.reduce_partial(&down)?;
            delta = Some(down);
            clock.lap("down_gemm")?;
        }
        if num_rows == 0 {
            return Ok(None);
        }
        let x = ops::add_rms_norm(k, &h, delta.as_ref(), &self.final_norm, eps)?;
        let last = ops::gather_rows(k, &x, &rows)?;
        let blas = self
            .logits_blas
            .lock()
            .map_err(|_| EngineError::internal("the lm_head cuBLAS handle was poisoned by a panic"))?;
        let logits = ops::logits(k, &blas, &last, &self.lm_head)?;
        clock.lap("lm_head")?;
        Ok(Some(logits))
    }

    /// Where each LoRA target's columns sit in the fused projections' outputs.
    fn lora_parts(&self) -> FusedParts {
        let c = &self.config;
        FusedParts::new(
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            self.kv_width(),
            c.intermediate_size,
        )
    }

    fn kv_width(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Device memory one step's activations may take at most (a generous estimate).
    fn activation_bytes(&self, max_num_batched_tokens: usize, max_num_seqs: usize) -> usize {
        let c = &self.config;
        let q_width = c.num_attention_heads * c.head_dim;
        let per_token = 4 * c.hidden_size + 2 * (q_width + 2 * self.kv_width()) + 2 * q_width + 3 * c.intermediate_size;
        let tokens = max_num_batched_tokens * per_token * self.dtype.size_in_bytes();
        // Logits in the model dtype and in float32.
        let logits = max_num_seqs.min(max_num_batched_tokens) * c.vocab_size * (self.dtype.size_in_bytes() + 4);
        2 * tokens + logits
    }

    /// Uploads the step's token ids, positions, token -> sequence map, logit rows and block
    /// tables in one copy.
    fn step_meta(&self, batch: &ForwardBatch, kv: &PagedKvCache) -> Result<(Tensor, Tensor, StepMeta, usize)> {
        let c = &self.config;
        let n = batch.token_ids.len();
        if batch.positions.len() != n {
            return Err(EngineError::internal(
                "forward batch: positions and token_ids differ in length",
            ));
        }
        if let Some(&bad) = batch.token_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::validation(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let max_blocks = batch
            .seqs
            .iter()
            .map(|s| s.context_len.div_ceil(kv.block_size))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut token_seq = vec![u32::MAX; n];
        let mut rows = Vec::new();
        let mut tables = vec![0u32; batch.seqs.len() * max_blocks];
        let mut max_context = 1;
        for (s, seq) in batch.seqs.iter().enumerate() {
            let end = seq.query_start + seq.query_len;
            let blocks = seq.context_len.div_ceil(kv.block_size);
            if end > n || seq.block_table.len() < blocks || seq.context_len > self.rotary_positions {
                return Err(EngineError::internal(format!(
                    "forward batch: seq {s} is inconsistent (tokens {}..{end} of {n}, {} blocks for context {})",
                    seq.query_start,
                    seq.block_table.len(),
                    seq.context_len
                )));
            }
            if let Some(&b) = seq.block_table[..blocks].iter().find(|&&b| b as usize >= kv.num_blocks) {
                return Err(EngineError::internal(format!(
                    "forward batch: block {b} is outside the cache"
                )));
            }
            tables[s * max_blocks..s * max_blocks + blocks].copy_from_slice(&seq.block_table[..blocks]);
            let tokens = token_seq[seq.query_start..end].iter_mut();
            for (t, (owner, &position)) in tokens.zip(&batch.positions[seq.query_start..end]).enumerate() {
                if position >= seq.context_len || *owner != u32::MAX {
                    return Err(EngineError::internal(format!(
                        "forward batch: token {} of seq {s} is past its context or in two seqs",
                        seq.query_start + t
                    )));
                }
                *owner = s as u32;
            }
            max_context = max_context.max(seq.context_len);
            // The last new token (sampling) or every new token (prompt logprobs).
            rows.extend((end - seq.num_logit_rows()..end).map(|t| t as u32));
        }
        if token_seq.contains(&u32::MAX) {
            return Err(EngineError::internal("forward batch: a token belongs to no seq"));
        }
        let num_rows = rows.len();
        // Steps with prefill chunks: attention_prefill's tiles, when it serves the model.
        let tiles = match self.kernels.prefill_tile_tokens(&self.dims, self.dtype) {
            Some(per_tile) if batch.seqs.iter().any(|s| s.query_len > 1) => batch.query_tiles(per_tile),
            _ => Vec::new(),
        };
        let mut host = Vec::with_capacity(3 * n + num_rows + tables.len() + tiles.len());
        host.extend_from_slice(&batch.token_ids);
        host.extend(batch.positions.iter().map(|&p| p as u32));
        host.extend_from_slice(&token_seq);
        host.extend_from_slice(&rows);
        host.extend_from_slice(&tables);
        host.extend_from_slice(&tiles);
        let len = host.len();
        let all = Tensor::from_vec(host, len, &self.device)?;
        let ids = all.narrow(0, 0, n)?;
        let rows = all.narrow(0, 3 * n, num_rows)?;
        let meta = StepMeta {
            num_tokens: n,
            positions: all.narrow(0, n, n)?,
            token_seq: all.narrow(0, 2 * n, n)?,
            block_tables: all.narrow(0, 3 * n + num_rows, tables.len())?,
            max_blocks,
            block_size: kv.block_size,
            max_context,
            prefill_tiles: if tiles.is_empty() {
                None
            } else {
                Some((all.narrow(0, len - tiles.len(), tiles.len())?, tiles.len() / 2))
            },
        };
        Ok((ids, rows, meta, num_rows))
    }
}

impl CausalLM for CudaDecoderLM {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor> {
        let c = &self.config;
        if batch.token_ids.is_empty() {
            return Ok(Tensor::zeros((0, c.vocab_size), DType::F32, &Device::Cpu)?);
        }
        let replayed = self.with_graphs(kv, |graphs, key| {
            match graphs.replay(batch, key, c.vocab_size, self.lora.as_ref())? {
                Some(_) => graphs.logits(batch.token_ids.len()).map(Some),
                None => Ok(None),
            }
        })?;
        if let Some(logits) = replayed {
            return Ok(logits);
        }
        match self.forward_eager(batch, kv)? {
            Some(logits) => Ok(logits),
            None => Ok(Tensor::zeros((0, c.vocab_size), DType::F32, &Device::Cpu)?),
        }
    }

    /// Greedy steps: the argmax on the device (inside the captured graph when one covers
    /// the batch), one copy of ids and largest logits back.
    fn forward_greedy(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        if batch.token_ids.is_empty() {
            return Ok(Some((Vec::new(), Vec::new())));
        }
        let replayed = self.with_graphs(kv, |graphs, key| {
            graphs.replay_greedy(batch, key, self.config.vocab_size, self.lora.as_ref())
        })?;
        if replayed.is_some() {
            return Ok(replayed);
        }
        match self.forward_eager(batch, kv)? {
            Some(logits) => ops::argmax_rows(&self.kernels, &logits).map(Some),
            None => Ok(Some((Vec::new(), Vec::new()))),
        }
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    /// Non-greedy (or penalised) steps: the logits stay on the device, where the sampler
    /// picks each row's token; only the picks come back.
    fn forward_sample(
        &self,
        batch: &ForwardBatch,
        kv: &mut PagedKvCache,
        rows: &[crate::device_sampling::DeviceSampleRow],
    ) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        if batch.token_ids.is_empty() {
            return Ok(Some((Vec::new(), Vec::new())));
        }
        let logits = self.forward(batch, kv)?;
        if logits.device().is_cpu() {
            // forward's empty result: no row wanted logits.
            return Ok(Some((Vec::new(), Vec::new())));
        }
        self.sampler.sample(&logits, rows).map(Some)
    }

    /// Captures the decode graphs for these limits (nothing with enforce_eager). A failed
    /// capture leaves the model eager and says why.
    fn prepare_decode_graphs(&mut self, limits: &DecodeCaptureLimits, kv: &PagedKvCache) -> Result<()> {
        let slot = self
            .graphs
            .get_mut()
            .map_err(|_| EngineError::internal("the CUDA graph state was poisoned by a panic"))?;
        *slot = None;
        // LoRA enabled: the slots on the device, and their graph buffers unless eager.
        if limits.max_loras > 0 {
            let mut lora = DeviceLora::new(
                &self.device,
                self.dtype,
                self.layers.len(),
                limits.max_loras,
                limits.max_lora_rank,
            )?;
            if !limits.enforce_eager {
                lora.reserve_graph_buffers(limits.max_num_seqs)?;
            }
            self.lora = Some(lora);
        }
        // A tensor-parallel rank's graphs would hold no all-reduce: it stays eager.
        if limits.enforce_eager || self.all_reduce.is_some() {
            return Ok(());
        }
        let cache = self.device_cache(kv)?;
        let ptrs = self.model_ptrs(cache)?;
        let graph_limits = GraphLimits {
            max_num_seqs: limits.max_num_seqs,
            max_model_len: limits.max_model_len.min(self.rotary_positions),
            block_size: limits.block_size,
            num_blocks: limits.num_blocks,
        };
        let started = std::time::Instant::now();
        match DecodeGraphs::capture(&self.device, &self.kernels, &ptrs, &graph_limits, self.lora.as_ref()) {
            Ok(g) => {
                tracing::info!(
                    "captured {} decode graphs in {:.0} ms",
                    g.num_graphs(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                *self
                    .graphs
                    .get_mut()
                    .map_err(|_| EngineError::internal("poisoned graph state"))? = Some(g);
            }
            Err(e) => {
                tracing::warn!("CUDA graph capture failed, decoding eagerly: {e}");
                if std::env::var_os("VLLM_STEP_TIMING").is_some() {
                    eprintln!("CUDA graph capture failed, decoding eagerly: {e}");
                }
            }
        }
        Ok(())
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn set_lora_slot(&mut self, slot: usize, adapter: Option<std::sync::Arc<LoraAdapter>>) -> Result<()> {
        if self.lora.is_none() {
            // Without prepare_decode_graphs (a model driven directly): eager LoRA only.
            let rank = adapter.as_ref().map_or(1, |a| a.rank);
            self.lora = Some(DeviceLora::new(
                &self.device,
                self.dtype,
                self.layers.len(),
                slot + 1,
                rank,
            )?);
        }
        match self.lora.as_mut() {
            Some(l) => l.set_slot(slot, adapter.as_deref()),
            None => Err(EngineError::internal("LoRA state missing")),
        }
    }

    fn supports_lora(&self) -> bool {
        true
    }

    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        DeviceKvCache::bytes_per_block(self.dtype, self.config.num_hidden_layers, block_size, self.kv_width())
    }

    fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        let c = &self.config;
        // One block more than the scheduler manages: the captured decode's padding rows
        // write their keys and values there.
        let cache = DeviceKvCache::new(
            &self.device,
            self.dtype,
            c.num_hidden_layers,
            num_blocks + 1,
            block_size,
            self.kv_width(),
        )?;
        Ok(PagedKvCache::on_device(
            cache,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        ))
    }

    /// vLLM's rule: the engine may take `gpu_memory_utilization` of the card; the KV cache
    /// gets what the weights (already resident) and the activations leave of it.
    fn kv_cache_budget(&self, args: &EngineArgs, batch: BatchSize) -> Result<Option<usize>> {
        let (free, total) = memory_info(&self.device)?;
        let allowed = (total as f64 * args.gpu_memory_utilization) as usize;
        let used = total.saturating_sub(free);
        let graph_limits = GraphLimits {
            max_num_seqs: batch.max_num_seqs,
            max_model_len: args
                .max_model_len
                .unwrap_or(self.config.max_position_embeddings)
                .min(self.rotary_positions),
            block_size: args.block_size,
            num_blocks: 0,
        };
        let graph_bytes = if args.enforce_eager {
            0
        } else {
            graphs::buffer_bytes(&self.shape(), &graph_limits)
        };
        // The adapters' device copies (backend/cuda/lora.rs), uploaded after the cache is sized.
        let lora_bytes = if args.enable_lora {
            let rank = crate::backend::cuda::lora::device_rank(args.max_lora_rank);
            args.max_loras * LoraAdapter::slot_bytes(&self.config, rank, self.dtype.size_in_bytes())
        } else {
            0
        };
        let reserve = self.activation_bytes(batch.max_num_batched_tokens, batch.max_num_seqs)
            + graph_bytes
            + lora_bytes
            + DEVICE_SLACK_BYTES;
        let budget = allowed.saturating_sub(used).saturating_sub(reserve);
        if budget < self.kv_bytes_per_block(args.block_size) {
            return Err(EngineError::new(
                ErrorCategory::ResourceExhausted,
                format!(
                    "no GPU memory left for the KV cache: {:.2} GiB allowed (gpu_memory_utilization {}), \
                 {:.2} GiB in use after loading the weights, {:.2} GiB kept for activations and LoRA slots",
                    allowed as f64 / (1u64 << 30) as f64,
                    args.gpu_memory_utilization,
                    used as f64 / (1u64 << 30) as f64,
                    reserve as f64 / (1u64 << 30) as f64
                ),
            ));
        }
        Ok(Some(budget))
    }

    fn batch_defaults(&self) -> Result<BatchSize> {
        let (_, total) = memory_info(&self.device)?;
        Ok(BatchSize::for_gpu(total, &device_name(&self.device)?))
    }
}
