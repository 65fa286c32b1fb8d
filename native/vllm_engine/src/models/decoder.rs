//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): pre-norm blocks of grouped-query
//! attention with rotary positions and a SiLU-gated MLP. The families differ only in
//! options: QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window (Mistral).

use candle_core::{Device, Tensor};

use crate::backend::cpu::attention::{AttentionShape, QueryToken};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::PagedKvCache;
use crate::loader::WeightSource;
use crate::models::layers::{self, Linear, Rotary};
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
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    rotary: Rotary,
}

impl DecoderLM {
    /// Builds the model from HF-named weights (`model.layers.0.self_attn.q_proj.weight`...).
    pub fn load(config: ModelConfig, weights: &mut dyn WeightSource) -> Result<Self> {
        let c = &config;
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let embed_t = weights.tensor("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut layers_out = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{p}.{name}"), shape);
            let q = get("self_attn.q_proj.weight", &[q_width, c.hidden_size])?;
            let k = get("self_attn.k_proj.weight", &[kv_width, c.hidden_size])?;
            let v = get("self_attn.v_proj.weight", &[kv_width, c.hidden_size])?;
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
            let gate = get("mlp.gate_proj.weight", &[c.intermediate_size, c.hidden_size])?;
            let up = get("mlp.up_proj.weight", &[c.intermediate_size, c.hidden_size])?;
            layers_out.push(DecoderLayer {
                input_norm: layers::to_f32_vec(&get("input_layernorm.weight", &[c.hidden_size])?)?,
                qkv: Linear::new(Tensor::cat(&[&q, &k, &v], 0)?)?,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj: Linear::new(get("self_attn.o_proj.weight", &[c.hidden_size, q_width])?)?,
                post_attention_norm: layers::to_f32_vec(&get("post_attention_layernorm.weight", &[c.hidden_size])?)?,
                gate_up: Linear::new(Tensor::cat(&[&gate, &up], 0)?)?,
                down: Linear::new(get("mlp.down_proj.weight", &[c.hidden_size, c.intermediate_size])?)?,
            });
        }
        let final_norm = layers::to_f32_vec(&weights.tensor("model.norm.weight", &[c.hidden_size])?)?;
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            Linear::new(embed_t.clone())?
        } else {
            Linear::new(weights.tensor("lm_head.weight", &[c.vocab_size, c.hidden_size])?)?
        };
        let embed = embed_t.contiguous()?;
        let rotary = Rotary::new(c.head_dim, c.rope_theta);
        Ok(DecoderLM {
            config,
            embed,
            layers: layers_out,
            final_norm,
            lm_head,
            rotary,
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

    /// Rejects a batch that would index outside the cache or the vocabulary.
    fn check_batch<'a>(&self, batch: &'a ForwardBatch, kv: &PagedKvCache) -> Result<Vec<QueryToken<'a>>> {
        let c = &self.config;
        if kv.layers.len() != c.num_hidden_layers
            || kv.num_kv_heads != c.num_key_value_heads
            || kv.head_dim != c.head_dim
        {
            return Err(EngineError::internal(format!(
                "KV cache shape (layers {}, kv heads {}, head_dim {}) does not fit the model ({}, {}, {})",
                kv.layers.len(),
                kv.num_kv_heads,
                kv.head_dim,
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim
            )));
        }
        let layer_len = kv.num_blocks * kv.block_size * kv.num_kv_heads * kv.head_dim;
        if kv.block_size == 0 || kv.layers.iter().any(|l| l.k.len() != layer_len || l.v.len() != layer_len) {
            return Err(EngineError::internal("KV cache buffers do not match its declared geometry"));
        }
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
        let mut tokens: Vec<Option<QueryToken>> = vec![None; n];
        for (s, seq) in batch.seqs.iter().enumerate() {
            let end = seq.query_start + seq.query_len;
            if seq.want_logits && seq.query_len == 0 {
                return Err(EngineError::internal(format!(
                    "forward batch: seq {s} wants logits but has no new tokens"
                )));
            }
            if end > n {
                return Err(EngineError::internal(format!(
                    "forward batch: seq {s} reaches past the tokens"
                )));
            }
            let blocks_needed = seq.context_len.div_ceil(kv.block_size);
            if seq.block_table.len() < blocks_needed {
                return Err(EngineError::internal(format!(
                    "forward batch: seq {s} has {} blocks for {} tokens",
                    seq.block_table.len(),
                    seq.context_len
                )));
            }
            if let Some(&b) = seq.block_table[..blocks_needed]
                .iter()
                .find(|&&b| b as usize >= kv.num_blocks)
            {
                return Err(EngineError::internal(format!(
                    "forward batch: block {b} is outside the cache"
                )));
            }
            for (t, (slot, &position)) in tokens[seq.query_start..end]
                .iter_mut()
                .zip(&batch.positions[seq.query_start..end])
                .enumerate()
            {
                if position >= seq.context_len || slot.is_some() {
                    return Err(EngineError::internal(format!(
                        "forward batch: token {} of seq {s} is at position {position} of context {} or in two seqs",
                        seq.query_start + t,
                        seq.context_len
                    )));
                }
                *slot = Some(QueryToken {
                    position,
                    block_table: &seq.block_table,
                });
            }
        }
        tokens
            .into_iter()
            .enumerate()
            .map(|(t, q)| q.ok_or_else(|| EngineError::internal(format!("forward batch: token {t} belongs to no seq"))))
            .collect()
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

impl CausalLM for DecoderLM {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor> {
        let tokens = self.check_batch(batch, kv)?;
        let c = &self.config;
        if tokens.is_empty() {
            return Ok(Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        let hidden = c.hidden_size;
        let n = tokens.len();
        let eps = c.rms_norm_eps as f32;
        let shape = self.attention_shape(kv.block_size);
        let (cos, sin) = self.rotary.tables(&batch.positions);

        let mut h = Vec::with_capacity(n * hidden);
        layers::with_f32_slice(&self.embed, |embed| {
            for &id in &batch.token_ids {
                let at = id as usize * hidden;
                h.extend_from_slice(&embed[at..at + hidden]);
            }
        })?;

        for (layer, cache) in self.layers.iter().zip(kv.layers.iter_mut()) {
            let x = layers::rms_norm(&h, &layer.input_norm, eps);
            let qkv = layer.qkv.forward(x, n)?;
            let q = layers::with_f32_slice(&qkv, |qkv| {
                self.prepare_qkv(layer, qkv, &tokens, &cos, &sin, &shape, cache)
            })?;
            let mut attn = vec![0.0f32; q.len()];
            shape.paged_attention(&q, &tokens, cache, &mut attn);
            let o = layer.o_proj.forward(attn, n)?;
            layers::with_f32_slice(&o, |o| layers::add_in_place(&mut h, o))?;

            let x = layers::rms_norm(&h, &layer.post_attention_norm, eps);
            let gate_up = layer.gate_up.forward(x, n)?;
            let act = layers::with_f32_slice(&gate_up, |gu| layers::silu_mul(gu, c.intermediate_size))?;
            let down = layer.down.forward(act, n)?;
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
}
