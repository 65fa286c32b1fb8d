//! Prompt attention by tiles: one task serves a run of consecutive query tokens of one
//! sequence (a tile) and one kv head. Each 16-key vector and each value row of a chunk is
//! loaded once for all of the tile's tokens and the query heads that share them, where a
//! lone token's chunk task (attention.rs) loads them once per token and head.
//!
//! Per query the arithmetic is exactly that of the lone token's chunk tasks: the same
//! 4-accumulator scores, a softmax per `KEY_CHUNK`-position chunk, values summed in
//! position order and the chunks merged in chunk order by `merge_chunks`. So a token's
//! result is bit-identical whether a step serves it in a tile or alone, and results stay
//! independent of the batch.

use super::attention::{merge_chunks, score_block, AttentionShape, QueryToken, KEY_CHUNK, LANES};
use super::simd::{exp, max, sum, Kernel};
use crate::kv_cache::paged_cache::LayerKv;

/// Most tokens per tile: 16 tokens × SmolLM2's 3 heads share each key load 48 ways, and a
/// 128-token prompt still gives 8 tiles per kv head to spread over the cores.
pub(super) const TILE: usize = 16;

/// Rows (query heads) scored or weighted together: 4 × 4 score accumulators, or 4 × 4
/// value accumulators of 64 columns, fit the 32 vector registers with the loads.
const ROWS: usize = 4;

/// Per-thread buffers of a tile task, grown to the largest tile seen and reused.
#[derive(Default)]
pub(super) struct TileScratch {
    scores: Vec<f32>,
    /// Per tile token and chunk: the group's unnormalised outputs, maxima, sums (the
    /// layout `merge_chunks` reads).
    parts: Vec<f32>,
}

/// One tile task, compiled per vector unit: `tokens` are consecutive positions of one
/// sequence, `q` their query rows; `out` gets each token's heads of `kv_head`, [tokens,
/// group × head_dim].
pub(super) struct AttendTile<'a> {
    pub shape: &'a AttentionShape,
    pub q: &'a [f32],
    pub tokens: &'a [QueryToken<'a>],
    pub kv_head: usize,
    pub layer: &'a LayerKv,
    pub scratch: &'a mut TileScratch,
    pub out: &'a mut [f32],
}

impl Kernel for AttendTile<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let AttendTile {
            shape,
            q,
            tokens,
            kv_head,
            layer,
            scratch,
            out,
        } = self;
        shape.attend_tile(q, tokens, kv_head, layer, scratch, out)
    }
}

