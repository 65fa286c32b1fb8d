//! Paged attention on the CPU: writes new keys/values into the cache and attends over it.
//!
//! The cache of one layer holds blocks of `block_size` positions. Values are laid out
//! [num_blocks, block_size, num_kv_heads, head_dim]; keys are transposed inside a block,
//! [num_blocks, num_kv_heads, head_dim, block_size], so one query's scores against 16 keys
//! are 16 lanes of one vector FMA per dimension (no horizontal sum per key).
//! Attention reads keys and values straight from their blocks (no gather into a
//! contiguous copy).

use std::cell::RefCell;

use super::attention_rows::{score_all_rows, weigh_all_rows};
use super::attention_tile::{self, AttendTile, TILE};
use super::simd::{exp, max, run_vectorized, sum, Kernel};

use crate::kv_cache::paged_cache::{KvBuffers, KvElement, LayerKv};

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
pub(super) const LANES: usize = 16;

impl AttentionShape {
    /// Offset of the values of `position` (all kv heads) in a layer's value cache.
    fn value_offset(&self, block_table: &[u32], position: usize) -> usize {
        let slot = block_table[position / self.block_size] as usize * self.block_size + position % self.block_size;
        slot * self.num_kv_heads * self.head_dim
    }

    /// Offset of the transposed keys [head_dim, block_size] of one kv head in one block.
    pub(super) fn key_block_offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.head_dim * self.block_size
    }

    /// Stores one token's keys and values ([num_kv_heads * head_dim] each) at its slot.
    /// The caller has checked that the block table covers `position`.
    pub fn write_kv(&self, layer: &mut LayerKv, token: QueryToken, k: &[f32], v: &[f32]) {
        match layer {
            LayerKv::F32(b) => self.write_kv_as(b, token, k, v),
            LayerKv::Bf16(b) => self.write_kv_as(b, token, k, v),
        }
    }

    fn write_kv_as<T: KvElement>(&self, layer: &mut KvBuffers<T>, token: QueryToken, k: &[f32], v: &[f32]) {
        let (hd, bs) = (self.head_dim, self.block_size);
        let block = token.block_table[token.position / bs] as usize;
        let in_block = token.position % bs;
        for (kv_head, k_head) in k.chunks_exact(hd).enumerate() {
            let base = self.key_block_offset(block, kv_head) + in_block;
            for (d, &x) in k_head.iter().enumerate() {
                layer.k[base + d * bs] = T::store(x);
            }
        }
        let start = self.value_offset(token.block_table, token.position);
        for (slot, &x) in layer.v[start..start + v.len()].iter_mut().zip(v) {
            *slot = T::store(x);
        }
    }

    /// Positions first..=last of a sequence, block by block: (block id, first slot, end
    /// slot, index of the first slot counted from `first`).
    pub(super) fn spans<'t>(
        &self,
        block_table: &'t [u32],
        first: usize,
        last: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> + 't {
        let bs = self.block_size;
        let mut p = first;
        std::iter::from_fn(move || {
            (p <= last).then(|| {
                let (lo, j) = (p % bs, p - first);
                let hi = bs.min(lo + last + 1 - p);
                let block = block_table[p / bs] as usize;
                p += hi - lo;
                (block, lo, hi, j)
            })
        })
    }

    /// Causal attention of every query token over its sequence's cached positions 0..=p.
    /// `q` is [tokens, num_heads, head_dim]; `out` gets the same shape. A lone token (a
    /// decode) is served by chunk tasks: the query heads of one kv head (of every kv head
    /// when the step has many chunks, see `plan_piece`) over one chunk of `KEY_CHUNK`
    /// absolute positions, so each key and value is read once for all of them and a lone
    /// decode token still fills both cores; the chunks' partial softmaxes are then merged
    /// in chunk order. Runs of consecutive tokens of one sequence (a prompt)
    /// are served by tile tasks (attention_tile.rs) that do the same per token but read
    /// each key once for the whole tile. The chunks of a token depend only on its own
    /// position, and both forms give the same bits, so results do not depend on the batch.
    pub fn paged_attention(&self, q: &[f32], tokens: &[QueryToken], layer: &LayerKv, out: &mut [f32]) {
        // A rayon worker waiting inside the parallel loop may run another model's forward
        // on this thread: that nested call gets buffers of its own.
        PLAN.with(|cell| {
            let mut own = Plan::default();
            let mut borrowed = cell.try_borrow_mut();
            let plan = borrowed.as_deref_mut().unwrap_or(&mut own);
            match layer {
                LayerKv::F32(b) => self.attend_in_pieces(plan, q, tokens, b, out),
                LayerKv::Bf16(b) => self.attend_in_pieces(plan, q, tokens, b, out),
            }
        });
    }

    /// Runs `paged_attention` over runs of tokens of at most ~`MAX_PIECE_TASKS` tasks,
    /// counted per kv head (a lone token's chunks, one for a token that continues a tile), so
    /// the partial results stay small for long prompts (a token's result does not depend
    /// on the run it is in).
    fn attend_in_pieces<T: KvElement>(
        &self,
        plan: &mut Plan,
        q: &[f32],
        tokens: &[QueryToken],
        layer: &KvBuffers<T>,
        out: &mut [f32],
    ) {
        let width = self.num_heads * self.head_dim;
        let mut t0 = 0;
        while t0 < tokens.len() {
            let (mut t1, mut tasks) = (t0, 0);
            while t1 < tokens.len() {
                let continues = t1 > 0 && tiles_on() && continues_run(tokens[t1 - 1], tokens[t1]);
                let more = if continues { 1 } else { self.chunks(tokens[t1]).len() } * self.num_kv_heads;
                if t1 > t0 && tasks + more > MAX_PIECE_TASKS {
                    break;
                }
                tasks += more;
                t1 += 1;
            }
            self.attend_piece(
                plan,
                &q[t0 * width..t1 * width],
                &tokens[t0..t1],
                layer,
                &mut out[t0 * width..t1 * width],
            );
            t0 = t1;
        }
    }

    /// The visible positions of a token: first..=last.
    pub(super) fn visible(&self, token: QueryToken) -> (usize, usize) {
        let last = token.position;
        let first = match self.sliding_window {
            Some(w) => (last + 1).saturating_sub(w),
            None => 0,
        };
        (first, last)
    }

    /// Indices of the `KEY_CHUNK`-position chunks that hold the token's visible positions.
    pub(super) fn chunks(&self, token: QueryToken) -> std::ops::Range<usize> {
        let (first, last) = self.visible(token);
        first / KEY_CHUNK..last / KEY_CHUNK + 1
    }

    /// Plans the piece's tasks: a tile task per (tile of up to `TILE` consecutive tokens of
    /// one sequence, kv head), chunk tasks for the other tokens. A lone token's chunk task
    /// covers every kv head when the piece has enough of them to keep the threads busy:
    /// its keys and values then stream from contiguous memory (a block holds all kv heads
    /// side by side); else one task per kv head, so a single decode still fills the cores.
    fn plan_piece(&self, plan: &mut Plan, tokens: &[QueryToken]) {
        plan.tasks.clear();
        plan.merges.clear();
        let nkv = self.num_kv_heads;
        let runs = || {
            let mut i = 0;
            std::iter::from_fn(move || {
                (i < tokens.len()).then(|| {
                    let mut len = 1;
                    while tiles_on()
                        && len < TILE
                        && i + len < tokens.len()
                        && continues_run(tokens[i + len - 1], tokens[i + len])
                    {
                        len += 1;
                    }
                    i += len;
                    (i - len, len)
                })
            })
        };
        let lone_chunks: usize = runs()
            .filter(|&(_, len)| len == 1)
            .map(|(i, _)| self.chunks(tokens[i]).len())
            .sum();
        let heads = if lone_chunks >= MIN_ALL_HEAD_TASKS { nkv } else { 1 };
        let mut slots = 0;
        for (i, len) in runs() {
            if len > 1 {
                plan.tasks
                    .extend((0..nkv).map(|kv_head| Task::Tile { token: i, len, kv_head }));
                continue;
            }
            let (first, last) = self.visible(tokens[i]);
            let chunks = self.chunks(tokens[i]);
            let stride = chunks.len();
            plan.merges
                .extend((0..nkv).map(|kv_head| (i * nkv + kv_head, slots + kv_head * stride)));
            for kv_head in (0..nkv).step_by(heads) {
                for (k, c) in chunks.clone().enumerate() {
                    plan.tasks.push(Task::Chunk {
                        token: i,
                        kv_head,
                        heads,
                        first: first.max(c * KEY_CHUNK),
                        last: last.min((c + 1) * KEY_CHUNK - 1),
                        partial: slots + kv_head * stride + k,
                        stride,
                    });
                }
            }
            slots += nkv * stride;
        }
        plan.merges.push((usize::MAX, slots));
    }

    fn attend_piece<T: KvElement>(
        &self,
        plan: &mut Plan,
        q: &[f32],
        tokens: &[QueryToken],
        layer: &KvBuffers<T>,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        let group = self.num_heads / self.num_kv_heads;
        let group_width = group * hd;
        // Per chunk task: its heads' unnormalised outputs, then their maxima, then their sums.
        let part = group * (hd + 2);
        self.plan_piece(plan, tokens);
        let chunk_tasks = plan.merges.last().map_or(0, |m| m.1);
        plan.partials.resize(chunk_tasks * part, 0.0);
        let tasks = &plan.tasks;
        // A decode step's keys and values were evicted by the weights since the last step;
        // a prompt's were written by this step and are still in cache.
        let prefetch = tokens.len() <= super::team::MAX_ROWS;
        let (partials, outs) = (GroupsPtr(plan.partials.as_mut_ptr()), GroupsPtr(out.as_mut_ptr()));
        let q_width = self.num_heads * hd;
        let task = |t: usize| match tasks[t] {
            Task::Chunk {
                token: i,
                kv_head,
                heads,
                first,
                last,
                partial,
                stride,
            } => {
                // SAFETY: each (kv head, chunk) partial has one task; the slots of heads
                // kv_head..kv_head + heads are `stride` apart.
                let part_of = |h: usize| unsafe {
                    let slot = partial + (h - kv_head) * stride;
                    std::slice::from_raw_parts_mut(partials.get().add(slot * part), part)
                };
                SCORES.with(|scores| {
                    let mut scores = scores.borrow_mut();
                    run_vectorized(AttendHeads {
                        shape: self,
                        q: &q[i * q_width..(i + 1) * q_width],
                        token: tokens[i],
                        kv_heads: kv_head..kv_head + heads,
                        first,
                        last,
                        layer,
                        prefetch,
                        scores: &mut scores,
                        part_of,
                    })
                });
            }
            Task::Tile { token, len, kv_head } => TILE_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let TileBuffers { result, kernel } = &mut *scratch;
                result.resize(len * group_width, 0.0);
                run_vectorized(AttendTile {
                    shape: self,
                    q: &q[token * q_width..(token + len) * q_width],
                    tokens: &tokens[token..token + len],
                    kv_head,
                    layer,
                    scratch: kernel,
                    out: result,
                });
                for (k, r) in result.chunks_exact(group_width).enumerate() {
                    let at = ((token + k) * self.num_kv_heads + kv_head) * group_width;
                    // SAFETY: each (token, kv head) group of `out` has one tile task.
                    unsafe { std::slice::from_raw_parts_mut(outs.get().add(at), group_width) }.copy_from_slice(r);
                }
            }),
        };
        let keys: usize = tokens
            .iter()
            .map(|&t| self.visible(t))
            .map(|(first, last)| last + 1 - first)
            .sum();
        if keys * self.num_kv_heads < SERIAL_MAX_KEYS {
            (0..tasks.len()).for_each(task);
        } else {
            super::team::for_each_rows(tokens.len(), tasks.len(), task);
        }
        for m in plan.merges.windows(2) {
            let ((gi, from), (_, to)) = (m[0], m[1]);
            let parts = &plan.partials[from * part..to * part];
            merge_chunks(parts, group, hd, &mut out[gi * group_width..][..group_width]);
        }
    }

    /// Softmax attention of the query heads of kv heads `kv_heads` over positions
    /// first..=last (`q` is the token's [num_heads, head_dim]): the scores of those keys for
    /// each query head, then per head the max m and Σ exp(s − m), then Σ exp(s − m)·v
    /// (unnormalised). `part_of(h)` is kv head h's partial: its query heads' outputs, then
    /// their maxima, then their sums. Block by block over all the kv heads, so a task of
    /// several heads reads each block's keys, then its values, as one contiguous run.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn attend_heads<'p, T: KvElement>(
        &self,
        q: &[f32],
        token: QueryToken,
        kv_heads: std::ops::Range<usize>,
        (first, last): (usize, usize),
        layer: &KvBuffers<T>,
        prefetch: bool,
        scores: &mut Vec<f32>,
        part_of: impl Fn(usize) -> &'p mut [f32],
    ) {
        let (hd, bs) = (self.head_dim, self.block_size);
        let group = self.num_heads / self.num_kv_heads;
        let (h0, heads) = (kv_heads.start, kv_heads.len());
        let n = last + 1 - first;
        scores.resize(heads * group * n, 0.0);
        let row = |h: usize, g: usize| ((h - h0) * group + g) * n;
        let spans = || self.spans(token.block_table, first, last);
        let width = self.num_kv_heads * hd;
        // At decode the cache was evicted by the weight stream since the last step: ask for
        // the keys and values `PREFETCH_BLOCKS` blocks ahead of their use. A block's values
        // are asked for from the first head's to the last head's: for a task of one head the
        // other heads' values come along (their tasks run beside it).
        let keys_of = |block: usize| &layer.k[self.key_block_offset(block, h0)..][..heads * hd * bs];
        let values_of = |block: usize, lo: usize, hi: usize| {
            let rows = &layer.v[(block * bs + lo) * width..(block * bs + hi) * width];
            &rows[h0 * hd..rows.len() - (self.num_kv_heads - h0 - heads) * hd]
        };
        let ahead = if prefetch { PREFETCH_BLOCKS } else { 0 };
        for (block, _, _, _) in spans().take(ahead) {
            prefetch_l2(keys_of(block));
        }
        for ((block, lo, hi, j), next) in with_lookahead(spans(), spans(), ahead) {
            if let Some((next, ..)) = next.filter(|_| prefetch) {
                prefetch_l2(keys_of(next));
            }
            for h in kv_heads.clone() {
                let keys = &layer.k[self.key_block_offset(block, h)..][..hd * bs];
                let q = &q[h * group * hd..];
                score_all_rows(q, group, |g| g * hd, keys, bs, lo, hi, scores, |g| row(h, g) + j);
            }
        }
        for h in kv_heads.clone() {
            let part = part_of(h);
            let (out, stats) = part.split_at_mut(group * hd);
            let (maxima, sums) = stats.split_at_mut(group);
            for g in 0..group {
                let row = &mut scores[row(h, g)..][..n];
                let m = max(row) * self.scale;
                for s in row.iter_mut() {
                    *s = exp(*s * self.scale - m);
                }
                maxima[g] = m;
                sums[g] = sum(row);
            }
            out.fill(0.0);
        }
        for (block, lo, hi, _) in spans().take(ahead) {
            prefetch_l2(values_of(block, lo, hi));
        }
        for ((block, lo, hi, j), next) in with_lookahead(spans(), spans(), ahead) {
            if let Some((next, nlo, nhi, _)) = next.filter(|_| prefetch) {
                prefetch_l2(values_of(next, nlo, nhi));
            }
            let values = &layer.v[(block * bs + lo) * width..(block * bs + hi) * width];
            for h in kv_heads.clone() {
                let out = &mut part_of(h)[..group * hd];
                weigh_all_rows(scores, group, |g| row(h, g) + j, hi - lo, values, width, h * hd, out);
            }
        }
    }
}

