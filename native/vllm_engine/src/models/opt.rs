//! OPT (facebook/opt-*): learned absolute positions (offset by 2), LayerNorm with bias,
//! ReLU MLP, biases on every projection, pre- or post-norm blocks, and for opt-350m
//! projections between a narrower word embedding and the hidden size.

use candle_core::{Device, Tensor};

use crate::backend::cpu::attention::AttentionShape;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::PagedKvCache;
use crate::loader::WeightSource;
use crate::models::batch::check_batch;
use crate::models::layers::{self, LayerNorm, Linear};
use crate::models::{CausalLM, ForwardBatch};

/// OPT's learned position table starts at row 2 (rows 0-1 are a fairseq padding leftover).
const POSITION_OFFSET: usize = 2;

/// The config.json keys of OPT that ModelConfig does not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct OptOptions {
    /// true: LayerNorm before attention and MLP (all sizes but 350m); false: after the residual.
    pub do_layer_norm_before: bool,
    /// Width of the token embeddings; != hidden_size means project_in/project_out exist.
    pub word_embed_proj_dim: usize,
    pub has_final_layer_norm: bool,
    pub activation: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Gelu,
}

impl OptOptions {
    pub fn from_hf_json(json: &str, hidden_size: usize) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| EngineError::validation(format!("config.json is not valid JSON: {e}")))?;
        let do_layer_norm_before = v.get("do_layer_norm_before").and_then(|x| x.as_bool()).unwrap_or(true);
        let remove_final = v
            .get("_remove_final_layer_norm")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let activation = match v.get("activation_function").and_then(|x| x.as_str()).unwrap_or("relu") {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(EngineError::unsupported(format!(
                    "OPT activation_function {other:?} is not supported (relu, gelu)"
                )))
            }
        };
        if v.get("enable_bias").and_then(|x| x.as_bool()) == Some(false) {
            return Err(EngineError::unsupported(
                "OPT without biases (enable_bias false) is not supported",
            ));
        }
        if v.get("layer_norm_elementwise_affine").and_then(|x| x.as_bool()) == Some(false) {
            return Err(EngineError::unsupported(
                "OPT without LayerNorm weights is not supported",
            ));
        }
        Ok(OptOptions {
            do_layer_norm_before,
            word_embed_proj_dim: v
                .get("word_embed_proj_dim")
                .and_then(|x| x.as_u64())
                .map_or(hidden_size, |x| x as usize),
            // transformers keeps the final norm only for pre-norm models.
            has_final_layer_norm: do_layer_norm_before && !remove_final,
            activation,
        })
    }
}

struct OptLayer {
    attn_norm: LayerNorm,
    /// q, k and v with their biases fused into one [3 hidden, hidden] projection.
    qkv: Linear,
    out_proj: Linear,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct OptLM {
    config: ModelConfig,
    options: OptOptions,
    /// [vocab, word_embed_proj_dim]; also the LM head's storage when tied.
    embed: Tensor,
    /// [max_position_embeddings + 2, hidden].
    positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_norm: Option<LayerNorm>,
    lm_head: Linear,
}

fn layer_norm(weights: &mut dyn WeightSource, prefix: &str, dim: usize, eps: f32) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: layers::to_f32_vec(&weights.tensor(&format!("{prefix}.weight"), &[dim])?)?,
        bias: layers::to_f32_vec(&weights.tensor(&format!("{prefix}.bias"), &[dim])?)?,
        eps,
    })
}

fn linear(weights: &mut dyn WeightSource, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
    let w = weights.tensor(&format!("{prefix}.weight"), &[out, inp])?;
    let b = weights.tensor(&format!("{prefix}.bias"), &[out])?;
    Linear::new(w)?.with_bias(b)
}

impl OptLM {
    /// Builds the model from HF-named weights (`model.decoder.layers.0.fc1.weight`...).
    pub fn load(config: ModelConfig, options: OptOptions, weights: &mut dyn WeightSource) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let proj = options.word_embed_proj_dim;
        if c.num_key_value_heads != c.num_attention_heads || c.head_dim * c.num_attention_heads != h {
            return Err(EngineError::validation(
                "OPT config: heads must split hidden_size evenly, with no grouped keys/values",
            ));
        }
        let embed = weights.tensor("model.decoder.embed_tokens.weight", &[c.vocab_size, proj])?;
        let positions = weights.tensor(
            "model.decoder.embed_positions.weight",
            &[c.max_position_embeddings + POSITION_OFFSET, h],
        )?;
        let (project_in, project_out) = if proj != h {
            let pin = weights.tensor("model.decoder.project_in.weight", &[h, proj])?;
            let pout = weights.tensor("model.decoder.project_out.weight", &[proj, h])?;
            (Some(Linear::new(pin)?), Some(Linear::new(pout)?))
        } else {
            (None, None)
        };
        let mut layers_out = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.decoder.layers.{i}");
            let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{p}.{name}"), shape);
            let mut part = |name: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    get(&format!("self_attn.{name}.weight"), &[h, h])?,
                    get(&format!("self_attn.{name}.bias"), &[h])?,
                ))
            };
            let (qw, qb) = part("q_proj")?;
            let (kw, kb) = part("k_proj")?;
            let (vw, vb) = part("v_proj")?;
            let qkv = Linear::new(Tensor::cat(&[&qw, &kw, &vw], 0)?)?.with_bias(Tensor::cat(&[&qb, &kb, &vb], 0)?)?;
            layers_out.push(OptLayer {
                attn_norm: layer_norm(weights, &format!("{p}.self_attn_layer_norm"), h, eps)?,
                qkv,
                out_proj: linear(weights, &format!("{p}.self_attn.out_proj"), h, h)?,
                mlp_norm: layer_norm(weights, &format!("{p}.final_layer_norm"), h, eps)?,
                fc1: linear(weights, &format!("{p}.fc1"), c.intermediate_size, h)?,
                fc2: linear(weights, &format!("{p}.fc2"), h, c.intermediate_size)?,
            });
        }
        let final_norm = if options.has_final_layer_norm {
            Some(layer_norm(weights, "model.decoder.final_layer_norm", h, eps)?)
        } else {
            None
        };
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            Linear::new(embed.clone())?
        } else {
            Linear::new(weights.tensor("lm_head.weight", &[c.vocab_size, proj])?)?
        };
        Ok(OptLM {
            embed: embed.contiguous()?,
            positions: positions.contiguous()?,
            project_in,
            project_out,
            layers: layers_out,
            final_norm,
            lm_head,
            options,
            config,
        })
    }

    fn activate(&self, x: &mut [f32]) {
        match self.options.activation {
            Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => layers::gelu_erf_in_place(x),
        }
    }
}

