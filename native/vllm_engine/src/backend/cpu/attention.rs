//! Paged attention on the CPU: writes new keys/values into the cache and attends over it.
//!
//! The cache of one layer holds blocks of `block_size` positions. Values are laid out
//! [num_blocks, block_size, num_kv_heads, head_dim]; keys are transposed inside a block,
//! [num_blocks, num_kv_heads, head_dim, block_size], so one query's scores against 16 keys
//! are 16 lanes of one vector FMA per dimension (no horizontal sum per key).
//! Attention reads keys and values straight from their blocks (no gather into a
//! contiguous copy).

use std::cell::RefCell;

use super::simd::{exp, max, run_vectorized, sum, Kernel};

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

/// Keys scored together: one 16-lane vector of scores per step over the head dimension.
const LANES: usize = 16;

impl AttentionShape {
    /// Offset of the values of `position` (all kv heads) in a layer's value cache.
    fn value_offset(&self, block_table: &[u32], position: usize) -> usize {
        let slot = block_table[position / self.block_size] as usize * self.block_size + position % self.block_size;
        slot * self.num_kv_heads * self.head_dim
    }

    /// Offset of the transposed keys [head_dim, block_size] of one kv head in one block.
    fn key_block_offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.head_dim * self.block_size
    }

    /// Stores one token's keys and values ([num_kv_heads * head_dim] each) at its slot.
    /// The caller has checked that the block table covers `position`.
    pub fn write_kv(&self, layer: &mut LayerKv, token: QueryToken, k: &[f32], v: &[f32]) {
        let (hd, bs) = (self.head_dim, self.block_size);
        let block = token.block_table[token.position / bs] as usize;
        let in_block = token.position % bs;
        for (kv_head, k_head) in k.chunks_exact(hd).enumerate() {
            let base = self.key_block_offset(block, kv_head) + in_block;
            for (d, &x) in k_head.iter().enumerate() {
                layer.k[base + d * bs] = x;
            }
        }
        let start = self.value_offset(token.block_table, token.position);
        layer.v[start..start + v.len()].copy_from_slice(v);
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
                run_vectorized(AttendGroup {
                    shape: self,
                    q: q_group,
                    token,
                    kv_head,
                    layer,
                    scores: &mut scores,
                    out: out_group,
                })
            });
        };
        let tasks = out.len() / group_width;
        if tasks * (tokens.iter().map(|t| t.position).max().unwrap_or(0) + 1) < SERIAL_MAX_KEYS {
            out.chunks_mut(group_width)
                .zip(q.chunks(group_width))
                .enumerate()
                .for_each(task);
        } else {
            let out_ptr = GroupsPtr(out.as_mut_ptr());
            super::team::for_each_rows(tokens.len(), tasks, |i| {
                // SAFETY: task i writes only its own group, `out[i * group_width ..][.. group_width]`.
                let out_group =
                    unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(i * group_width), group_width) };
                task((i, (out_group, &q[i * group_width..(i + 1) * group_width])));
            });
        }
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
        let (hd, bs) = (self.head_dim, self.block_size);
        let group = q.len() / hd;
        let last = token.position;
        let first = match self.sliding_window {
            Some(w) => (last + 1).saturating_sub(w),
            None => 0,
        };
        let n = last + 1 - first;
        scores.resize(group * n, 0.0);
        // Visible positions, block by block: (block id, first slot, end slot, index of the
        // first slot's score).
        let spans = || {
            let mut p = first;
            std::iter::from_fn(move || {
                (p <= last).then(|| {
                    let (lo, j) = (p % bs, p - first);
                    let hi = bs.min(lo + last + 1 - p);
                    let block = token.block_table[p / bs] as usize;
                    p += hi - lo;
                    (block, lo, hi, j)
                })
            })
        };
        // At decode the cache was evicted by the weight stream since the last step: ask for
        // all of this head's keys and values now, so the reads overlap the scoring.
        let width = self.num_kv_heads * hd;
        for (block, lo, hi, _) in spans() {
            prefetch_l2(&layer.k[self.key_block_offset(block, kv_head)..][..hd * bs]);
            for slot in block * bs + lo..block * bs + hi {
                prefetch_l2(&layer.v[slot * width + kv_head * hd..][..hd]);
            }
        }
        for (block, lo, hi, j) in spans() {
            let keys = &layer.k[self.key_block_offset(block, kv_head)..][..hd * bs];
            for g in 0..group {
                let row = &mut scores[g * n + j..g * n + j + hi - lo];
                score_block(&q[g * hd..(g + 1) * hd], keys, bs, lo, row);
            }
        }
        let mut inv_sums = [0.0f32; MAX_GROUP];
        for g in 0..group {
            let row = &mut scores[g * n..(g + 1) * n];
            let m = max(row) * self.scale;
            for s in row.iter_mut() {
                *s = exp(*s * self.scale - m);
            }
            inv_sums[g.min(MAX_GROUP - 1)] = 1.0 / sum(row);
        }
        out.fill(0.0);
        for (block, lo, hi, j) in spans() {
            let values = &layer.v[(block * bs + lo) * width..(block * bs + hi) * width];
            for g in 0..group {
                let weights = &scores[g * n + j..g * n + j + hi - lo];
                weigh_values(weights, values, width, kv_head * hd, &mut out[g * hd..(g + 1) * hd]);
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

/// One (token, kv head) task of `paged_attention`, compiled per vector unit.
struct AttendGroup<'a> {
    shape: &'a AttentionShape,
    q: &'a [f32],
    token: QueryToken<'a>,
    kv_head: usize,
    layer: &'a LayerKv,
    scores: &'a mut Vec<f32>,
    out: &'a mut [f32],
}

impl Kernel for AttendGroup<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let AttendGroup {
            shape,
            q,
            token,
            kv_head,
            layer,
            scores,
            out,
        } = self;
        shape.attend_group(q, token, kv_head, layer, scores, out)
    }
}

