//! The 4-bit (Q4_0 / Q4_1) side of the int8 matmul: weights stored as one stream of tiles
//! of 4 rows, and the kernel that reads them (see qmatmul_int8.rs for the arithmetic).
//!
//! A tile holds 4 weight rows. For each couple c (two pairs, blocks 4c..4c+4) it stores the
//! 4 rows' 64 bytes of nibbles, then their 16 block scales and then their 16 offsets, as f16
//! (GGUF's own values, so exact), row-major (value 4k + j is row k, block 4c + j): 320
//! bytes, five cache lines. An odd pair count ends with a lone pair: 4 × 32 bytes of nibbles,
//! 8 scales, 8 offsets (160 bytes). A decode step reads each tile once, front to back, so
//! the hardware prefetcher and ours see one stream, and no padding block is stored.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use half::f16;

use super::int8_dot::Dot;
use super::qmatmul_int8::{prefetch_lines, Input, OutPtr, RowKernel};

/// Bytes of one couple of a tile, and of a lone tail pair.
pub(super) const COUPLE_BYTES: usize = 320;
const TAIL_BYTES: usize = 160;
/// Bytes ahead of the row in work that the kernel asks the memory for.
const PREFETCH_BYTES: usize = 6 * 1024;

/// The tile layout of a [rows, pairs·64] matrix of 4-bit levels.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiles {
    pub pairs: usize,
    pub rows: usize,
}

impl Tiles {
    pub fn couples(self) -> usize {
        self.pairs / 2
    }

    pub fn has_tail(self) -> bool {
        self.pairs % 2 == 1
    }

    pub fn tile_bytes(self) -> usize {
        self.couples() * COUPLE_BYTES + usize::from(self.has_tail()) * TAIL_BYTES
    }

    pub fn tiles(self) -> usize {
        self.rows.div_ceil(4)
    }

    /// Builds the tiles from per-row nibbles (`levels`: rows × pairs × 32 bytes, pair layout)
    /// and per-row block scales and offsets (rows × 2·pairs each; already f16 values).
    pub fn pack(self, levels: &[u8], scale: &[f32], aux: &[f32]) -> Vec<u8> {
        let nb = 2 * self.pairs;
        let mut out = vec![0u8; self.tiles() * self.tile_bytes()];
        let put = |dst: &mut [u8], v: f32| dst.copy_from_slice(&f16::from_f32(v).to_le_bytes());
        for (t, tile) in out.chunks_exact_mut(self.tile_bytes()).enumerate() {
            for k in 0..4 {
                let r = 4 * t + k;
                if r >= self.rows {
                    break;
                }
                let lv = &levels[r * self.pairs * 32..(r + 1) * self.pairs * 32];
                let (sc, ax) = (&scale[r * nb..(r + 1) * nb], &aux[r * nb..(r + 1) * nb]);
                for c in 0..self.couples() {
                    let base = c * COUPLE_BYTES;
                    tile[base + k * 64..base + (k + 1) * 64].copy_from_slice(&lv[c * 64..(c + 1) * 64]);
                    for j in 0..4 {
                        put(&mut tile[base + 256 + k * 8 + j * 2..][..2], sc[4 * c + j]);
                        put(&mut tile[base + 288 + k * 8 + j * 2..][..2], ax[4 * c + j]);
                    }
                }
                if self.has_tail() {
                    let (base, p) = (self.couples() * COUPLE_BYTES, self.pairs - 1);
                    tile[base + k * 32..base + (k + 1) * 32].copy_from_slice(&lv[p * 32..(p + 1) * 32]);
                    for j in 0..2 {
                        put(&mut tile[base + 128 + k * 4 + j * 2..][..2], sc[2 * p + j]);
                        put(&mut tile[base + 144 + k * 4 + j * 2..][..2], ax[2 * p + j]);
                    }
                }
            }
        }
        out
    }

    /// out[i, r] for the rows of tiles t0..t1 and every input row i < m of `x` (its `y`
    /// unspread: Σx of the block times the type's factor). Each output is the same sequence
    /// of operations for any m (batch invariance).
    ///
    /// # Safety
    /// Inlined into a caller compiled with K's features; `data` holds the tiles; tasks own
    /// disjoint rows of `out`.
    #[inline(always)]
    pub unsafe fn multiply<K: RowKernel>(self, data: &[u8], t0: usize, t1: usize, m: usize, x: &Input, out: OutPtr) {
        let tb = self.tile_bytes();
        let ahead = PREFETCH_BYTES.div_ceil(tb).max(1);
        prefetch_lines(data.as_ptr(), t0 * tb, (ahead.min(t1 - t0)) * tb);
        for t in t0..t1 {
            prefetch_lines(data.as_ptr(), (t + ahead) * tb, tb);
            let tile = data.as_ptr().add(t * tb);
            for i in 0..m {
                K::tile_row(self, tile, 4 * t, i, x, out);
            }
        }
    }