impl AttentionShape {
    #[inline(always)]
    fn attend_tile(
        &self,
        q: &[f32],
        tokens: &[QueryToken],
        kv_head: usize,
        layer: &LayerKv,
        scratch: &mut TileScratch,
        out: &mut [f32],
    ) {
        let (hd, bs) = (self.head_dim, self.block_size);
        let group = self.num_heads / self.num_kv_heads;
        let (gw, part) = (group * hd, group * (hd + 2));
        let (q_width, width) = (self.num_heads * hd, self.num_kv_heads * hd);
        let n = tokens.len();
        let table = tokens[0].block_table;
        let max_chunks = tokens.iter().map(|&t| self.chunks(t).len()).max().unwrap_or(0);
        let TileScratch { scores, parts } = scratch;
        parts.resize(n * max_chunks * part, 0.0);
        // A token's visible positions inside chunk c.
        let range_in = |i: usize, c: usize| {
            let (first, last) = self.visible(tokens[i]);
            (first.max(c * KEY_CHUNK), last.min((c + 1) * KEY_CHUNK - 1))
        };
        for c in self.chunks(tokens[0]).start..self.chunks(tokens[n - 1]).end {
            // First and last visible positions grow with the token, so the tokens that see
            // chunk c are a contiguous run ia..ib, and their union is lo..=hi.
            let ia = (0..n).find(|&i| self.chunks(tokens[i]).end > c).unwrap_or(n);
            let ib = (ia..n).find(|&i| self.chunks(tokens[i]).start > c).unwrap_or(n);
            if ia == ib {
                continue;
            }
            let (lo, hi) = (range_in(ia, c).0, range_in(ib - 1, c).1);
            let keys_n = hi + 1 - lo;
            let rows = (ib - ia) * group;
            scores.resize(rows * keys_n, 0.0);
            // Row r = (token ia + r / group, head r % group) of the kv head.
            let q_row = |r: usize| (ia + r / group) * q_width + (kv_head * group + r % group) * hd;
            for (block, blo, bhi, j) in self.spans(table, lo, hi) {
                let keys = &layer.k[self.key_block_offset(block, kv_head)..][..hd * bs];
                let mut r = 0;
                while r < rows {
                    let take = ROWS.min(rows - r);
                    let at = |k: usize| (r + k) * keys_n + j;
                    match take {
                        4 => score_rows::<4>(
                            q,
                            [0, 1, 2, 3].map(|k| q_row(r + k)),
                            keys,
                            bs,
                            blo,
                            bhi,
                            scores,
                            [0, 1, 2, 3].map(at),
                        ),
                        3 => score_rows::<3>(
                            q,
                            [0, 1, 2].map(|k| q_row(r + k)),
                            keys,
                            bs,
                            blo,
                            bhi,
                            scores,
                            [0, 1, 2].map(at),
                        ),
                        2 => score_rows::<2>(
                            q,
                            [0, 1].map(|k| q_row(r + k)),
                            keys,
                            bs,
                            blo,
                            bhi,
                            scores,
                            [0, 1].map(at),
                        ),
                        _ => score_rows::<1>(q, [q_row(r)], keys, bs, blo, bhi, scores, [at(0)]),
                    }
                    r += take;
                }
            }
            for i in ia..ib {
                let (li, hi_i) = range_in(i, c);
                let len = hi_i + 1 - li;
                let ci = c - self.chunks(tokens[i]).start;
                let (o, stats) = parts[(i * max_chunks + ci) * part..][..part].split_at_mut(gw);
                let (maxima, sums) = stats.split_at_mut(group);
                let row_at = |g: usize| ((i - ia) * group + g) * keys_n + (li - lo);
                for g in 0..group {
                    let row = &mut scores[row_at(g)..][..len];
                    let m = max(row) * self.scale;
                    for s in row.iter_mut() {
                        *s = exp(*s * self.scale - m);
                    }
                    maxima[g] = m;
                    sums[g] = sum(row);
                }
                o.fill(0.0);
                for (block, blo, bhi, j) in self.spans(table, li, hi_i) {
                    let values = &layer.v[(block * bs + blo) * width..(block * bs + bhi) * width];
                    let mut g = 0;
                    while g < group {
                        let take = ROWS.min(group - g);
                        let w = |k: usize| row_at(g + k) + j;
                        let o = &mut o[g * hd..(g + take) * hd];
                        match take {
                            4 => {
                                weigh_rows::<4>(scores, [0, 1, 2, 3].map(w), bhi - blo, values, width, kv_head * hd, o)
                            }
                            3 => weigh_rows::<3>(scores, [0, 1, 2].map(w), bhi - blo, values, width, kv_head * hd, o),
                            2 => weigh_rows::<2>(scores, [0, 1].map(w), bhi - blo, values, width, kv_head * hd, o),
                            _ => weigh_rows::<1>(scores, [w(0)], bhi - blo, values, width, kv_head * hd, o),
                        }
                        g += take;
                    }
                }
            }
        }
        for (i, &token) in tokens.iter().enumerate() {
            let chunks = self.chunks(token).len();
            merge_chunks(
                &parts[i * max_chunks * part..][..chunks * part],
                group,
                hd,
                &mut out[i * gw..][..gw],
            );
        }
    }
}

