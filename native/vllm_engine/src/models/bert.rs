//! BERT encoders (all-MiniLM-L6-v2 and other sentence-transformers checkpoints): word +
//! position + segment embeddings, post-norm blocks of bidirectional attention and a GELU
//! MLP, and for *ForSequenceClassification the tanh pooler plus a linear classifier.

use candle_core::{Device, Tensor};

use crate::backend::cpu::encoder_attention::bidirectional_attention;
use crate::error::{EngineError, Result};
use crate::loader::WeightSource;
use crate::models::encoder::{EncoderBatch, EncoderConfig, EncoderModel};
use crate::models::layers::{self, LayerNorm, Linear};

struct BertLayer {
    /// query, key and value with biases fused into one [3 hidden, hidden] projection.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The sequence-classification head: classifier(tanh(pooler(h[CLS]))).
struct ClassifierHead {
    pooler: Linear,
    classifier: Linear,
}

pub struct BertModel {
    config: EncoderConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<BertLayer>,
    head: Option<ClassifierHead>,
}

impl BertModel {
    /// Builds the model; tensor names may carry the `bert.` prefix (HF BertFor*) or not
    /// (sentence-transformers' BertModel exports).
    pub fn load(config: EncoderConfig, weights: &mut dyn WeightSource) -> Result<Self> {
        let prefix = if weights.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let c = &config;
        let h = c.hidden_size;
        let eps = c.layer_norm_eps as f32;
        let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{prefix}{name}"), shape);
        let word = get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?.contiguous()?;
        let position = get("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?.contiguous()?;
        let token_type = get("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?.contiguous()?;
        let mut norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: layers::to_f32_vec(&get(&format!("{name}.weight"), &[h])?)?,
                bias: layers::to_f32_vec(&get(&format!("{name}.bias"), &[h])?)?,
                eps,
            })
        };
        let embed_norm = norm("embeddings.LayerNorm")?;
        let mut layers_out = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("{prefix}encoder.layer.{i}");
            let mut get = |name: &str, shape: &[usize]| weights.tensor(&format!("{p}.{name}"), shape);
            let mut part = |name: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    get(&format!("attention.self.{name}.weight"), &[h, h])?,
                    get(&format!("attention.self.{name}.bias"), &[h])?,
                ))
            };
            let (qw, qb) = part("query")?;
            let (kw, kb) = part("key")?;
            let (vw, vb) = part("value")?;
            let qkv = Linear::new(Tensor::cat(&[&qw, &kw, &vw], 0)?)?.with_bias(Tensor::cat(&[&qb, &kb, &vb], 0)?)?;
            let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                let w = weights.tensor(&format!("{p}.{name}.weight"), &[out, inp])?;
                Linear::new(w)?.with_bias(weights.tensor(&format!("{p}.{name}.bias"), &[out])?)
            };
            let attn_out = linear("attention.output.dense", h, h)?;
            let intermediate = linear("intermediate.dense", c.intermediate_size, h)?;
            let output = linear("output.dense", h, c.intermediate_size)?;
            let mut norm = |name: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: layers::to_f32_vec(&weights.tensor(&format!("{p}.{name}.weight"), &[h])?)?,
                    bias: layers::to_f32_vec(&weights.tensor(&format!("{p}.{name}.bias"), &[h])?)?,
                    eps,
                })
            };
            layers_out.push(BertLayer {
                qkv,
                attn_out,
                attn_norm: norm("attention.output.LayerNorm")?,
                intermediate,
                output,
                output_norm: norm("output.LayerNorm")?,
            });
        }
        let head = match c.num_labels() {
            Some(labels) => {
                let mut linear = |name: &str, out: usize| -> Result<Linear> {
                    let w = weights.tensor(&format!("{name}.weight"), &[out, h])?;
                    Linear::new(w)?.with_bias(weights.tensor(&format!("{name}.bias"), &[out])?)
                };
                Some(ClassifierHead {
                    pooler: linear(&format!("{prefix}pooler.dense"), h)?,
                    classifier: linear("classifier", labels)?,
                })
            }
            None => None,
        };
        Ok(BertModel {
            config,
            word,
            position,
            token_type,
            embed_norm,
            layers: layers_out,
            head,
        })
    }

    fn embed(&self, batch: &EncoderBatch) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        if let Some(&bad) = batch.token_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::validation(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if let Some(&bad) = batch.token_type_ids.iter().find(|&&t| t as usize >= c.type_vocab_size) {
            return Err(EngineError::validation(format!(
                "token type id {bad} is outside the model's {} segment types",
                c.type_vocab_size
            )));
        }
        if let Some(&len) = batch.seq_lens.iter().find(|&&l| l > c.max_position_embeddings) {
            return Err(EngineError::validation(format!(
                "a sequence of {len} tokens is longer than the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let mut x = vec![0.0f32; batch.token_ids.len() * h];
        layers::with_f32_slice(&self.word, |word| -> Result<()> {
            layers::with_f32_slice(&self.position, |position| -> Result<()> {
                layers::with_f32_slice(&self.token_type, |types| {
                    let mut t = 0;
                    for &len in &batch.seq_lens {
                        for p in 0..len {
                            let row = &mut x[t * h..(t + 1) * h];
                            let id = batch.token_ids[t] as usize;
                            let tt = batch.token_type_ids.get(t).copied().unwrap_or(0) as usize;
                            row.copy_from_slice(&word[id * h..(id + 1) * h]);
                            layers::add_in_place(row, &position[p * h..(p + 1) * h]);
                            layers::add_in_place(row, &types[tt * h..(tt + 1) * h]);
                            t += 1;
                        }
                    }
                })
            })?
        })??;
        Ok(self.embed_norm.forward(&x))
    }
}

impl EncoderModel for BertModel {
    fn hidden_states(&self, batch: &EncoderBatch) -> Result<Tensor> {
        batch.check()?;
        let c = &self.config;
        let n = batch.token_ids.len();
        let h = c.hidden_size;
        if n == 0 {
            return Ok(Tensor::zeros((0, h), candle_core::DType::F32, &Device::Cpu)?);
        }
        let heads = c.num_attention_heads;
        let head_dim = h / heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let seqs = batch.seq_ranges();
        let mut x = self.embed(batch)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(x.clone(), n)?;
            let attn = layers::with_f32_slice(&qkv, |qkv| bidirectional_attention(qkv, &seqs, heads, head_dim, scale))?;
            let o = layer.attn_out.forward(attn, n)?;
            layers::with_f32_slice(&o, |o| layers::add_in_place(&mut x, o))?;
            x = layer.attn_norm.forward(&x);
            let mut inter = layers::to_f32_vec(&layer.intermediate.forward(x.clone(), n)?)?;
            layers::gelu_erf_in_place(&mut inter);
            let out = layer.output.forward(inter, n)?;
            layers::with_f32_slice(&out, |o| layers::add_in_place(&mut x, o))?;
            x = layer.output_norm.forward(&x);
        }
        Ok(Tensor::from_vec(x, (n, h), &Device::Cpu)?)
    }

    fn classify(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let head = self.head.as_ref().ok_or_else(|| {
            EngineError::unsupported(format!("{} has no classification head", self.config.architecture))
        })?;
        let hidden = self.hidden_states(batch)?;
        let h = self.config.hidden_size;
        let cls = layers::with_f32_slice(&hidden, |x| {
            batch
                .seq_ranges()
                .iter()
                .flat_map(|r| x[r.start * h..(r.start + 1) * h].to_vec())
                .collect::<Vec<f32>>()
        })?;
        let rows = batch.seq_lens.len();
        let pooled = head.pooler.forward(cls, rows)?.tanh()?;
        head.classifier.forward(layers::to_f32_vec(&pooled)?, rows)
    }

    fn config(&self) -> &EncoderConfig {
        &self.config
    }

    fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * 4;
        let mut total = t(&self.word) + t(&self.position) + t(&self.token_type) + self.embed_norm.bytes();
        for l in &self.layers {
            total += [&l.qkv, &l.attn_out, &l.intermediate, &l.output]
                .iter()
                .map(|x| x.weight_bytes())
                .sum::<usize>();
            total += l.attn_norm.bytes() + l.output_norm.bytes();
        }
        if let Some(head) = &self.head {
            total += head.pooler.weight_bytes() + head.classifier.weight_bytes();
        }
        total
    }
}