/// One group's output from its chunks' partials (`parts`: per chunk, `group` × `hd`
/// unnormalised outputs, then the maxima, then the sums), in chunk order. Each chunk is
/// weighted by exp(m_c − M); a lone chunk gets weight exactly 1, so its result is o·(1/s).
pub(super) fn merge_chunks(parts: &[f32], group: usize, hd: usize, out: &mut [f32]) {
    let part = group * (hd + 2);
    for g in 0..group {
        let stat = |c: usize, which: usize| parts[c * part + group * hd + which * group + g];
        let chunks = parts.len() / part;
        let top = (0..chunks).map(|c| stat(c, 0)).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[g * hd..(g + 1) * hd];
        let mut total = 0.0f32;
        for c in 0..chunks {
            let w = (stat(c, 0) - top).exp();
            total += stat(c, 1) * w;
            let src = &parts[c * part + g * hd..c * part + (g + 1) * hd];
            if c == 0 {
                o.iter_mut().zip(src).for_each(|(x, &v)| *x = v * w);
            } else {
                o.iter_mut().zip(src).for_each(|(x, &v)| *x += v * w);
            }
        }
        let inv = 1.0 / total;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// One task of `paged_attention`.
#[derive(Clone, Copy)]
enum Task {
    /// A lone token's kv heads kv_head..kv_head + heads over positions first..=last, head
    /// h into partial slot `partial + (h - kv_head) * stride`.
    Chunk {
        token: usize,
        kv_head: usize,
        heads: usize,
        first: usize,
        last: usize,
        partial: usize,
        stride: usize,
    },
    /// Tokens token..token + len (consecutive positions of one sequence) for one kv head.
    Tile { token: usize, len: usize, kv_head: usize },
}

/// Tile tasks serve runs of tokens unless `VLLM_CPU_ATT_TILES=0` (every token by chunk
/// tasks, as before the tiles: the same bits, for timing the two).
fn tiles_on() -> bool {
    #[cfg(test)]
    if tests::CHUNKS_ONLY.with(|c| c.get()) {
        return false;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("VLLM_CPU_ATT_TILES").map_or(true, |v| v != "0"))
}

/// Whether `next` is the position right after `prev` in the same sequence.
fn continues_run(prev: QueryToken, next: QueryToken) -> bool {
    next.position == prev.position + 1 && std::ptr::eq(prev.block_table, next.block_table)
}

/// The caller's per-call lists, kept per thread so steps allocate nothing.
#[derive(Default)]
struct Plan {
    tasks: Vec<Task>,
    /// Per lone (token, kv head): its group's index in `out` and its first chunk task's
    /// partial slot; a last entry holds the slot count.
    merges: Vec<(usize, usize)>,
    partials: Vec<f32>,
}

/// A tile task's merged outputs and its kernel's buffers, per thread.
#[derive(Default)]
struct TileBuffers {
    result: Vec<f32>,
    kernel: attention_tile::TileScratch,
}

/// One chunk task of `paged_attention` (a lone token's kv heads over one chunk), compiled
/// per vector unit.
struct AttendHeads<'a, T, P> {
    shape: &'a AttentionShape,
    q: &'a [f32],
    token: QueryToken<'a>,
    kv_heads: std::ops::Range<usize>,
    first: usize,
    last: usize,
    layer: &'a KvBuffers<T>,
    prefetch: bool,
    scores: &'a mut Vec<f32>,
    part_of: P,
}

impl<'a, 'p, T: KvElement, P: Fn(usize) -> &'p mut [f32]> Kernel for AttendHeads<'a, T, P> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let AttendHeads {
            shape,
            q,
            token,
            kv_heads,
            first,
            last,
            layer,
            prefetch,
            scores,
            part_of,
        } = self;
        shape.attend_heads(q, token, kv_heads, (first, last), layer, prefetch, scores, part_of)
    }
}

