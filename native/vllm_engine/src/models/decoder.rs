//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): pre-norm blocks of grouped-query
//! attention with rotary positions and a SiLU-gated MLP. The families differ only in
//! options: QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window (Mistral).

use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::backend::cpu::attention::{AttentionShape, QueryToken};
use crate::backend::cpu::matmul::WeightFormat;
use crate::backend::cpu::phase_timer::{timed, Phase, PhaseTimes};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::paged_cache::KvDtype;
use crate::kv_cache::PagedKvCache;
use crate::loader::WeightSource;
use crate::lora::{LoraAdapter, LoraTarget};
use crate::models::batch::check_batch;
use crate::models::layers::{self, Embedding, Linear, Rotary};
use crate::models::{CausalLM, ForwardBatch};

struct DecoderLayer {
    input_norm: Vec<f32>,
    /// q, k and v projections fused into one [q + 2 kv, hidden] weight.
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o_proj: Linear,
    post_attention_norm: Vec<f32>,
    /// gate and up projections fused into one [2 * intermediate, hidden] weight.
    gate_up: Linear,
    down: Linear,
}

pub struct DecoderLM {
    config: ModelConfig,
    /// [vocab, hidden]; shares its storage with the LM head when embeddings are tied.
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    rotary: Rotary,
    /// What the KV cache stores: bfloat16 for bfloat16 or GGML-quantized weights (vLLM's
    /// `kv_cache_dtype: "auto"`, which for GGUF is the half-precision compute type; llama.cpp
    /// keeps f16), float32 otherwise.
    kv_dtype: KvDtype,
    /// Resident LoRA adapters by slot (see `CausalLM::set_lora_slot`).
    lora_slots: Vec<Option<Arc<LoraAdapter>>>,
    times: Option<PhaseTimes>,
    /// Activation buffers reused from step to step (grown, never shrunk).
    scratch: Mutex<Scratch>,
}

#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    x: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

impl Drop for DecoderLM {
    fn drop(&mut self) {
        if let Some(t) = &self.times {
            eprintln!("{}", t.report());
        }
    }
}

impl DecoderLM {
    /// Builds the model from HF-named weights (`model.layers.0.self_attn.q_proj.weight`...).
    pub fn load(config: ModelConfig, weights: &mut dyn WeightSource) -> Result<Self> {
        Self::load_as(config, weights, WeightFormat::F32)
    }