/// Unscaled scores of R query rows (`q[q_at[r]..][..head_dim]`) against the block's slots
/// lo..hi (`keys` is [head_dim, block_size]), into `scores[row_at[r]..][..hi - lo]`. Each
/// row's lanes take the operations of `score_block` in the same order, so the same bits;
/// a key vector is loaded once for all R rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_rows<const R: usize>(
    q: &[f32],
    q_at: [usize; R],
    keys: &[f32],
    bs: usize,
    lo: usize,
    hi: usize,
    scores: &mut [f32],
    row_at: [usize; R],
) {
    let hd = keys.len() / bs;
    if !bs.is_multiple_of(LANES) {
        for r in 0..R {
            score_block(&q[q_at[r]..][..hd], keys, bs, lo, &mut scores[row_at[r]..][..hi - lo]);
        }
        return;
    }
    let qs: [&[f32]; R] = q_at.map(|at| &q[at..at + hd]);
    let hd4 = hd / 4 * 4;
    for chunk in (lo / LANES)..hi.div_ceil(LANES) {
        let base = chunk * LANES;
        let mut acc = [[[0.0f32; LANES]; 4]; R];
        for d in (0..hd4).step_by(4) {
            for a in 0..4 {
                let k: &[f32; LANES] = keys[(d + a) * bs + base..][..LANES].try_into().unwrap_or(&[0.0; LANES]);
                for r in 0..R {
                    let x = qs[r][d + a];
                    for l in 0..LANES {
                        acc[r][a][l] += x * k[l];
                    }
                }
            }
        }
        for d in hd4..hd {
            let k = &keys[d * bs + base..][..LANES];
            for r in 0..R {
                for l in 0..LANES {
                    acc[r][0][l] += qs[r][d] * k[l];
                }
            }
        }
        for r in 0..R {
            let [a0, a1, a2, a3] = &acc[r];
            for slot in lo.max(base)..hi.min(base + LANES) {
                let l = slot - base;
                scores[row_at[r] + slot - lo] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
            }
        }
    }
}

/// out[r] += Σ_i w_r[i] · values[i * width + at ..][..head_dim] for R rows (`out` is [R,
/// head_dim], w_r = `weights[w_at[r]..][..n]`), 64 (then 16) columns in registers at a
/// time: each value vector loaded once for all R rows. Every column sums in position
/// order, as `weigh_values` does.
#[inline(always)]
fn weigh_rows<const R: usize>(
    weights: &[f32],
    w_at: [usize; R],
    n: usize,
    values: &[f32],
    width: usize,
    at: usize,
    out: &mut [f32],
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn columns<const R: usize, const W: usize>(
        weights: &[f32],
        w_at: [usize; R],
        n: usize,
        values: &[f32],
        width: usize,
        at: usize,
        out: &mut [f32],
        (hd, c): (usize, usize),
    ) {
        let mut acc = [[0.0f32; W]; R];
        for r in 0..R {
            acc[r].copy_from_slice(&out[r * hd + c..][..W]);
        }
        let ws: [&[f32]; R] = w_at.map(|a| &weights[a..a + n]);
        for i in 0..n {
            let v: &[f32; W] = values[i * width + at + c..][..W].try_into().unwrap_or(&[0.0; W]);
            for r in 0..R {
                let w = ws[r][i];
                for l in 0..W {
                    acc[r][l] += w * v[l];
                }
            }
        }
        for r in 0..R {
            out[r * hd + c..][..W].copy_from_slice(&acc[r]);
        }
    }
    let hd = out.len() / R;
    let mut c = 0;
    while c < hd {
        let rest = hd - c;
        if rest >= 64 {
            columns::<R, 64>(weights, w_at, n, values, width, at, out, (hd, c));
            c += 64;
        } else if rest >= LANES {
            columns::<R, LANES>(weights, w_at, n, values, width, at, out, (hd, c));
            c += LANES;
        } else {
            for r in 0..R {
                for i in 0..n {
                    let w = weights[w_at[r] + i];
                    let v = &values[i * width + at + c..][..rest];
                    for (o, &v) in out[r * hd + c..][..rest].iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
            c = hd;
        }
    }
}
