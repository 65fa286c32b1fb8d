//! Q4_0 / Q4_1 / Q8_0 matmuls with integer dot products (AVX-512 VNNI; the same sums in
//! two steps on AVX-512BW (int8_dot.rs) or in 256-bit vectors on AVX2
//! (qmatmul_int8_avx2.rs)): each 32-value block of an input row is split into two int8
//! vectors with one scale, x ≈ dx·(hi + lo/254) (llama.cpp keeps only hi; the low part
//! brings the input error from ~0.4% to ~2e-5 of the block's largest value, so greedy ids
//! follow the dequantized float32 model), and a weight block's 32 levels meet each in one
//! `vpdpbusd` (u8 × i8, summed in i32) or its equivalent.
//!
//! Weights are repacked once at load. Every block is stored as unsigned levels u with
//! w = scale·u + offset·(what `offset` multiplies), so one kernel serves all three types:
//!  - Q4_1: w = d·q + m          → scale d, aux m, y = Σx of the block;
//!  - Q4_0: w = d·(q − 8)        → scale d, aux d, y = −8·Σx;
//!  - Q8_0: w = d·q, u = q + 128 → scale d, aux d, y = −128·Σx.
//!
//! A row's value is Σ_b scale_b·dx_b·(Σ u·qx)_b + Σ_b aux_b·y_b.
//!
//! The pair layout below is the repacking's first stage: 4-bit rows then go into 4-row tiles
//! (qmatmul_nibbles.rs), Q8_0 rows into one record each with f16 scales (`q8_records`).
//!
//! Two blocks share one 64-byte register. Their levels are laid out so that 4-byte lane L
//! holds block L % 2: the pair's two scales then broadcast as one 64-bit pattern. For
//! 4-bit types the 64 levels are 32 bytes of nibbles (byte j: level j low, j + 32 high).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::int8_dot::{Avx512Bw, Dot, DotIsa, Vnni};
use super::int8_quantize::{quantize_blocks, QuantBlock};
use super::qmatmul_int8_avx2::Avx2;
use super::qmatmul_nibbles::Tiles;

/// Input rows that share one pass over the weight row.
pub(super) const ROW_GROUP: usize = 8;
/// Parallel tasks per thread of a matmul (more only balance load; each costs a cold start).
const TASKS_PER_THREAD: usize = 4;
/// Fewest weight rows per parallel task.
const MIN_TASK_ROWS: usize = 32;
/// Below this many multiply-adds a call stays on the calling thread.
const SERIAL_MAX_MACS: usize = 1 << 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

pub struct Int8Matrix {
    isa: DotIsa,
    kind: Kind,
    rows: usize,
    cols: usize,
    /// Block pairs per row (an odd block count gets a zero block).
    pairs: usize,
    /// The weights with their block scales: 4-row tiles for 4-bit types
    /// (qmatmul_nibbles.rs), one record per row for Q8_0 (`q8_records`).
    levels: Vec<u8>,
}

/// Position p (0..64) of a pair's register holds block (p / 4) % 2, level (p / 8)·4 + p % 4.
#[inline(always)]
const fn slot(p: usize) -> (usize, usize) {
    ((p / 4) % 2, (p / 8) * 4 + p % 4)
}