/// Unscaled scores q·k of the block's slots lo..lo + row.len() (`keys` is [head_dim,
/// block_size]). With block_size a multiple of 16, 16 slots at a time: four
/// accumulators over the head dimension, so the FMAs do not wait on each other.
#[inline(always)]
fn score_block(q: &[f32], keys: &[f32], bs: usize, lo: usize, row: &mut [f32]) {
    let hi = lo + row.len();
    if !bs.is_multiple_of(LANES) {
        for (s, slot) in row.iter_mut().zip(lo..hi) {
            *s = q.iter().enumerate().map(|(d, &x)| x * keys[d * bs + slot]).sum();
        }
        return;
    }
    let hd4 = q.len() / 4 * 4;
    for chunk in (lo / LANES)..hi.div_ceil(LANES) {
        let base = chunk * LANES;
        let mut acc = [[0.0f32; LANES]; 4];
        for d in (0..hd4).step_by(4) {
            for (a, acc) in acc.iter_mut().enumerate() {
                let k: &[f32; LANES] = keys[(d + a) * bs + base..][..LANES].try_into().unwrap_or(&[0.0; LANES]);
                let x = q[d + a];
                for l in 0..LANES {
                    acc[l] += x * k[l];
                }
            }
        }
        for d in hd4..q.len() {
            let k = &keys[d * bs + base..][..LANES];
            for l in 0..LANES {
                acc[0][l] += q[d] * k[l];
            }
        }
        let from = lo.max(base);
        let to = hi.min(base + LANES);
        for slot in from..to {
            let l = slot - base;
            row[slot - lo] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
        }
    }
}

/// out += Σ weights[i] · values[i * width + at ..][..out.len()], in registers 64 (then 16)
/// columns at a time.
#[inline(always)]
fn weigh_values(weights: &[f32], values: &[f32], width: usize, at: usize, out: &mut [f32]) {
    fn columns<const W: usize>(weights: &[f32], values: &[f32], width: usize, at: usize, out: &mut [f32; W]) {
        let mut acc = *out;
        for (i, &w) in weights.iter().enumerate() {
            let v: &[f32; W] = values[i * width + at..][..W].try_into().unwrap_or(&[0.0; W]);
            for c in 0..W {
                acc[c] += w * v[c];
            }
        }
        *out = acc;
    }
    let mut c = 0;
    while c < out.len() {
        let rest = out.len() - c;
        if rest >= 64 {
            if let Ok(o) = <&mut [f32; 64]>::try_from(&mut out[c..c + 64]) {
                columns(weights, values, width, at + c, o);
            }
            c += 64;
        } else if rest >= LANES {
            if let Ok(o) = <&mut [f32; LANES]>::try_from(&mut out[c..c + LANES]) {
                columns(weights, values, width, at + c, o);
            }
            c += LANES;
        } else {
            for (i, &w) in weights.iter().enumerate() {
                for (o, &v) in out[c..].iter_mut().zip(&values[i * width + at + c..][..rest]) {
                    *o += w * v;
                }
            }
            c = out.len();
        }
    }
}