impl CausalLM for OptLM {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor> {
        let tokens = check_batch(batch, kv, &self.config)?;
        let c = &self.config;
        if tokens.is_empty() {
            return Ok(Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        if let Some(&p) = batch.positions.iter().find(|&&p| p >= c.max_position_embeddings) {
            return Err(EngineError::validation(format!(
                "position {p} is beyond OPT's {} learned positions",
                c.max_position_embeddings
            )));
        }
        let hidden = c.hidden_size;
        let proj = self.options.word_embed_proj_dim;
        let n = tokens.len();
        let pre_norm = self.options.do_layer_norm_before;
        let shape = AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size: kv.block_size,
            sliding_window: None,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };

        let mut words = Vec::with_capacity(n * proj);
        layers::with_f32_slice(&self.embed, |embed| {
            for &id in &batch.token_ids {
                words.extend_from_slice(&embed[id as usize * proj..(id as usize + 1) * proj]);
            }
        })?;
        let mut h = match &self.project_in {
            Some(p) => layers::to_f32_vec(&p.forward(words, n)?)?,
            None => words,
        };
        layers::with_f32_slice(&self.positions, |table| {
            for (row, &p) in h.chunks_mut(hidden).zip(&batch.positions) {
                let at = (p + POSITION_OFFSET) * hidden;
                layers::add_in_place(row, &table[at..at + hidden]);
            }
        })?;

        for (layer, cache) in self.layers.iter().zip(kv.layers.iter_mut()) {
            let x = if pre_norm {
                layer.attn_norm.forward(&h)
            } else {
                h.clone()
            };
            let qkv = layer.qkv.forward(x, n)?;
            let q = layers::with_f32_slice(&qkv, |qkv| {
                let mut q = Vec::with_capacity(n * hidden);
                for (row, token) in qkv.chunks(3 * hidden).zip(&tokens) {
                    shape.write_kv(cache, *token, &row[hidden..2 * hidden], &row[2 * hidden..]);
                    q.extend_from_slice(&row[..hidden]);
                }
                q
            })?;
            let mut attn = vec![0.0f32; q.len()];
            shape.paged_attention(&q, &tokens, cache, &mut attn);
            let o = layer.out_proj.forward(attn, n)?;
            layers::with_f32_slice(&o, |o| layers::add_in_place(&mut h, o))?;
            if !pre_norm {
                h = layer.attn_norm.forward(&h);
            }

            let x = if pre_norm {
                layer.mlp_norm.forward(&h)
            } else {
                h.clone()
            };
            let mut up = layers::to_f32_vec(&layer.fc1.forward(x, n)?)?;
            self.activate(&mut up);
            let down = layer.fc2.forward(up, n)?;
            layers::with_f32_slice(&down, |d| layers::add_in_place(&mut h, d))?;
            if !pre_norm {
                h = layer.mlp_norm.forward(&h);
            }
        }

        let mut last_rows = Vec::new();
        for t in super::logit_token_indices(batch) {
            last_rows.extend_from_slice(&h[t * hidden..(t + 1) * hidden]);
        }
        let rows = last_rows.len() / hidden;
        if rows == 0 {
            return Ok(Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &Device::Cpu)?);
        }
        let x = match &self.final_norm {
            Some(norm) => norm.forward(&last_rows),
            None => last_rows,
        };
        let x = match &self.project_out {
            Some(p) => layers::to_f32_vec(&p.forward(x, rows)?)?,
            None => x,
        };
        self.lm_head.forward(x, rows)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weight_bytes(&self) -> usize {
        let tensor_bytes = |t: &Tensor| t.elem_count() * 4;
        let tied = self.config.tie_word_embeddings;
        let mut total = tensor_bytes(&self.embed) + tensor_bytes(&self.positions);
        total += self.project_in.as_ref().map_or(0, Linear::weight_bytes);
        total += self.project_out.as_ref().map_or(0, Linear::weight_bytes);
        total += self.final_norm.as_ref().map_or(0, LayerNorm::bytes);
        if !tied {
            total += self.lm_head.weight_bytes();
        }
        for l in &self.layers {
            total += l.attn_norm.bytes() + l.mlp_norm.bytes();
            total += [&l.qkv, &l.out_proj, &l.fc1, &l.fc2]
                .iter()
                .map(|x| x.weight_bytes())
                .sum::<usize>();
        }
        total
    }
}
