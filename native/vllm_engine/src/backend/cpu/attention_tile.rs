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

use super::attention::{merge_chunks, AttentionShape, QueryToken, KEY_CHUNK};
use super::attention_rows::{score_all_rows, weigh_all_rows};
use super::simd::{exp, max, sum, Kernel};
use crate::kv_cache::paged_cache::{KvBuffers, KvElement};

/// Most tokens per tile: 16 tokens × SmolLM2's 3 heads share each key load 48 ways, and a
/// 128-token prompt still gives 8 tiles per kv head to spread over the cores.
pub(super) const TILE: usize = 16;

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
pub(super) struct AttendTile<'a, T> {
    pub shape: &'a AttentionShape,
    pub q: &'a [f32],
    pub tokens: &'a [QueryToken<'a>],
    pub kv_head: usize,
    pub layer: &'a KvBuffers<T>,
    pub scratch: &'a mut TileScratch,
    pub out: &'a mut [f32],
}

impl<T: KvElement> Kernel for AttendTile<'_, T> {
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
    fn attend_tile<T: KvElement>(
        &self,
        q: &[f32],
        tokens: &[QueryToken],
        kv_head: usize,
        layer: &KvBuffers<T>,
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
                score_all_rows(q, rows, q_row, keys, bs, blo, bhi, scores, |r| r * keys_n + j);
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
                    let w_at = |g: usize| row_at(g) + j;
                    weigh_all_rows(scores, group, w_at, bhi - blo, values, width, kv_head * hd, o);
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