impl Int8Matrix {
    /// Repacks GGML blocks ([rows, cols], `data` as GGML stores them) for kernels of `isa`
    /// (one this CPU has); None for other types.
    pub fn pack(isa: DotIsa, dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Option<Int8Matrix> {
        let (kind, block_bytes) = match dtype {
            GgmlDType::Q4_0 => (Kind::Q4_0, 18),
            GgmlDType::Q4_1 => (Kind::Q4_1, 20),
            GgmlDType::Q8_0 => (Kind::Q8_0, 34),
            _ => return None,
        };
        if !cols.is_multiple_of(32) || data.len() != rows * cols / 32 * block_bytes {
            return None;
        }
        let blocks = cols / 32;
        // An odd block count gets a zero block (zero input scale: it contributes 0).
        let pairs = blocks.div_ceil(2);
        let pair_bytes = if kind == Kind::Q8_0 { 64 } else { 32 };
        let mut levels = vec![0u8; rows * pairs * pair_bytes];
        let mut scale = vec![0.0f32; rows * pairs * 2];
        let mut aux = vec![0.0f32; rows * pairs * 2];
        let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        levels
            .par_chunks_mut(pairs * pair_bytes)
            .zip(scale.par_chunks_mut(pairs * 2).zip(aux.par_chunks_mut(pairs * 2)))
            .enumerate()
            .for_each(|(r, (lv, (sc, ax)))| {
                let row = &data[r * blocks * block_bytes..(r + 1) * blocks * block_bytes];
                // Unsigned level i of block b.
                let level = |b: usize, i: usize| -> u8 {
                    if b >= blocks {
                        return if kind == Kind::Q8_0 { 128 } else { 0 };
                    }
                    let blk = &row[b * block_bytes..(b + 1) * block_bytes];
                    match kind {
                        Kind::Q4_0 => (blk[2 + i % 16] >> (4 * (i / 16))) & 0x0F,
                        Kind::Q4_1 => (blk[4 + i % 16] >> (4 * (i / 16))) & 0x0F,
                        Kind::Q8_0 => (blk[2 + i] as i8 as i16 + 128) as u8,
                    }
                };
                for t in 0..pairs {
                    let out = &mut lv[t * pair_bytes..(t + 1) * pair_bytes];
                    for p in 0..64 {
                        let (which, i) = slot(p);
                        let u = level(2 * t + which, i);
                        if kind == Kind::Q8_0 {
                            out[p] = u;
                        } else if p < 32 {
                            out[p] |= u;
                        } else {
                            out[p - 32] |= u << 4;
                        }
                    }
                }
                for b in 0..blocks {
                    let blk = &row[b * block_bytes..(b + 1) * block_bytes];
                    sc[b] = f16_at(blk, 0);
                    ax[b] = if kind == Kind::Q4_1 { f16_at(blk, 2) } else { sc[b] };
                }
            });
        let levels = if kind == Kind::Q8_0 {
            q8_records(&levels, &scale, rows, pairs)
        } else {
            // 4-bit kinds: one stream of 4-row tiles with f16 scales (qmatmul_nibbles.rs).
            Tiles { pairs, rows }.pack(&levels, &scale, &aux)
        };
        Some(Int8Matrix {
            isa,
            kind,
            rows,
            cols,
            pairs,
            levels,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn isa(&self) -> DotIsa {
        self.isa
    }

    pub fn bytes(&self) -> usize {
        self.levels.len()
    }

    /// out ([m, rows]) = x ([m, cols]) Wᵀ.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        // A rayon worker waiting inside `multiply` may run another model's forward on this
        // thread: that nested call gets buffers of its own.
        INPUT.with(|cell| match cell.try_borrow_mut() {
            Ok(mut input) => self.forward_with(&mut input, x, m, out),
            Err(_) => self.forward_with(&mut Input::default(), x, m, out),
        });
    }

    fn forward_with(&self, input: &mut Input, x: &[f32], m: usize, out: &mut [f32]) {
        let nb = self.pairs * 2;
        {
            let Input { xq, dx, y } = input;
            // Per input row: the int8 parts in pair layout, the block scales, and y.
            xq.resize(2 * m * self.pairs * 64, 0);
            dx.resize(m * nb, 0.0);
            y.resize(m * nb, 0.0);
            for i in 0..m {
                let xq_row = &mut xq[2 * i * self.pairs * 64..2 * (i + 1) * self.pairs * 64];
                let y_row = &mut y[i * nb..(i + 1) * nb];
                self.quantize_row(
                    &x[i * self.cols..(i + 1) * self.cols],
                    xq_row,
                    &mut dx[i * nb..(i + 1) * nb],
                    y_row,
                );
                if self.kind == Kind::Q8_0 {
                    // Spread over the 8 lanes of the block that each add it in a 512-bit
                    // vector (see `RowKernel::q8_row`).
                    y_row.iter_mut().for_each(|v| *v /= 8.0);
                } else {
                    let (hi, lo) = xq_row.split_at_mut(self.pairs * 64);
                    to_couple_layout(hi);
                    to_couple_layout(lo);
                }
            }
        }
        self.multiply(input, m, out);
    }

    fn multiply(&self, x: &Input, m: usize, out: &mut [f32]) {
        let out_ptr = OutPtr(out.as_mut_ptr());
        // SAFETY: `pack` was given an isa this CPU has; tasks own disjoint rows (r0 is a
        // multiple of 4, so whole tiles).
        let run = |r0: usize, r1: usize| unsafe {
            match self.isa {
                DotIsa::Vnni => self.rows_vnni(r0, r1, m, x, out_ptr),
                DotIsa::Avx512Bw => self.rows_bw(r0, r1, m, x, out_ptr),
                DotIsa::Avx2 => self.rows_avx2(r0, r1, m, x, out_ptr),
            }
        };
        let threads = rayon::current_num_threads();
        if m * self.rows * self.cols <= SERIAL_MAX_MACS || threads <= 1 {
            run(0, self.rows);
        } else {
            // Long runs of rows per task: each task restarts the weight stream (and its
            // prefetch), so a few tasks per thread balance load without many cold starts.
            let task_rows = self
                .rows
                .div_ceil(TASKS_PER_THREAD * threads)
                .next_multiple_of(4)
                .max(MIN_TASK_ROWS);
            let tasks = self.rows.div_ceil(task_rows);
            super::team::for_each(tasks, |t| run(t * task_rows, ((t + 1) * task_rows).min(self.rows)));
        }
    }

    fn quantize_row(&self, x: &[f32], xq: &mut [i8], dx: &mut [f32], y: &mut [f32]) {
        let lo_at = self.pairs * 64;
        let factor = match self.kind {
            Kind::Q4_1 => 1.0,
            Kind::Q4_0 => -8.0,
            Kind::Q8_0 => -128.0,
        };
        // An odd block count's padding block: zero scale, so it contributes 0.
        dx.fill(0.0);
        y.fill(0.0);
        let put = |b: usize, q: QuantBlock| {
            let (t, which) = (b / 2, b % 2);
            // Into the pair's register layout: levels 4q..4q + 4 of this block go to the
            // 4-byte lane 2q + which (see `slot`).
            for k in 0..8 {
                let at = t * 64 + 8 * k + 4 * which;
                xq[at..at + 4].copy_from_slice(&q.hi[4 * k..4 * k + 4]);
                xq[lo_at + at..lo_at + at + 4].copy_from_slice(&q.lo[4 * k..4 * k + 4]);
            }
            dx[b] = q.d;
            y[b] = q.sum * factor;
        };
        // SAFETY: `pack` was given an isa this CPU has.
        unsafe { quantize_blocks(self.isa, x, put) };
    }

    /// Rows r0..r1 of `out` for all m input rows, compiled for VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,f16c")]
    unsafe fn rows_vnni(&self, r0: usize, r1: usize, m: usize, x: &Input, out: OutPtr) {
        self.multiply_rows::<Vnni>(r0, r1, m, x, out)
    }

    /// Rows r0..r1 of `out` for all m input rows, compiled for AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn rows_bw(&self, r0: usize, r1: usize, m: usize, x: &Input, out: OutPtr) {
        self.multiply_rows::<Avx512Bw>(r0, r1, m, x, out)
    }

    /// Rows r0..r1 of `out` for all m input rows, compiled for AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(&self, r0: usize, r1: usize, m: usize, x: &Input, out: OutPtr) {
        self.multiply_rows::<Avx2>(r0, r1, m, x, out)
    }

    #[inline(always)]
    unsafe fn multiply_rows<K: RowKernel>(&self, r0: usize, r1: usize, m: usize, x: &Input, out: OutPtr) {
        if self.kind != Kind::Q8_0 {
            let tiles = Tiles {
                pairs: self.pairs,
                rows: self.rows,
            };
            tiles.multiply::<K>(&self.levels, r0 / 4, r1.div_ceil(4), m, x, out);
            return;
        }
        for g0 in (0..m).step_by(ROW_GROUP) {
            self.rows_group::<K>(r0, r1, g0, ROW_GROUP.min(m - g0), x, out);
        }
    }

    /// Q8_0 rows r0..r1 for input rows g0..g0 + g. A row is one record (see `q8_records`):
    /// its pairs of levels, then its block scales as f16.
    #[inline(always)]
    unsafe fn rows_group<K: RowKernel>(&self, r0: usize, r1: usize, g0: usize, g: usize, x: &Input, out: OutPtr) {
        let record = self.pairs * Q8_RECORD_PAIR;
        let base = self.levels.as_ptr();
        if g0 == 0 {
            let head = Q8_PREFETCH_ROWS.min(r1 - r0);
            prefetch_lines(base, r0 * record, head * record);
        }
        for r in r0..r1 {
            if g0 == 0 {
                prefetch_lines(base, (r + Q8_PREFETCH_ROWS) * record, record);
            }
            let q8 = Q8Row {
                levels: base.add(r * record),
                pairs: self.pairs,
                out_at: out.get().add(r),
                out_stride: self.rows,
            };
            K::q8_row(q8, g0, g, x);
        }
    }
}

/// One Q8_0 weight row as a kernel sees it: its record and where its outputs go (input
/// row i's at `out_at + i·out_stride`).
#[derive(Clone, Copy)]
pub(super) struct Q8Row {
    pub levels: *const u8,
    pub pairs: usize,
    pub out_at: *mut f32,
    pub out_stride: usize,
}

/// The innermost work of the int8 kernels at one vector width; the loops, prefetches and
/// tasks around it are shared.
pub(super) trait RowKernel {
    /// The 4 outputs of one 4-bit tile (weight rows r..r + 4) for input row i.
    unsafe fn tile_row(tiles: Tiles, tile: *const u8, r: usize, i: usize, x: &Input, out: OutPtr);
    /// One Q8_0 weight row against input rows g0..g0 + g (g ≤ ROW_GROUP). The offset term
    /// uses the weight scale too (w = d·(u − 128)): sw·(dot·sx + y), y = −128·Σx spread
    /// over the lanes of its block.
    unsafe fn q8_row(row: Q8Row, g0: usize, g: usize, x: &Input);
}

/// 512-bit vectors with either form of the dot products.
impl<D: Dot> RowKernel for D {
    #[inline(always)]
    unsafe fn tile_row(tiles: Tiles, tile: *const u8, r: usize, i: usize, x: &Input, out: OutPtr) {
        tiles.tile_row::<D>(tile, r, i, x, out)
    }

