//! Bidirectional attention for encoders: every token attends to every token of its own
//! sequence (no cache, no causal mask), reading keys and values from the fused qkv rows.

use std::ops::Range;

use rayon::prelude::*;

/// `qkv` is [tokens, 3 * num_heads * head_dim] (q | k | v per row); `seqs` are the token
/// ranges of the sequences. Returns [tokens, num_heads * head_dim].
pub fn bidirectional_attention(
    qkv: &[f32],
    seqs: &[Range<usize>],
    num_heads: usize,
    head_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let width = num_heads * head_dim;
    let tokens = qkv.len() / (3 * width);
    let mut seq_of = vec![0..0; tokens];
    for r in seqs {
        seq_of[r.clone()].iter_mut().for_each(|s| *s = r.clone());
    }
    let mut out = vec![0.0f32; tokens * width];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, out_row)| {
        let (t, head) = (i / num_heads, i % num_heads);
        let q = &qkv[t * 3 * width + head * head_dim..][..head_dim];
        let key = |s: usize| &qkv[s * 3 * width + width + head * head_dim..][..head_dim];
        let value = |s: usize| &qkv[s * 3 * width + 2 * width + head * head_dim..][..head_dim];
        let range = seq_of[t].clone();
        let scores: Vec<f32> = range.clone().map(|s| dot(q, key(s)) * scale).collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut denom = 0.0f32;
        for (s, score) in range.zip(&scores) {
            let w = (score - max).exp();
            denom += w;
            for (o, &v) in out_row.iter_mut().zip(value(s)) {
                *o += w * v;
            }
        }
        if denom > 0.0 {
            let inv = 1.0 / denom;
            out_row.iter_mut().for_each(|o| *o *= inv);
        }
    });
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_do_not_see_each_other() {
        let (heads, hd) = (2, 4);
        let width = heads * hd;
        let qkv: Vec<f32> = (0..5 * 3 * width).map(|i| ((i * 37 % 11) as f32 * 0.3).sin()).collect();
        let together = bidirectional_attention(&qkv, &[0..2, 2..5], heads, hd, 0.5);
        let first = bidirectional_attention(&qkv[..2 * 3 * width], std::slice::from_ref(&(0..2)), heads, hd, 0.5);
        let second = bidirectional_attention(&qkv[2 * 3 * width..], std::slice::from_ref(&(0..3)), heads, hd, 0.5);
        let alone: Vec<f32> = first.into_iter().chain(second).collect();
        for (a, b) in together.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