    /// The 4 outputs of one tile (rows r..r+4) for input row i, in 512-bit vectors.
    #[inline(always)]
    pub unsafe fn tile_row<D: Dot>(self, tile: *const u8, r: usize, i: usize, x: &Input, out: OutPtr) {
        let Input { xq, dx, y } = x;
        let nb = 2 * self.pairs;
        let low4 = _mm512_set1_epi8(0x0F);
        let lo_weight = _mm512_set1_ps(1.0 / 254.0);
        // Lane L of a couple's dot belongs to block 2·(L / 8) + L % 2 of the couple; row k's
        // products sit at 4k + block in the 16-lane scale vector.
        let lanes = _mm512_set_epi32(3, 2, 3, 2, 3, 2, 3, 2, 1, 0, 1, 0, 1, 0, 1, 0);
        let idx = [
            lanes,
            _mm512_add_epi32(lanes, _mm512_set1_epi32(4)),
            _mm512_add_epi32(lanes, _mm512_set1_epi32(8)),
            _mm512_add_epi32(lanes, _mm512_set1_epi32(12)),
        ];
        let x_hi = xq.as_ptr().add(2 * i * self.pairs * 64);
        let x_lo = x_hi.add(self.pairs * 64);
        let (dxr, yr) = (dx.as_ptr().add(i * nb), y.as_ptr().add(i * nb));
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut offsets = _mm512_setzero_ps();
        for c in 0..self.couples() {
            let base = tile.add(c * COUPLE_BYTES);
            let xh0 = _mm512_loadu_si512(x_hi.add(c * 128) as *const _);
            let xh1 = _mm512_loadu_si512(x_hi.add(c * 128 + 64) as *const _);
            let xl0 = _mm512_loadu_si512(x_lo.add(c * 128) as *const _);
            let xl1 = _mm512_loadu_si512(x_lo.add(c * 128 + 64) as *const _);
            let sx = _mm512_broadcast_f32x4(_mm_loadu_ps(dxr.add(4 * c)));
            let sy = _mm512_broadcast_f32x4(_mm_loadu_ps(yr.add(4 * c)));
            let scales = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(base.add(256) as *const _)), sx);
            let aux = _mm512_cvtph_ps(_mm256_loadu_si256(base.add(288) as *const _));
            offsets = _mm512_fmadd_ps(aux, sy, offsets);
            for (k, a) in acc.iter_mut().enumerate() {
                let v = _mm512_loadu_si512(base.add(k * 64) as *const _);
                let w0 = _mm512_and_si512(v, low4);
                let w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                let hi = D::nibbles2(w0, xh0, w1, xh1);
                let lo = D::nibbles2(w0, xl0, w1, xl1);
                let dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), lo_weight, _mm512_cvtepi32_ps(hi));
                *a = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(idx[k], scales), *a);
            }
        }
        let mut tail_offsets = [0.0f32; 4];
        if self.has_tail() {
            let base = tile.add(self.couples() * COUPLE_BYTES);
            let p = self.pairs - 1;
            let shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
            let xh = _mm512_loadu_si512(x_hi.add(p * 64) as *const _);
            let xl = _mm512_loadu_si512(x_lo.add(p * 64) as *const _);
            // Two block values as one 64-bit pattern: lane L belongs to block L % 2.
            let two = |v: __m128| _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(v)));
            let sx = _mm_castpd_ps(_mm_load_sd(dxr.add(2 * p) as *const f64));
            let sy = _mm_castpd_ps(_mm_load_sd(yr.add(2 * p) as *const f64));
            for (k, a) in acc.iter_mut().enumerate() {
                let half = _mm256_loadu_si256(base.add(k * 32) as *const __m256i);
                let both = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
                let w = _mm512_and_si512(_mm512_srlv_epi64(both, shifts), low4);
                let hi = D::nibbles(w, xh);
                let lo = D::nibbles(w, xl);
                let dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), lo_weight, _mm512_cvtepi32_ps(hi));
                let f16s =
                    |at: usize| _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(base.add(at) as *const i32)));
                *a = _mm512_fmadd_ps(dot, two(_mm_mul_ps(f16s(128 + k * 4), sx)), *a);
                let off = _mm_mul_ps(f16s(144 + k * 4), sy);
                tail_offsets[k] = _mm_cvtss_f32(off) + _mm_cvtss_f32(_mm_movehdup_ps(off));
            }
        }
        let mut off = [0.0f32; 16];
        _mm512_storeu_ps(off.as_mut_ptr(), offsets);
        for (k, a) in acc.iter().enumerate() {
            if r + k < self.rows {
                let o = (off[4 * k] + off[4 * k + 1]) + (off[4 * k + 2] + off[4 * k + 3]);
                *out.get().add(i * self.rows + r + k) = _mm512_reduce_add_ps(*a) + o + tail_offsets[k];
            }
        }
    }
}