    #[inline(always)]
    unsafe fn q8_row(row: Q8Row, g0: usize, g: usize, x: &Input) {
        let Input { xq, dx, y } = x;
        let pairs = row.pairs;
        let nb = pairs * 2;
        let lo_weight = _mm512_set1_ps(1.0 / 254.0);
        // Two block values as one 64-bit pattern: 4-byte lane L belongs to block L % 2.
        let pair = |p: *const f32| _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(p as *const f64)));
        let sc = row.levels.add(pairs * 64);
        let mut acc = [_mm512_setzero_ps(); ROW_GROUP];
        for t in 0..pairs {
            let w = _mm512_loadu_si512(row.levels.add(t * 64) as *const _);
            let sw = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(sc.add(4 * t) as *const i32)));
            let sw = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(sw)));
            for (i, a) in acc.iter_mut().enumerate().take(g) {
                let at = g0 + i;
                let x_hi = xq.as_ptr().add((2 * at * pairs + t) * 64);
                let x_lo = x_hi.add(pairs * 64);
                let hi = D::bytes(w, _mm512_loadu_si512(x_hi as *const _));
                let lo = D::bytes(w, _mm512_loadu_si512(x_lo as *const _));
                let dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), lo_weight, _mm512_cvtepi32_ps(hi));
                let sx = pair(dx.as_ptr().add(at * nb + 2 * t));
                let sy = pair(y.as_ptr().add(at * nb + 2 * t));
                *a = _mm512_fmadd_ps(sw, _mm512_fmadd_ps(dot, sx, sy), *a);
            }
        }
        for (i, a) in acc.iter().enumerate().take(g) {
            *row.out_at.add((g0 + i) * row.out_stride) = _mm512_reduce_add_ps(*a);
        }
    }
}