    /// As `load`, with the float projection weights held as `format` (bfloat16 halves the
    /// bytes each decode step streams; activations and sums stay float32).
    pub fn load_as(config: ModelConfig, weights: &mut dyn WeightSource, format: WeightFormat) -> Result<Self> {
        let c = &config;
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let h = c.hidden_size;
        let (embed, tied_head) = match weights.quantized("model.embed_tokens.weight", &[c.vocab_size, h])? {
            Some(q) => {
                let q = Arc::new(q);
                (Embedding::Quantized(q.clone()), Some(Linear::quantized(vec![q])?))
            }
            None => {
                let t = weights
                    .tensor("model.embed_tokens.weight", &[c.vocab_size, h])?
                    .contiguous()?;
                let untied = !c.tie_word_embeddings && weights.contains("lm_head.weight");
                if untied {
                    // The head loads below; the table stays a plain tensor for lookups.
                    (Embedding::F32(t), None)
                } else {
                    // One packed copy serves the LM head and, row by row, the lookups.
                    let head = Linear::packed(t, format)?;
                    let packed = head
                        .packed_f32()
                        .ok_or_else(|| crate::error::EngineError::internal("tied head is not packed float32"))?;
                    (Embedding::Packed(packed), Some(head))
                }
            }
        };
        let mut layers_out = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{p}.{name}"), shape);
            let qkv_bias = if c.attention_bias {
                let qb = get("self_attn.q_proj.bias", &[q_width])?;
                let kb = get("self_attn.k_proj.bias", &[kv_width])?;
                let vb = get("self_attn.v_proj.bias", &[kv_width])?;
                Some(layers::to_f32_vec(&Tensor::cat(&[&qb, &kb, &vb], 0)?)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.architecture == crate::config::Architecture::Qwen3 {
                (
                    Some(layers::to_f32_vec(&get("self_attn.q_norm.weight", &[c.head_dim])?)?),
                    Some(layers::to_f32_vec(&get("self_attn.k_norm.weight", &[c.head_dim])?)?),
                )
            } else {
                (None, None)
            };
            let input_norm = layers::to_f32_vec(&get("input_layernorm.weight", &[h])?)?;
            let post_attention_norm = layers::to_f32_vec(&get("post_attention_layernorm.weight", &[h])?)?;
            let proj = |name: &str, rows: usize, cols: usize| (format!("{p}.{name}"), [rows, cols]);
            let qkv = fused_projection(
                weights,
                &[
                    proj("self_attn.q_proj.weight", q_width, h),
                    proj("self_attn.k_proj.weight", kv_width, h),
                    proj("self_attn.v_proj.weight", kv_width, h),
                ],
                format,
            )?;
            let o_proj = fused_projection(weights, &[proj("self_attn.o_proj.weight", h, q_width)], format)?;
            let gate_up = fused_projection(
                weights,
                &[
                    proj("mlp.gate_proj.weight", c.intermediate_size, h),
                    proj("mlp.up_proj.weight", c.intermediate_size, h),
                ],
                format,
            )?;
            let down = fused_projection(weights, &[proj("mlp.down_proj.weight", h, c.intermediate_size)], format)?;
            layers_out.push(DecoderLayer {
                input_norm,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj,
                post_attention_norm,
                gate_up,
                down,
            });
        }
        let final_norm = layers::to_f32_vec(&weights.tensor("model.norm.weight", &[h])?)?;
        let lm_head = match tied_head {
            Some(head) if c.tie_word_embeddings || !weights.contains("lm_head.weight") => head,
            _ => fused_projection(weights, &[("lm_head.weight".to_string(), [c.vocab_size, h])], format)?,
        };
        let rotary = Rotary::new(c.head_dim, c.rope_theta);
        let kv_dtype = if format == WeightFormat::Bf16 || layers_out.iter().any(|l| l.qkv.is_quantized()) {
            KvDtype::Bf16
        } else {
            KvDtype::F32
        };
        Ok(DecoderLM {
            config,
            embed,
            layers: layers_out,
            final_norm,
            lm_head,
            rotary,
            kv_dtype,
            lora_slots: Vec::new(),
            times: PhaseTimes::new(),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    fn attention_shape(&self, block_size: usize) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size,
            sliding_window: c.sliding_window,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    /// Splits fused qkv rows into queries (returned) and keys/values (written to the cache),
    /// after bias, Qwen3's q/k norm and rotary.
    #[allow(clippy::too_many_arguments)]
    fn prepare_qkv(
        &self,
        layer: &DecoderLayer,
        qkv: &mut [f32],
        tokens: &[QueryToken],
        cos: &[f32],
        sin: &[f32],
        shape: &AttentionShape,
        cache: &mut crate::kv_cache::paged_cache::LayerKv,
        q_out: &mut Vec<f32>,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let half = hd / 2;
        let q_width = c.num_attention_heads * hd;
        let kv_width = c.num_key_value_heads * hd;
        let row_width = q_width + 2 * kv_width;
        let eps = c.rms_norm_eps as f32;
        q_out.resize(tokens.len() * q_width, 0.0);
        for (t, token) in tokens.iter().enumerate() {
            let row = &mut qkv[t * row_width..(t + 1) * row_width];
            if let Some(bias) = &layer.qkv_bias {
                layers::add_in_place(row, bias);
            }
            let (cos_t, sin_t) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            let (q, kv) = row.split_at_mut(q_width);
            let (k, v) = kv.split_at_mut(kv_width);
            for head in q.chunks_mut(hd) {
                if let Some(w) = &layer.q_norm {
                    layers::rms_norm_in_place(head, w, eps);
                }
                layers::apply_rotary(head, cos_t, sin_t);
            }
            for head in k.chunks_mut(hd) {
                if let Some(w) = &layer.k_norm {
                    layers::rms_norm_in_place(head, w, eps);
                }
                layers::apply_rotary(head, cos_t, sin_t);
            }
            shape.write_kv(cache, *token, k, v);
            q_out[t * q_width..(t + 1) * q_width].copy_from_slice(q);
        }
    }
}

impl DecoderLM {
    /// Adds each LoRA sequence's delta (shrink x·Aᵀ, expand ·Bᵀ·scale) onto its rows of a
    /// projection output `y` ([tokens, width]); `parts` place each target's columns in a
    /// fused output. `x` is the projection input.
    fn add_lora(
        &self,
        batch: &ForwardBatch,
        layer: usize,
        parts: &[(LoraTarget, usize)],
        x: &[f32],
        y: &mut [f32],
        width: usize,
    ) -> Result<()> {
        crate::lora::add_batch_deltas(&self.lora_slots, &batch.seqs, layer, parts, x, y, width)?;
        Ok(())
    }
}

impl CausalLM for DecoderLM {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor> {
        let tokens = check_batch(batch, kv, &self.config)?;
        let c = &self.config;
        if tokens.is_empty() {
            return Ok(Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        let hidden = c.hidden_size;
        let n = tokens.len();
        let eps = c.rms_norm_eps as f32;
        let shape = self.attention_shape(kv.block_size);
        let (cos, sin) = self.rotary.tables(&batch.positions);

        let tm = &self.times;
        if let Some(t) = tm {
            t.step(n, batch.seqs.len());
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Scratch {
            h,
            x,
            qkv,
            q,
            attn,
            proj,
            gate_up,
            act,
        } = &mut *guard;
        timed(tm, Phase::Embed, || self.embed.gather_into(&batch.token_ids, hidden, h))?;

        let with_lora = batch.seqs.iter().any(|s| s.lora_slot.is_some());
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let qkv_parts = [
            (LoraTarget::Q, 0),
            (LoraTarget::K, q_width),
            (LoraTarget::V, q_width + kv_width),
        ];
        let inter = c.intermediate_size;
        let gate_up_parts = [(LoraTarget::Gate, 0), (LoraTarget::Up, inter)];
        for (li, (layer, cache)) in self.layers.iter().zip(kv.layers.iter_mut()).enumerate() {
            timed(tm, Phase::Norm, || layers::rms_norm_into(h, &layer.input_norm, eps, x));
            timed(tm, Phase::Qkv, || layer.qkv.forward_into(x, n, qkv))?;
            if with_lora {
                let width = layer.qkv.out_features();
                timed(tm, Phase::Lora, || self.add_lora(batch, li, &qkv_parts, x, qkv, width))?;
            }
            timed(tm, Phase::Rotary, || {
                self.prepare_qkv(layer, qkv, &tokens, &cos, &sin, &shape, cache, q)
            });
            attn.resize(q.len(), 0.0);
            timed(tm, Phase::Attention, || shape.paged_attention(q, &tokens, cache, attn));
            timed(tm, Phase::OProj, || layer.o_proj.forward_into(attn, n, proj))?;
            if with_lora {
                timed(tm, Phase::Lora, || {
                    self.add_lora(batch, li, &[(LoraTarget::O, 0)], attn, proj, hidden)
                })?;
            }
            layers::add_in_place(h, proj);

            timed(tm, Phase::Norm, || {
                layers::rms_norm_into(h, &layer.post_attention_norm, eps, x)
            });
            timed(tm, Phase::GateUp, || layer.gate_up.forward_into(x, n, gate_up))?;
            if with_lora {
                timed(tm, Phase::Lora, || {
                    self.add_lora(batch, li, &gate_up_parts, x, gate_up, 2 * inter)
                })?;
            }
            timed(tm, Phase::Act, || layers::silu_mul_into(gate_up, inter, act));
            timed(tm, Phase::Down, || layer.down.forward_into(act, n, proj))?;
            if with_lora {
                timed(tm, Phase::Lora, || {
                    self.add_lora(batch, li, &[(LoraTarget::Down, 0)], act, proj, hidden)
                })?;
            }
            layers::add_in_place(h, proj);
        }

        // Only the rows that need logits go through the final norm and the LM head.
        let mut last_rows = Vec::new();
        for t in super::logit_token_indices(batch) {
            last_rows.extend_from_slice(&h[t * hidden..(t + 1) * hidden]);
        }
        let rows = last_rows.len() / hidden;
        if rows == 0 {
            return Ok(Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        layers::rms_norm_into(&last_rows, &self.final_norm, eps, x);
        let mut logits = Vec::new();
        timed(tm, Phase::LmHead, || self.lm_head.forward_into(x, rows, &mut logits))?;
        Ok(Tensor::from_vec(logits, (rows, c.vocab_size), &Device::Cpu)?)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        let c = &self.config;
        self.kv_dtype
            .block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim)
    }

    fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        let c = &self.config;
        Ok(PagedKvCache::with_dtype(
            self.kv_dtype,
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        ))
    }

    fn weight_bytes(&self) -> usize {
        let f32_bytes = |v: &[f32]| v.len() * 4;
        let mut total = self.embed.bytes() + f32_bytes(&self.final_norm);
        if !self.config.tie_word_embeddings {
            total += self.lm_head.weight_bytes();
        }
        for l in &self.layers {
            total += f32_bytes(&l.input_norm) + f32_bytes(&l.post_attention_norm);
            total += [&l.qkv_bias, &l.q_norm, &l.k_norm]
                .iter()
                .map(|v| v.as_deref().map_or(0, f32_bytes))
                .sum::<usize>();
            total += [&l.qkv, &l.o_proj, &l.gate_up, &l.down]
                .iter()
                .map(|x| x.weight_bytes())
                .sum::<usize>();
        }
        total
    }

    fn set_lora_slot(&mut self, slot: usize, adapter: Option<Arc<LoraAdapter>>) -> Result<()> {
        if self.lora_slots.len() <= slot {
            self.lora_slots.resize(slot + 1, None);
        }
        self.lora_slots[slot] = adapter;
        Ok(())
    }

    fn supports_lora(&self) -> bool {
        true
    }
}

/// One projection over the row-wise concatenation of `parts` (name, [rows, cols]): GGML
/// blocks when the source keeps every part quantized (parts of one GGML type share one
/// matrix: rows are whole blocks, so concatenating rows is concatenating bytes), else f32.
fn fused_projection(
    weights: &mut dyn WeightSource,
    parts: &[(String, [usize; 2])],
    format: WeightFormat,
) -> Result<Linear> {
    let mut quantized = Vec::with_capacity(parts.len());
    for (name, shape) in parts {
        match weights.quantized(name, shape)? {
            Some(q) => quantized.push(q),
            None => break,
        }
    }
    if quantized.len() == parts.len() {
        let mut groups: Vec<QTensor> = Vec::new();
        for q in quantized {
            match groups.last_mut() {
                Some(last) if last.dtype() == q.dtype() => {
                    let (rows, cols) = (last.shape().dims()[0] + q.shape().dims()[0], last.shape().dims()[1]);
                    let mut bytes = last.data()?.into_owned();
                    bytes.extend_from_slice(&q.data()?);
                    *last = qtensor_from_ggml(q.dtype(), &bytes, vec![rows, cols], &Device::Cpu)?;
                }
                _ => groups.push(q),
            }
        }
        return Linear::quantized(groups.into_iter().map(Arc::new).collect());
    }
    let tensors = parts
        .iter()
        .map(|(name, shape)| weights.tensor(name, shape))
        .collect::<Result<Vec<_>>>()?;
    match tensors.as_slice() {
        [one] => Linear::packed(one.clone(), format),
        many => Linear::packed(Tensor::cat(many, 0)?, format),
    }
}
