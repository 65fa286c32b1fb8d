//! Paged attention on the CPU: writes new keys/values into the cache and attends over it.
//!
//! The cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
//! position `p` lives in slot `block_table[p / block_size] * block_size + p % block_size`.
//! Attention reads keys and values straight from their blocks (no gather) with an online
//! softmax, so a query needs no scratch memory beyond its own output row.

use std::cell::RefCell;

use rayon::prelude::*;

use super::matmul::Isa;
use super::simd::{axpy, dot, exp, isa, max, sum};

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
    /// `q` is [tokens, num_heads, head_dim]; `out` gets the same shape. One task per
    /// (token, kv head) serves the query heads that share the kv head, so each key and
    /// value is read once for all of them.
    pub fn paged_attention(&self, q: &[f32], tokens: &[QueryToken], layer: &LayerKv, out: &mut [f32]) {
        let group_width = self.num_heads / self.num_kv_heads * self.head_dim;
        let task = |(i, (out_group, q_group)): (usize, (&mut [f32], &[f32]))| {
            let token = tokens[i / self.num_kv_heads];
            let kv_head = i % self.num_kv_heads;
            SCORES.with(|scores| {
                let mut scores = scores.borrow_mut();
                self.attend_group_dispatch(q_group, token, kv_head, layer, &mut scores, out_group)
            });
        };
        let tasks = out.len() / group_width;
        if tasks * (tokens.iter().map(|t| t.position).max().unwrap_or(0) + 1) < SERIAL_MAX_KEYS {
            out.chunks_mut(group_width)
                .zip(q.chunks(group_width))
                .enumerate()
                .for_each(task);
        } else {
            out.par_chunks_mut(group_width)
                .zip(q.par_chunks(group_width))
                .enumerate()
                .for_each(task);
        }
    }

    /// `attend_group` compiled for the widest vector unit present (a plain closure passed
    /// to `vectorized` would not be inlined: the body is too large).
    fn attend_group_dispatch(
        &self,
        q: &[f32],
        token: QueryToken,
        kv_head: usize,
        layer: &LayerKv,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        match isa() {
            // SAFETY: the features were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.attend_group_avx512(q, token, kv_head, layer, scores, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.attend_group_avx2(q, token, kv_head, layer, scores, out) },
            _ => self.attend_group(q, token, kv_head, layer, scores, out),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn attend_group_avx512(
        &self,
        q: &[f32],
        token: QueryToken,
        kv_head: usize,
        layer: &LayerKv,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        self.attend_group(q, token, kv_head, layer, scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_group_avx2(
        &self,
        q: &[f32],
        token: QueryToken,
        kv_head: usize,
        layer: &LayerKv,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        self.attend_group(q, token, kv_head, layer, scores, out)
    }

    /// Softmax attention of the query heads of one kv head: scores of every visible key
    /// for each head, then the exact softmax (max, exp, sum), then the weighted values.
    #[inline(always)]
    fn attend_group(
        &self,
        q: &[f32],
        token: QueryToken,
        kv_head: usize,
        layer: &LayerKv,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        let bs = self.block_size;
        let width = self.num_kv_heads * hd;
        let group = q.len() / hd;
        let last = token.position;
        let first = match self.sliding_window {
            Some(w) => (last + 1).saturating_sub(w),
            None => 0,
        };
        let n = last + 1 - first;
        scores.resize(group * n, 0.0);
        // Each visible key's cache offset, block by block.
        let key_at = |j: usize| {
            let p = first + j;
            (token.block_table[p / bs] as usize * bs + p % bs) * width + kv_head * hd
        };
        for j in 0..n {
            let at = key_at(j);
            let k = &layer.k[at..at + hd];
            for g in 0..group {
                scores[g * n + j] = dot(&q[g * hd..(g + 1) * hd], k) * self.scale;
            }
        }
        let mut inv_sums = [0.0f32; MAX_GROUP];
        for g in 0..group {
            let row = &mut scores[g * n..(g + 1) * n];
            let m = max(row);
            for s in row.iter_mut() {
                *s = exp(*s - m);
            }
            inv_sums[g.min(MAX_GROUP - 1)] = 1.0 / sum(row);
        }
        out.fill(0.0);
        for j in 0..n {
            let at = key_at(j);
            let v = &layer.v[at..at + hd];
            for g in 0..group {
                axpy(&mut out[g * hd..(g + 1) * hd], scores[g * n + j], v);
            }
        }
        for (g, o) in out.chunks_mut(hd).enumerate() {
            let inv = if group <= MAX_GROUP {
                inv_sums[g]
            } else {
                1.0 / sum(&scores[g * n..(g + 1) * n])
            };
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Query heads per kv head whose softmax sums stay on the stack.
const MAX_GROUP: usize = 16;
/// Below this many (task × key) pairs a layer's attention runs on the calling thread.
const SERIAL_MAX_KEYS: usize = 2048;

thread_local! {
    /// Per-thread score rows, grown to the longest context seen and reused.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
