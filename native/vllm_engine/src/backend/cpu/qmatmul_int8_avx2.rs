//! The int8 kernels in 256-bit vectors, for CPUs with AVX2 but no AVX-512 (Zen 2/3, client
//! cores). They read the same repacked weights and quantized inputs as the 512-bit forms
//! (qmatmul_int8.rs, qmatmul_nibbles.rs) and take each 64-byte group as two halves; the
//! dot products are `vpmaddubsw` + `vpmaddwd`, exact as in int8_dot.rs. Only the order of
//! the float sums differs from the 512-bit kernels.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::qmatmul_int8::{Input, OutPtr, Q8Row, RowKernel, ROW_GROUP};
use super::qmatmul_nibbles::{Tiles, COUPLE_BYTES};

pub(super) struct Avx2;

/// Σ u·x per 4-byte lane over two products, for 4-bit levels (|sums| ≤ 7,620: exact in i16).
#[inline(always)]
unsafe fn nibbles2(w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// Σ u·x per 4-byte lane for byte levels, as 2·(u >> 1) + (u & 1) (see int8_dot.rs).
#[inline(always)]
unsafe fn bytes(w: __m256i, x: __m256i) -> __m256i {
    let half = _mm256_and_si256(_mm256_srli_epi16(w, 1), _mm256_set1_epi8(0x7F));
    let odd = _mm256_and_si256(w, _mm256_set1_epi8(1));
    let halves = _mm256_madd_epi16(_mm256_maddubs_epi16(half, x), _mm256_set1_epi16(2));
    let odds = _mm256_madd_epi16(_mm256_maddubs_epi16(odd, x), _mm256_set1_epi16(1));
    _mm256_add_epi32(halves, odds)
}

#[inline(always)]
unsafe fn load(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// hi + lo/254 as floats.
#[inline(always)]
unsafe fn combine(hi: __m256i, lo: __m256i) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(lo),
        _mm256_set1_ps(1.0 / 254.0),
        _mm256_cvtepi32_ps(hi),
    )
}

/// Two consecutive floats repeated over the 8 lanes (lane L gets the (L % 2)-th).
#[inline(always)]
unsafe fn pair_at(p: *const f32) -> __m256 {
    _mm256_castpd_ps(_mm256_set1_pd(std::ptr::read_unaligned(p as *const f64)))
}

/// Two f16 values at `p` as floats in lanes 0 and 1.
#[inline(always)]
unsafe fn two_f16(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
}

#[inline(always)]
unsafe fn sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

