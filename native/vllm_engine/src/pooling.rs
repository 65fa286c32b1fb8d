//! Poolers and post-processing of pooling models: a sequence's hidden states become one
//! vector (mean / CLS / last token), optionally truncated (Matryoshka `dimensions`) and
//! L2-normalised; classifier logits optionally go through softmax or sigmoid.

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::models::encoder::{EncoderBatch, EncoderModel, PoolingType};
use crate::models::layers;

/// Per-request pooling options (vLLM's PoolingParams); None: the model's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolingParams {
    /// L2-normalise embeddings (default: the model's, e.g. a sentence-transformers Normalize).
    pub normalize: Option<bool>,
    /// Matryoshka: keep the first `dimensions` values (then normalise if normalising).
    pub dimensions: Option<usize>,
    /// classify/score: softmax over labels (sigmoid for one label); default true.
    pub use_activation: Option<bool>,
}

impl PoolingParams {
    /// Rejects values no model accepts (model-specific bounds are checked on submission).
    pub fn validate(&self) -> Result<()> {
        if self.dimensions == Some(0) {
            return Err(EngineError::validation("dimensions must be at least 1"));
        }
        Ok(())
    }
}

/// One pooled vector per sequence from hidden states [tokens, hidden].
pub fn pool(hidden: &Tensor, batch: &EncoderBatch, pooling: PoolingType) -> Result<Vec<Vec<f32>>> {
    let (tokens, dim) = hidden.dims2()?;
    if tokens != batch.token_ids.len() {
        return Err(EngineError::internal(format!(
            "pooling {tokens} hidden rows for a batch of {} tokens",
            batch.token_ids.len()
        )));
    }
    layers::with_f32_slice(hidden, |h| {
        batch
            .seq_ranges()
            .into_iter()
            .map(|r| {
                let row = |t: usize| &h[t * dim..(t + 1) * dim];
                match pooling {
                    PoolingType::Cls => row(r.start).to_vec(),
                    PoolingType::Last => row(r.end - 1).to_vec(),
                    PoolingType::Mean => {
                        let mut sum = vec![0.0f64; dim];
                        for t in r.clone() {
                            sum.iter_mut().zip(row(t)).for_each(|(s, &x)| *s += x as f64);
                        }
                        let n = r.len().max(1) as f64;
                        sum.into_iter().map(|s| (s / n) as f32).collect()
                    }
                }
            })
            .collect()
    })
}

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
}

/// Matryoshka truncation to the first `dimensions` values.
pub fn truncate_dimensions(mut v: Vec<f32>, dimensions: usize) -> Result<Vec<f32>> {
    if dimensions == 0 || dimensions > v.len() {
        return Err(EngineError::validation(format!(
            "dimensions must be in 1..={} for this model, got {dimensions}",
            v.len()
        )));
    }
    v.truncate(dimensions);
    Ok(v)
}

/// Pooled, truncated and (by default per the model) normalised embeddings, one per sequence.
pub fn embed(model: &dyn EncoderModel, batch: &EncoderBatch, params: &PoolingParams) -> Result<Vec<Vec<f32>>> {
    let config = model.config();
    let hidden = model.hidden_states(batch)?;
    let normalize_out = params.normalize.unwrap_or(config.normalize);
    pool(&hidden, batch, config.pooling)?
        .into_iter()
        .map(|v| {
            let mut v = match params.dimensions {
                Some(d) => truncate_dimensions(v, d)?,
                None => v,
            };
            if normalize_out {
                normalize(&mut v);
            }
            Ok(v)
        })
        .collect()
}

/// Per sequence, label probabilities (softmax; sigmoid when there is one label, as
/// cross-encoder scores) or the raw logits when `use_activation` is false.
pub fn classify(model: &dyn EncoderModel, batch: &EncoderBatch, params: &PoolingParams) -> Result<Vec<Vec<f32>>> {
    let logits = model.classify(batch)?.to_vec2::<f32>()?;
    if !params.use_activation.unwrap_or(true) {
        return Ok(logits);
    }
    Ok(logits.into_iter().map(activate).collect())
}

/// Softmax over several labels, sigmoid over one.
pub fn activate(mut logits: Vec<f32>) -> Vec<f32> {
    if logits.len() == 1 {
        logits[0] = 1.0 / (1.0 + (-logits[0]).exp());
        return logits;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
    logits.iter_mut().for_each(|x| *x = (*x - max).exp() / sum);
    logits
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (dot / (na * nb)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poolers_pick_the_right_rows() {
        let mut batch = EncoderBatch::default();
        batch.push(&[1, 2]);
        batch.push(&[3, 4, 5]);
        let hidden = Tensor::from_vec(
            (0..10).map(|x| x as f32).collect::<Vec<_>>(),
            (5, 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            pool(&hidden, &batch, PoolingType::Cls).unwrap(),
            vec![vec![0.0, 1.0], vec![4.0, 5.0]]
        );
        assert_eq!(
            pool(&hidden, &batch, PoolingType::Last).unwrap(),
            vec![vec![2.0, 3.0], vec![8.0, 9.0]]
        );
        assert_eq!(
            pool(&hidden, &batch, PoolingType::Mean).unwrap(),
            vec![vec![1.0, 2.0], vec![6.0, 7.0]]
        );
    }

    #[test]
    fn matryoshka_truncates_then_normalizes() {
        let mut v = truncate_dimensions(vec![3.0, 4.0, 12.0], 2).unwrap();
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(truncate_dimensions(vec![1.0], 2).is_err());
        assert!(truncate_dimensions(vec![1.0], 0).is_err());
    }

    #[test]
    fn activation_is_softmax_or_sigmoid() {
        let p = activate(vec![0.0, 0.0]);
        assert_eq!(p, vec![0.5, 0.5]);
        assert_eq!(activate(vec![0.0]), vec![0.5]);
    }
}