/// Asks for the cache lines of `data` into L2 (no effect on results; a no-op off x86-64).
#[inline(always)]
fn prefetch_l2(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch never faults; the address is inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Query heads per kv head whose softmax sums stay on the stack.
const MAX_GROUP: usize = 16;
/// Below this many (task × key) pairs a layer's attention runs on the calling thread.
/// Small: a batch-1 decode at position ~190 (3 tasks, ~40 µs of mostly memory waits) is
/// worth a fork-join on the team or a pool worker (it was 2,048 when a loop cost ~45 µs).
const SERIAL_MAX_KEYS: usize = 256;

thread_local! {
    /// Per-thread score rows, grown to the longest context seen and reused.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out` of `paged_attention`, shared by tasks that write disjoint groups.
#[derive(Clone, Copy)]
struct GroupsPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it.
unsafe impl Send for GroupsPtr {}
unsafe impl Sync for GroupsPtr {}

impl GroupsPtr {
    /// A method, so closures capture the whole Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's geometry (3 query heads per kv head, head_dim 64), 16-slot blocks.
    const SMOLLM2: AttentionShape = AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        sliding_window: None,
        scale: 0.125,
    };

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

    /// Element j of position p's key (salt 0.1) or value (salt 0.7) row in the test caches.
    fn value(p: usize, j: usize, salt: f32) -> f32 {
        ((p * 31 + j * 7) as f32 * 0.173 + salt).sin()
    }

    /// A layer cache holding positions 0..n (keys salt 0.1, values 0.7) and its block table.
    fn filled_layer(shape: AttentionShape, n: usize) -> (LayerKv, Vec<u32>) {
        let (hd, bs) = (shape.head_dim, shape.block_size);
        let width = shape.num_kv_heads * hd;
        let blocks = n.div_ceil(bs);
        let num_blocks = 2 * blocks + 1;
        let mut layer = LayerKv {
            k: vec![0.0; num_blocks * bs * width],
            v: vec![0.0; num_blocks * bs * width],
        };
        // Distinct blocks in descending order, every other one.
        let table: Vec<u32> = (0..blocks).map(|b| (2 * (blocks - b)) as u32).collect();
        for p in 0..n {
            let k: Vec<f32> = (0..width).map(|j| value(p, j, 0.1)).collect();
            let v: Vec<f32> = (0..width).map(|j| value(p, j, 0.7)).collect();
            let token = QueryToken {
                position: p,
                block_table: &table,
            };
            shape.write_kv(&mut layer, token, &k, &v);
        }
        (layer, table)
    }

    /// Writes `n` positions through `write_kv` into shuffled blocks, attends every position
    /// and compares each head with the naive softmax over a contiguous copy.
    fn check_against_naive(shape: AttentionShape, n: usize) {
        let hd = shape.head_dim;
        let (layer, table) = filled_layer(shape, n);
        let tokens: Vec<QueryToken> = (0..n)
            .map(|p| QueryToken {
                position: p,
                block_table: &table,
            })
            .collect();
        let q: Vec<f32> = (0..n * shape.num_heads * hd).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut out = vec![0.0; q.len()];
        shape.paged_attention(&q, &tokens, &layer, &mut out);
        let group = shape.num_heads / shape.num_kv_heads;
        for p in 0..n {
            for h in 0..shape.num_heads {
                let kvh = h / group;
                let first = shape.sliding_window.map_or(0, |w| (p + 1).saturating_sub(w));
                let head = |salt| -> Vec<Vec<f32>> {
                    (first..=p)
                        .map(|s| (0..hd).map(|j| value(s, kvh * hd + j, salt)).collect())
                        .collect()
                };
                let at = (p * shape.num_heads + h) * hd;
                let expected = reference(&q[at..at + hd], &head(0.1), &head(0.7), shape.scale);
                for (a, b) in out[at..at + hd].iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-5, "p {p} h {h}: {a} vs {b}");
                }
            }
        }
    }

    /// A decode token alone gives the same bits as the same token among others (batch
    /// invariance of the parallel path), and matches the naive softmax.
    #[test]
    fn lone_decode_token_matches_itself_in_a_batch_and_naive_attention() {
        let shape = SMOLLM2;
        // Long enough that both calls run in parallel (not the serial small-call path).
        let n = SERIAL_MAX_KEYS + 5;
        let (layer, table) = filled_layer(shape, n);
        let (hd, heads) = (shape.head_dim, shape.num_heads);
        let batch: Vec<QueryToken> = (n - 4..n)
            .map(|p| QueryToken {
                position: p,
                block_table: &table,
            })
            .collect();
        let q: Vec<f32> = (0..4 * heads * hd).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut out_batch = vec![0.0; q.len()];
        shape.paged_attention(&q, &batch, &layer, &mut out_batch);
        let last = &q[3 * heads * hd..];
        let mut out_alone = vec![0.0; last.len()];
        shape.paged_attention(last, &batch[3..], &layer, &mut out_alone);
        assert_eq!(out_alone[..], out_batch[3 * heads * hd..], "alone vs in a batch");
        for h in 0..heads {
            let kvh = h / (heads / shape.num_kv_heads);
            let head = |salt| -> Vec<Vec<f32>> {
                (0..n)
                    .map(|s| (0..hd).map(|j| value(s, kvh * hd + j, salt)).collect())
                    .collect()
            };
            let expected = reference(&last[h * hd..(h + 1) * hd], &head(0.1), &head(0.7), shape.scale);
            for (a, b) in out_alone[h * hd..(h + 1) * hd].iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "h {h}: {a} vs {b}");
            }
        }
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
        check_against_naive(shape, 11);
    }

    /// SmolLM2's geometry (3 query heads per kv head, head_dim 64) over 16-slot blocks: the
    /// 16-key scoring path, partial first (window) and last blocks.
    #[test]
    fn matches_naive_attention_with_16_key_blocks() {
        let shape = SMOLLM2;
        check_against_naive(shape, 70);
        check_against_naive(
            AttentionShape {
                sliding_window: Some(21),
                head_dim: 80,
                block_size: 32,
                ..shape
            },
            75,
        );
    }
}