impl RowKernel for Avx2 {
    /// A couple's 64 nibble bytes of a row split into halves a (pair A: blocks 0, 1) and b
    /// (pair B: blocks 2, 3); in each, 4-byte lane L holds block L % 2 of its pair. Low
    /// nibbles meet the couple's first 64 input bytes, high nibbles the second 64.
    #[inline(always)]
    unsafe fn tile_row(tiles: Tiles, tile: *const u8, r: usize, i: usize, x: &Input, out: OutPtr) {
        let Input { xq, dx, y } = x;
        let nb = 2 * tiles.pairs;
        let low4 = _mm256_set1_epi8(0x0F);
        // Lanes of the scale vectors: rows 2j, 2j + 1 × blocks 0..4; row k's block pair
        // (0, 1) or (2, 3) repeated over 8 lanes.
        let idx = |k: usize, b: i32| {
            let o = 4 * (k % 2) as i32 + b;
            _mm256_setr_epi32(o, o + 1, o, o + 1, o, o + 1, o, o + 1)
        };
        let x_hi = xq.as_ptr().add(2 * i * tiles.pairs * 64);
        let x_lo = x_hi.add(tiles.pairs * 64);
        let (dxr, yr) = (dx.as_ptr().add(i * nb), y.as_ptr().add(i * nb));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offsets = [_mm256_setzero_ps(); 2];
        for c in 0..tiles.couples() {
            let base = tile.add(c * COUPLE_BYTES);
            let (xh, xl) = (x_hi.add(c * 128), x_lo.add(c * 128));
            let sx = _mm256_broadcast_ps(&_mm_loadu_ps(dxr.add(4 * c)));
            let sy = _mm256_broadcast_ps(&_mm_loadu_ps(yr.add(4 * c)));
            let f16s = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(base.add(at) as *const __m128i));
            let scales = [_mm256_mul_ps(f16s(256), sx), _mm256_mul_ps(f16s(272), sx)];
            offsets[0] = _mm256_fmadd_ps(f16s(288), sy, offsets[0]);
            offsets[1] = _mm256_fmadd_ps(f16s(304), sy, offsets[1]);
            for (k, a) in acc.iter_mut().enumerate() {
                let va = load(base.add(k * 64) as *const i8);
                let vb = load(base.add(k * 64 + 32) as *const i8);
                let (w0a, w1a) = (
                    _mm256_and_si256(va, low4),
                    _mm256_and_si256(_mm256_srli_epi16(va, 4), low4),
                );
                let (w0b, w1b) = (
                    _mm256_and_si256(vb, low4),
                    _mm256_and_si256(_mm256_srli_epi16(vb, 4), low4),
                );
                let dot_a = combine(
                    nibbles2(w0a, load(xh), w1a, load(xh.add(64))),
                    nibbles2(w0a, load(xl), w1a, load(xl.add(64))),
                );
                let dot_b = combine(
                    nibbles2(w0b, load(xh.add(32)), w1b, load(xh.add(96))),
                    nibbles2(w0b, load(xl.add(32)), w1b, load(xl.add(96))),
                );
                let sc = scales[k / 2];
                *a = _mm256_fmadd_ps(dot_a, _mm256_permutevar8x32_ps(sc, idx(k, 0)), *a);
                *a = _mm256_fmadd_ps(dot_b, _mm256_permutevar8x32_ps(sc, idx(k, 2)), *a);
            }
        }
        let mut tail_offsets = [0.0f32; 4];
        if tiles.has_tail() {
            // A lone pair: 32 nibble bytes a row (byte j: position j low, j + 32 high),
            // input in pair layout; every lane L holds block L % 2.
            let base = tile.add(tiles.couples() * COUPLE_BYTES);
            let p = tiles.pairs - 1;
            let (xh, xl) = (x_hi.add(p * 64), x_lo.add(p * 64));
            let sx = _mm_castpd_ps(_mm_load_sd(dxr.add(2 * p) as *const f64));
            let sy = _mm_castpd_ps(_mm_load_sd(yr.add(2 * p) as *const f64));
            for (k, a) in acc.iter_mut().enumerate() {
                let v = load(base.add(k * 32) as *const i8);
                let (w0, w1) = (
                    _mm256_and_si256(v, low4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                );
                let dot = combine(
                    nibbles2(w0, load(xh), w1, load(xh.add(32))),
                    nibbles2(w0, load(xl), w1, load(xl.add(32))),
                );
                let scale = _mm_mul_ps(two_f16(base.add(128 + k * 4)), sx);
                *a = _mm256_fmadd_ps(dot, _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(scale))), *a);
                let off = _mm_mul_ps(two_f16(base.add(144 + k * 4)), sy);
                tail_offsets[k] = _mm_cvtss_f32(off) + _mm_cvtss_f32(_mm_movehdup_ps(off));
            }
        }
        let mut off = [0.0f32; 16];
        _mm256_storeu_ps(off.as_mut_ptr(), offsets[0]);
        _mm256_storeu_ps(off.as_mut_ptr().add(8), offsets[1]);
        for (k, a) in acc.iter().enumerate() {
            if r + k < tiles.rows {
                let o = (off[4 * k] + off[4 * k + 1]) + (off[4 * k + 2] + off[4 * k + 3]);
                *out.get().add(i * tiles.rows + r + k) = sum(*a) + o + tail_offsets[k];
            }
        }
    }

    /// A pair's 64 level bytes as two halves, summed in i32: 4-byte lane L holds block
    /// L % 2, so a block has 4 lanes here (8 in 512 bits) and takes y twice.
    #[inline(always)]
    unsafe fn q8_row(row: Q8Row, g0: usize, g: usize, x: &Input) {
        let Input { xq, dx, y } = x;
        let pairs = row.pairs;
        let nb = pairs * 2;
        let sc = row.levels.add(pairs * 64);
        let mut acc = [_mm256_setzero_ps(); ROW_GROUP];
        for t in 0..pairs {
            let wa = load(row.levels.add(t * 64) as *const i8);
            let wb = load(row.levels.add(t * 64 + 32) as *const i8);
            let sw = _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(two_f16(sc.add(4 * t)))));
            for (i, a) in acc.iter_mut().enumerate().take(g) {
                let at = g0 + i;
                let x_hi = xq.as_ptr().add((2 * at * pairs + t) * 64);
                let x_lo = x_hi.add(pairs * 64);
                let hi = _mm256_add_epi32(bytes(wa, load(x_hi)), bytes(wb, load(x_hi.add(32))));
                let lo = _mm256_add_epi32(bytes(wa, load(x_lo)), bytes(wb, load(x_lo.add(32))));
                let sx = pair_at(dx.as_ptr().add(at * nb + 2 * t));
                let sy = pair_at(y.as_ptr().add(at * nb + 2 * t));
                *a = _mm256_fmadd_ps(sw, _mm256_fmadd_ps(combine(hi, lo), sx, _mm256_add_ps(sy, sy)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate().take(g) {
            *row.out_at.add((g0 + i) * row.out_stride) = sum(*a);
        }
    }
}