/// Each item of `items` with the item `ahead` places later in `again` (the same sequence),
/// None past its end.
fn with_lookahead<I: Iterator>(items: I, again: I, ahead: usize) -> impl Iterator<Item = (I::Item, Option<I::Item>)> {
    items.zip(again.skip(ahead).map(Some).chain(std::iter::repeat_with(|| None)))
}

/// Asks for the cache lines of `data` into L2 (no effect on results; a no-op off x86-64).
#[inline(always)]
fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(64 / std::mem::size_of::<T>()) {
        // SAFETY: a prefetch never faults; the address is inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Blocks ahead of their use whose keys (and values) a decode's chunk task asks for.
const PREFETCH_BLOCKS: usize = 1;
/// Positions per chunk task (chunks start at multiples of it, whatever the batch).
pub(super) const KEY_CHUNK: usize = 64;
/// Lone-token chunks of a piece from which one task covers all kv heads of a chunk.
const MIN_ALL_HEAD_TASKS: usize = 16;
/// Chunk tasks per parallel loop of a long prompt (bounds the partials: ~0.8 MB for
/// SmolLM2's 3 heads of 64 per kv head).
const MAX_PIECE_TASKS: usize = 1024;
/// Below this many (task × key) pairs a layer's attention runs on the calling thread.
/// Small: a batch-1 decode at position ~190 (3 tasks, ~40 µs of mostly memory waits) is
/// worth a fork-join on the team or a pool worker (it was 2,048 when a loop cost ~45 µs).
const SERIAL_MAX_KEYS: usize = 256;

thread_local! {
    /// Per-thread score rows, grown to the longest context seen and reused.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The caller's chunk tasks and their partial results.
    static PLAN: RefCell<Plan> = RefCell::new(Plan::default());
    /// A tile task's buffers.
    static TILE_SCRATCH: RefCell<TileBuffers> = RefCell::new(TileBuffers::default());
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
    use crate::kv_cache::paged_cache::{Bf16, KvDtype};

    /// SmolLM2-135M's geometry (3 query heads per kv head, head_dim 64), 16-slot blocks.
    const SMOLLM2: AttentionShape = AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        sliding_window: None,
        scale: 0.125,
    };

    /// Naive softmax attention over a contiguous copy, in f64, for comparison.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let dot = |k: &Vec<f32>| q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
        let scores: Vec<f64> = keys.iter().map(|k| dot(k) * scale as f64).collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let mut out = vec![0.0f64; q.len()];
        for (e, v) in exps.iter().zip(values) {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += e / sum * x as f64;
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    /// Element j of position p's key (salt 0.1) or value (salt 0.7) row in the test caches.
    fn value(p: usize, j: usize, salt: f32) -> f32 {
        ((p * 31 + j * 7) as f32 * 0.173 + salt).sin()
    }

    /// `x` as a cache of `dtype` gives it back.
    fn stored(dtype: KvDtype, x: f32) -> f32 {
        match dtype {
            KvDtype::F32 => x,
            KvDtype::Bf16 => Bf16::store(x).load(),
        }
    }

    /// A layer cache holding positions 0..n (keys salt 0.1, values 0.7) and its block table.
    fn filled_layer(shape: AttentionShape, n: usize) -> (LayerKv, Vec<u32>) {
        filled_layer_as(shape, n, KvDtype::F32)
    }

    /// `filled_layer` with keys and values stored as `dtype`.
    fn filled_layer_as(shape: AttentionShape, n: usize, dtype: KvDtype) -> (LayerKv, Vec<u32>) {
        let (hd, bs) = (shape.head_dim, shape.block_size);
        let width = shape.num_kv_heads * hd;
        let blocks = n.div_ceil(bs);
        let num_blocks = 2 * blocks + 1;
        let mut layer = LayerKv::zeroed(dtype, num_blocks * bs * width);
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
        check_against_naive_as(shape, n, KvDtype::F32)
    }

    /// `check_against_naive` over a cache of `dtype`, against the softmax of the stored
    /// (for bf16: rounded) keys and values.
    fn check_against_naive_as(shape: AttentionShape, n: usize, dtype: KvDtype) {
        let hd = shape.head_dim;
        let (layer, table) = filled_layer_as(shape, n, dtype);
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
                        .map(|s| (0..hd).map(|j| stored(dtype, value(s, kvh * hd + j, salt))).collect())
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

    /// A prompt long enough that its chunk tasks run in several pieces (`MAX_PIECE_TASKS`),
    /// each token over up to 5 chunks: every head still matches the naive softmax.
    #[test]
    fn a_long_prompt_in_pieces_matches_naive_attention() {
        let n = 300;
        let chunk_tasks: usize = (0..n).map(|p| (p / KEY_CHUNK + 1) * SMOLLM2.num_kv_heads).sum();
        assert!(chunk_tasks > 2 * MAX_PIECE_TASKS, "the test must cover several pieces");
        check_against_naive(SMOLLM2, n);
    }

    /// Shapes for the tile tests: SmolLM2's (group 3, 64 columns), group 5 (a 4-row block
    /// and a 1-row block) with 80 columns (64 + 16), group 2 with 12 columns (below one
    /// vector) over 3-slot blocks (the scalar scoring path) and a sliding window.
    fn tile_shapes() -> [AttentionShape; 3] {
        [
            SMOLLM2,
            AttentionShape {
                num_heads: 10,
                num_kv_heads: 2,
                head_dim: 80,
                block_size: 32,
                sliding_window: Some(70),
                scale: 0.11,
            },
            AttentionShape {
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 12,
                block_size: 3,
                sliding_window: None,
                scale: 0.3,
            },
        ]
    }

    /// A step mixing two prompts' runs (one from position 0, one a later chunk of a
    /// longer sequence, both crossing chunk and tile boundaries) with a lone decode token:
    /// every token's output is bit-identical to attending it alone (a lone token's chunk
    /// tasks), so tiles keep results independent of the batch.
    #[test]
    fn tiles_give_the_bits_of_each_token_alone() {
        for (shape, dtype) in tile_shapes()
            .into_iter()
            .flat_map(|s| [(s, KvDtype::F32), (s, KvDtype::Bf16)])
        {
            let width = shape.num_heads * shape.head_dim;
            let (layer, table) = filled_layer_as(shape, 200, dtype);
            let seq = |p: usize| QueryToken {
                position: p,
                block_table: &table,
            };
            // Another sequence over the same cache, blocks in another order.
            let table_b: Vec<u32> = table.iter().rev().cloned().collect();
            let seq_b = |p: usize| QueryToken {
                position: p,
                block_table: &table_b,
            };
            let tokens: Vec<QueryToken> = (0..37).map(seq).chain((59..130).map(seq_b)).chain([seq(190)]).collect();
            let q: Vec<f32> = (0..tokens.len() * width).map(|i| (i as f32 * 0.61).sin()).collect();
            let mut out = vec![0.0; q.len()];
            shape.paged_attention(&q, &tokens, &layer, &mut out);
            for (t, &token) in tokens.iter().enumerate() {
                let mut alone = vec![0.0; width];
                shape.paged_attention(&q[t * width..][..width], &[token], &layer, &mut alone);
                assert_eq!(alone[..], out[t * width..][..width], "{shape:?} {dtype:?} token {t}");
            }
        }
    }

    /// Prompts whose tiles cross chunk, block and tile boundaries at odd lengths, every
    /// head of every token against the f64 softmax.
    #[test]
    fn tiles_match_the_f64_softmax() {
        for shape in tile_shapes() {
            for n in [2, 17, 65, 131] {
                check_against_naive(shape, n);
            }
        }
    }

    /// A bf16 cache: keys and values rounded once when written, widened exactly when read,
    /// so lone tokens (chunk tasks, decode) and prompts (tiles) both match the f64 softmax
    /// of the rounded keys and values, over several chunks and blocks.
    #[test]
    fn a_bf16_cache_matches_the_f64_softmax_of_its_rounded_entries() {
        for shape in tile_shapes() {
            check_against_naive_as(shape, 131, KvDtype::Bf16);
            let (layer, table) = filled_layer_as(shape, 300, KvDtype::Bf16);
            let hd = shape.head_dim;
            let q: Vec<f32> = (0..shape.num_heads * hd).map(|i| (i as f32 * 0.37).cos()).collect();
            let token = QueryToken {
                position: 299,
                block_table: &table,
            };
            let mut out = vec![0.0; q.len()];
            shape.paged_attention(&q, &[token], &layer, &mut out);
            let first = shape.sliding_window.map_or(0, |w| 300 - w);
            for h in 0..shape.num_heads {
                let kvh = h / (shape.num_heads / shape.num_kv_heads);
                let head = |salt| -> Vec<Vec<f32>> {
                    (first..300)
                        .map(|s| {
                            (0..hd)
                                .map(|j| stored(KvDtype::Bf16, value(s, kvh * hd + j, salt)))
                                .collect()
                        })
                        .collect()
                };
                let expected = reference(&q[h * hd..][..hd], &head(0.1), &head(0.7), shape.scale);
                for (a, b) in out[h * hd..][..hd].iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-5, "{shape:?} h {h}: {a} vs {b}");
                }
            }
        }
    }

    /// Merging chunks equals one softmax over their union: two chunks with known maxima,
    /// sums and outputs against the directly computed weighted mean.
    #[test]
    fn merged_chunks_equal_the_softmax_over_their_union() {
        let (group, hd) = (1, 2);
        // Scores 1, 3 in chunk 0 and 2 in chunk 1; values [1, 0], [0, 1], [2, 2].
        let scores = [1.0f32, 3.0, 2.0];
        let values = [[1.0f32, 0.0], [0.0, 1.0], [2.0, 2.0]];
        let chunk = |idx: &[usize]| -> Vec<f32> {
            let m = idx.iter().map(|&i| scores[i]).fold(f32::NEG_INFINITY, f32::max);
            let mut o = vec![0.0; hd];
            let mut s = 0.0;
            for &i in idx {
                let e = (scores[i] - m).exp();
                s += e;
                o[0] += e * values[i][0];
                o[1] += e * values[i][1];
            }
            o.extend([m, s]);
            o
        };
        let parts: Vec<f32> = [chunk(&[0, 1]), chunk(&[2])].concat();
        let mut out = vec![0.0; group * hd];
        merge_chunks(&parts, group, hd, &mut out);
        let total: f32 = scores.iter().map(|s| s.exp()).sum();
        for d in 0..hd {
            let expected: f32 = (0..3).map(|i| scores[i].exp() / total * values[i][d]).sum();
            assert!((out[d] - expected).abs() < 1e-6, "dim {d}: {} vs {expected}", out[d]);
        }
    }

    thread_local! {
        /// Plans every token by chunk tasks on this thread (the timing test's baseline).
        pub(super) static CHUNKS_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The attention of one 128-token prompt step: 30 layers, each a cache of the prompt's
    /// own keys and values (in cache, as the engine's prompt step wrote them just before).
    /// Chunk tasks and tiles, float32 and bf16 caches, alternated in one process.
    #[test]
    #[ignore = "timing report"]
    fn prompt_step_attention_speed() {
        let (shape, n, layers) = (SMOLLM2, 128usize, 30usize);
        let q: Vec<f32> = (0..n * shape.num_heads * shape.head_dim)
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        let mut out = vec![0.0; q.len()];
        let variants = [
            (false, KvDtype::F32),
            (true, KvDtype::F32),
            (false, KvDtype::Bf16),
            (true, KvDtype::Bf16),
        ];
        let caches: Vec<Vec<(LayerKv, Vec<u32>)>> = variants
            .iter()
            .map(|&(_, dtype)| (0..layers).map(|_| filled_layer_as(shape, n, dtype)).collect())
            .collect();
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..15 {
            for (v, &(tiles, _)) in variants.iter().enumerate() {
                CHUNKS_ONLY.with(|c| c.set(!tiles));
                let t = std::time::Instant::now();
                for (layer, table) in &caches[v] {
                    let tokens: Vec<QueryToken> = (0..n)
                        .map(|p| QueryToken {
                            position: p,
                            block_table: table,
                        })
                        .collect();
                    shape.paged_attention(&q, &tokens, layer, &mut out);
                }
                times[v].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        CHUNKS_ONLY.with(|c| c.set(false));
        for ((tiles, dtype), t) in variants.iter().zip(&mut times) {
            t.sort_by(f64::total_cmp);
            let form = if *tiles { "tiles" } else { "chunk tasks" };
            println!(
                "attention of a 128-token prompt step (30 layers), {form}, {dtype:?} cache: min {:.2} ms, median {:.2} ms",
                t[0],
                t[t.len() / 2]
            );
        }
        println!(
            "load {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
    }

    /// The attention of one 32-sequence decode step: positions ~192, 30 layers whose f32
    /// caches (377 MB) do not fit the L3, so the keys and values come from memory as in
    /// the engine's batched decode steps.
    #[test]
    #[ignore = "timing report"]
    fn decode_step_attention_speed() {
        let shape = SMOLLM2;
        let (seqs, pos, layers) = (32usize, 192usize, 30usize);
        let width = shape.num_kv_heads * shape.head_dim;
        let blocks_per_seq = 256 / shape.block_size;
        let num_blocks = seqs * blocks_per_seq;
        // Float32 and bf16 caches (half the bytes), alternated.
        let make = |bf16: bool| -> Vec<LayerKv> {
            (0..layers)
                .map(|l| {
                    let len = num_blocks * shape.block_size * width;
                    let k = (0..len).map(|i| ((i * 7 + l) % 13) as f32 * 0.01);
                    let v = (0..len).map(|i| ((i * 5 + l) % 11) as f32 * 0.01);
                    if bf16 {
                        LayerKv::Bf16(KvBuffers {
                            k: k.map(Bf16::store).collect(),
                            v: v.map(Bf16::store).collect(),
                        })
                    } else {
                        LayerKv::F32(KvBuffers {
                            k: k.collect(),
                            v: v.collect(),
                        })
                    }
                })
                .collect()
        };
        let caches = [make(false), make(true)];
        // VLLM_ATTN_BENCH_INTERLEAVED=1: sequence s owns every 32nd block from s (neighbours
        // interleave in memory); else its blocks are consecutive, as a fresh engine hands out.
        let interleaved = std::env::var_os("VLLM_ATTN_BENCH_INTERLEAVED").is_some();
        // VLLM_ATTN_BENCH_HOT=1: every layer attends over layer 0's cache, which stays in the
        // L3: the time of the arithmetic without the DRAM.
        let hot = std::env::var_os("VLLM_ATTN_BENCH_HOT").is_some();
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| {
                (0..blocks_per_seq)
                    .map(|b| if interleaved { b * seqs + s } else { s * blocks_per_seq + b } as u32)
                    .collect()
            })
            .collect();
        let tokens: Vec<QueryToken> = tables
            .iter()
            .enumerate()
            .map(|(s, t)| QueryToken {
                position: pos + s % 8,
                block_table: t,
            })
            .collect();
        let q: Vec<f32> = (0..seqs * shape.num_heads * shape.head_dim)
            .map(|i| (i % 17) as f32 * 0.05)
            .collect();
        let mut out = vec![0.0; q.len()];
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..12 {
            for (cache, times) in caches.iter().zip(&mut times) {
                let t = std::time::Instant::now();
                for l in 0..cache.len() {
                    shape.paged_attention(&q, &tokens, &cache[if hot { 0 } else { l }], &mut out);
                }
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (bytes_per, (name, times)) in [4, 2].into_iter().zip(["f32", "bf16"].into_iter().zip(&mut times)) {
            times.sort_by(f64::total_cmp);
            let bytes = (seqs * (pos + 4) * 2 * width * bytes_per * layers) as f64;
            println!(
                "attention of a 32-row decode step, {name} cache: min {:.2} ms ({:.1} GB/s of keys and values), median {:.2} ms",
                times[0],
                bytes / times[0] / 1e6,
                times[times.len() / 2],
            );
        }
        println!(
            "load {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
    }
}
