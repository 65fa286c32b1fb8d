//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): pre-norm blocks of grouped-query
//! attention with rotary positions and a SiLU-gated MLP. The families differ only in
//! options: QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window (Mistral).

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::backend::cpu::attention::{AttentionShape, QueryToken};
use crate::config::ModelConfig;
use crate::error::Result;
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
    /// Resident LoRA adapters by slot (see `CausalLM::set_lora_slot`).
    lora_slots: Vec<Option<Arc<LoraAdapter>>>,
}

impl DecoderLM {
    /// Builds the model from HF-named weights (`model.layers.0.self_attn.q_proj.weight`...).
    pub fn load(config: ModelConfig, weights: &mut dyn WeightSource) -> Result<Self> {
        let c = &config;
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let h = c.hidden_size;
        let (embed, tied_head) = match weights.quantized("model.embed_tokens.weight", &[c.vocab_size, h])? {
            Some(q) => {
                let q = Arc::new(q);
                (Embedding::Quantized(q.clone()), Linear::quantized(vec![q])?)
            }
            None => {
                let t = weights
                    .tensor("model.embed_tokens.weight", &[c.vocab_size, h])?
                    .contiguous()?;
                (Embedding::F32(t.clone()), Linear::new(t)?)
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
            )?;
            let o_proj = fused_projection(weights, &[proj("self_attn.o_proj.weight", h, q_width)])?;
            let gate_up = fused_projection(
                weights,
                &[
                    proj("mlp.gate_proj.weight", c.intermediate_size, h),
                    proj("mlp.up_proj.weight", c.intermediate_size, h),
                ],
            )?;
            let down = fused_projection(weights, &[proj("mlp.down_proj.weight", h, c.intermediate_size)])?;
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
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            tied_head
        } else {
            fused_projection(weights, &[("lm_head.weight".to_string(), [c.vocab_size, h])])?
        };
        let rotary = Rotary::new(c.head_dim, c.rope_theta);
        Ok(DecoderLM {
            config,
            embed,
            layers: layers_out,
            final_norm,
            lm_head,
            rotary,
            lora_slots: Vec::new(),
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
        qkv: &[f32],
        tokens: &[QueryToken],
        cos: &[f32],
        sin: &[f32],
        shape: &AttentionShape,
        cache: &mut crate::kv_cache::paged_cache::LayerKv,
    ) -> Vec<f32> {
        let c = &self.config;
        let hd = c.head_dim;
        let half = hd / 2;
        let q_width = c.num_attention_heads * hd;
        let kv_width = c.num_key_value_heads * hd;
        let row_width = q_width + 2 * kv_width;
        let eps = c.rms_norm_eps as f32;
        let mut q_out = vec![0.0f32; tokens.len() * q_width];
        let mut row = vec![0.0f32; row_width];
        for (t, token) in tokens.iter().enumerate() {
            row.copy_from_slice(&qkv[t * row_width..(t + 1) * row_width]);
            if let Some(bias) = &layer.qkv_bias {
                layers::add_in_place(&mut row, bias);
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
        q_out
    }
}

impl DecoderLM {
    /// Adds each LoRA sequence's delta (shrink x·Aᵀ, expand ·Bᵀ·scale) onto its rows of a
    /// projection output `y` ([tokens, width]); `parts` place each target's columns in a
    /// fused output. `x` is the projection input (None: no sequence uses LoRA).
    fn add_lora(
        &self,
        batch: &ForwardBatch,
        layer: usize,
        parts: &[(LoraTarget, usize)],
        x: Option<&[f32]>,
        y: Tensor,
    ) -> Result<Tensor> {
        let Some(x) = x else { return Ok(y) };
        crate::lora::add_batch_deltas_in_place(&self.lora_slots, &batch.seqs, layer, parts, x, &y)?;
        Ok(y)
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

        let mut h = self.embed.gather(&batch.token_ids, hidden)?;

        let with_lora = batch.seqs.iter().any(|s| s.lora_slot.is_some());
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let qkv_parts = [
            (LoraTarget::Q, 0),
            (LoraTarget::K, q_width),
            (LoraTarget::V, q_width + kv_width),
        ];
        let gate_up_parts = [(LoraTarget::Gate, 0), (LoraTarget::Up, c.intermediate_size)];
        for (li, (layer, cache)) in self.layers.iter().zip(kv.layers.iter_mut()).enumerate() {
            let x = layers::rms_norm(&h, &layer.input_norm, eps);
            let x_in = with_lora.then(|| x.clone());
            let qkv = layer.qkv.forward(x, n)?;
            let qkv = self.add_lora(batch, li, &qkv_parts, x_in.as_deref(), qkv)?;
            let q = layers::with_f32_slice(&qkv, |qkv| {
                self.prepare_qkv(layer, qkv, &tokens, &cos, &sin, &shape, cache)
            })?;
            let mut attn = vec![0.0f32; q.len()];
            shape.paged_attention(&q, &tokens, cache, &mut attn);
            let x_in = with_lora.then(|| attn.clone());
            let o = layer.o_proj.forward(attn, n)?;
            let o = self.add_lora(batch, li, &[(LoraTarget::O, 0)], x_in.as_deref(), o)?;
            layers::with_f32_slice(&o, |o| layers::add_in_place(&mut h, o))?;

            let x = layers::rms_norm(&h, &layer.post_attention_norm, eps);
            let x_in = with_lora.then(|| x.clone());
            let gate_up = layer.gate_up.forward(x, n)?;
            let gate_up = self.add_lora(batch, li, &gate_up_parts, x_in.as_deref(), gate_up)?;
            let act = layers::with_f32_slice(&gate_up, |gu| layers::silu_mul(gu, c.intermediate_size))?;
            let x_in = with_lora.then(|| act.clone());
            let down = layer.down.forward(act, n)?;
            let down = self.add_lora(batch, li, &[(LoraTarget::Down, 0)], x_in.as_deref(), down)?;
            layers::with_f32_slice(&down, |d| layers::add_in_place(&mut h, d))?;
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
        let x = layers::rms_norm(&last_rows, &self.final_norm, eps);
        self.lm_head.forward(x, rows)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
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
fn fused_projection(weights: &mut dyn WeightSource, parts: &[(String, [usize; 2])]) -> Result<Linear> {
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
        [one] => Linear::new(one.clone()),
        many => Linear::new(Tensor::cat(many, 0)?),
    }
}