/// Bytes per pair of a Q8_0 record: 64 levels and two f16 scales.
const Q8_RECORD_PAIR: usize = 68;

/// Q8_0 rows as records of `pairs` × 64 levels followed by the 2·pairs block scales as f16
/// (GGUF's values, exact), so the kernel reads one stream; the offsets equal the scales
/// and are not stored.
fn q8_records(levels: &[u8], scale: &[f32], rows: usize, pairs: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows * pairs * Q8_RECORD_PAIR];
    for (r, rec) in out.chunks_exact_mut(pairs * Q8_RECORD_PAIR).enumerate() {
        rec[..pairs * 64].copy_from_slice(&levels[r * pairs * 64..(r + 1) * pairs * 64]);
        for (b, dst) in rec[pairs * 64..].chunks_exact_mut(2).enumerate() {
            dst.copy_from_slice(&f16::from_f32(scale[r * 2 * pairs + b]).to_le_bytes());
        }
    }
    out
}

/// Weight rows ahead of the row in work whose lines `rows_group` prefetches (Q8_0 rows of
/// 576 columns: ~5 KB ahead).
const Q8_PREFETCH_ROWS: usize = 8;

/// Asks for the cache lines of `base[at .. at + len]` (addresses past the allocation are
/// never dereferenced: a prefetch does not fault). Shared by the 4-bit kernel.
#[inline(always)]
pub(super) unsafe fn prefetch_lines(base: *const u8, at: usize, len: usize) {
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at + off) as *const i8);
        off += 64;
    }
}

/// From the pair layout `quantize_row` writes to the one the 4-bit kernel reads: in each
/// 128 bytes (two pairs) the middle 32-byte quarters swap, so positions 0..32 of both pairs
/// come first and positions 32..64 of both second (a lone last pair stays as it is).
fn to_couple_layout(xq: &mut [i8]) {
    for couple in xq.chunks_exact_mut(128) {
        let (a, b) = couple.split_at_mut(64);
        a[32..].swap_with_slice(&mut b[..32]);
    }
}

/// The quantized input rows of a call (`quantize_row`), kept per thread so steps allocate
/// nothing. Per row: the high then the low int8 parts (2·pairs·64 bytes; couple layout for
/// 4-bit kinds, pair layout for Q8_0), and 2·pairs block scales `dx` and offset factors `y`.
#[derive(Default)]
pub(super) struct Input {
    pub xq: Vec<i8>,
    pub dx: Vec<f32>,
    pub y: Vec<f32>,
}

thread_local! {
    static INPUT: std::cell::RefCell<Input> = std::cell::RefCell::new(Input::default());
}

/// The output of a matmul, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}
