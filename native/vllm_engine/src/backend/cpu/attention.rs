//! Paged attention on the CPU: writes new keys/values into the cache and attends over it.
//!
//! The cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
//! position `p` lives in slot `block_table[p / block_size] * block_size + p % block_size`.
//! Attention reads keys and values straight from their blocks (no gather) with an online
//! softmax, so a query needs no scratch memory beyond its own output row.

use rayon::prelude::*;

use crate::kv_cache::paged_cache::LayerKv;

/// The geometry shared by the cache and the attention of one model.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Attend only to positions > p - window.
    pub sliding_window: Option<usize>,
    pub scale: f32,
}

/// One query token: its absolute position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct QueryToken<'a> {
    pub position: usize,
    pub block_table: &'a [u32],
}

impl AttentionShape {
    fn slot(&self, block_table: &[u32], position: usize) -> usize {
        block_table[position / self.block_size] as usize * self.block_size + position % self.block_size
    }

    /// Stores one token's keys and values ([num_kv_heads * head_dim] each) at its slot.
    /// The caller has checked that the block table covers `position`.
    pub fn write_kv(&self, layer: &mut LayerKv, token: QueryToken, k: &[f32], v: &[f32]) {
        let width = self.num_kv_heads * self.head_dim;
        let start = self.slot(token.block_table, token.position) * width;
        layer.k[start..start + width].copy_from_slice(k);
        layer.v[start..start + width].copy_from_slice(v);
    }

    /// Causal attention of every query token over its sequence's cached positions 0..=p.
    /// `q` is [tokens, num_heads, head_dim]; `out` gets the same shape.
    pub fn paged_attention(&self, q: &[f32], tokens: &[QueryToken], layer: &LayerKv, out: &mut [f32]) {
        let hd = self.head_dim;
        let group = self.num_heads / self.num_kv_heads;
        out.par_chunks_mut(hd)
            .zip(q.par_chunks(hd))
            .enumerate()
            .for_each(|(i, (out_row, q_row))| {
                let token = tokens[i / self.num_heads];
                let kv_head = (i % self.num_heads) / group;
                self.attend_one(q_row, token, kv_head, layer, out_row);
            });
    }

    fn attend_one(&self, q: &[f32], token: QueryToken, kv_head: usize, layer: &LayerKv, out: &mut [f32]) {
        let hd = self.head_dim;
        let bs = self.block_size;
        let width = self.num_kv_heads * hd;
        let last = token.position;
        let first = match self.sliding_window {
            Some(w) => (last + 1).saturating_sub(w),
            None => 0,
        };
        out.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0.0f32;
        for block_index in first / bs..=last / bs {
            let block_base = token.block_table[block_index] as usize * bs;
            let from = (block_index * bs).max(first) - block_index * bs;
            let to = ((block_index + 1) * bs).min(last + 1) - block_index * bs;
            for offset in from..to {
                let at = (block_base + offset) * width + kv_head * hd;
                let score = dot(q, &layer.k[at..at + hd]) * self.scale;
                // Online softmax: rescale what was summed so far when the max grows.
                if score > max {
                    let rescale = (max - score).exp();
                    denom *= rescale;
                    out.iter_mut().for_each(|o| *o *= rescale);
                    max = score;
                }
                let weight = (score - max).exp();
                denom += weight;
                for (o, &v) in out.iter_mut().zip(&layer.v[at..at + hd]) {
                    *o += weight * v;
                }
            }
        }
        if denom > 0.0 {
            let inv = 1.0 / denom;
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// Dot product with eight independent accumulators so it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive softmax attention over a contiguous copy, for comparison.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (e, v) in exps.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += e / sum * x;
            }
        }
        out
    }

    #[test]
    fn matches_naive_attention_over_shuffled_blocks_with_window() {
        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 12,
            block_size: 3,
            sliding_window: Some(5),
            scale: 0.3,
        };
        let width = shape.num_kv_heads * shape.head_dim;
        let num_blocks = 6;
        let mut layer = LayerKv {
            k: vec![0.0; num_blocks * 3 * width],
            v: vec![0.0; num_blocks * 3 * width],
        };
        let table = [4u32, 0, 5, 2];
        let value = |p: usize, j: usize, salt: f32| ((p * 31 + j * 7) as f32 * 0.173 + salt).sin();
        let n = 11;
        for p in 0..n {
            let k: Vec<f32> = (0..width).map(|j| value(p, j, 0.1)).collect();
            let v: Vec<f32> = (0..width).map(|j| value(p, j, 0.7)).collect();
            shape.write_kv(
                &mut layer,
                QueryToken {
                    position: p,
                    block_table: &table,
                },
                &k,
                &v,
            );
        }
        let tokens: Vec<QueryToken> = (0..n)
            .map(|p| QueryToken {
                position: p,
                block_table: &table,
            })
            .collect();
        let q: Vec<f32> = (0..n * shape.num_heads * shape.head_dim)
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        let mut out = vec![0.0; q.len()];
        shape.paged_attention(&q, &tokens, &layer, &mut out);
        for p in 0..n {
            for h in 0..shape.num_heads {
                let kvh = h / 2;
                let first = (p + 1).saturating_sub(5);
                let head = |salt| -> Vec<Vec<f32>> {
                    (first..=p)
                        .map(|s| (0..12).map(|j| value(s, kvh * 12 + j, salt)).collect())
                        .collect()
                };
                let at = (p * 4 + h) * 12;
                let expected = reference(&q[at..at + 12], &head(0.1), &head(0.7), 0.3);
                for (a, b) in out[at..at + 12].iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-5, "p {p} h {h}: {a} vs {b}");
                }
            }
        }
    }
}
