//! The input side of the int8 matmuls (qmatmul_int8.rs): each 32-value block of an input
//! row becomes two int8 parts with one scale, x ≈ d·(hi + lo/254), plus the block's Σx.
//! Written in vector intrinsics: the plain loop compiled to scalar code (a chain through
//! the block's maximum and sum, one `rintf` call per value) and took ~17 µs for a row of
//! 1,536 values, longer than the product it feeds.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::int8_dot::DotIsa;

/// One block's int8 parts, scale and sum.
pub(super) struct QuantBlock {
    pub hi: [i8; 32],
    pub lo: [i8; 32],
    pub d: f32,
    /// Σx, summed as a tree of halves (the same order in both vector widths).
    pub sum: f32,
}

/// Calls `f(b, block b)` for each 32-value block of `x` (x.len() a multiple of 32), in
/// order.
///
/// # Safety
/// The CPU has `isa`'s features.
#[inline]
pub(super) unsafe fn quantize_blocks(isa: DotIsa, x: &[f32], f: impl FnMut(usize, QuantBlock)) {
    match isa {
        DotIsa::Avx2 => blocks_avx2(x, f),
        DotIsa::Vnni | DotIsa::Avx512Bw => blocks_avx512(x, f),
    }
}

// One loop per width, so consecutive blocks' chains (maximum, division, rounding) overlap.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn blocks_avx512(x: &[f32], mut f: impl FnMut(usize, QuantBlock)) {
    for (b, xb) in x.chunks_exact(32).enumerate() {
        f(b, of_avx512(xb.as_ptr()));
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn blocks_avx2(x: &[f32], mut f: impl FnMut(usize, QuantBlock)) {
    for (b, xb) in x.chunks_exact(32).enumerate() {
        f(b, of_avx2(xb.as_ptr()));
    }
}

impl QuantBlock {
    fn empty(d: f32, sum: f32) -> QuantBlock {
        QuantBlock {
            hi: [0; 32],
            lo: [0; 32],
            d,
            sum,
        }
    }
}

/// 1/d, or 0 for an all-zero block.
#[inline(always)]
fn scale_of(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

#[inline(always)]
unsafe fn of_avx512(x: *const f32) -> QuantBlock {
    let halves = [_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16))];
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(halves[0]), _mm512_abs_ps(halves[1])));
    let s = _mm512_add_ps(halves[0], halves[1]);
    let s = _mm256_add_ps(
        _mm512_castps512_ps256(s),
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)),
    );
    let (d, inv) = scale_of(amax);
    let mut q = QuantBlock::empty(d, sum8(s));
    let (inv, steps) = (_mm512_set1_ps(inv), _mm512_set1_ps(254.0));
    let (least, most) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let clamp = |v: __m512| _mm512_min_ps(_mm512_max_ps(v, least), most);
    for (h, v) in halves.into_iter().enumerate() {
        let scaled = _mm512_mul_ps(v, inv);
        let r = _mm512_roundscale_ps::<NEAREST>(scaled);
        // The residual is within ±1/2 step: 254 steps of 1/254 cover it.
        let rest = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(_mm512_sub_ps(scaled, r), steps));
        let bytes = |v: __m512| _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(clamp(v)));
        _mm_storeu_si128(q.hi.as_mut_ptr().add(16 * h) as *mut __m128i, bytes(r));
        _mm_storeu_si128(q.lo.as_mut_ptr().add(16 * h) as *mut __m128i, bytes(rest));
    }
    q
}

#[inline(always)]
unsafe fn of_avx2(p: *const f32) -> QuantBlock {
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
    let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[2])), _mm256_max_ps(abs(v[1]), abs(v[3])));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    // Lanes i and i + 8 of the 16-lane tree of of_avx512.
    let s = _mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3]));
    let (d, inv) = scale_of(amax);
    let mut q = QuantBlock::empty(d, sum8(s));
    let (inv, steps) = (_mm256_set1_ps(inv), _mm256_set1_ps(254.0));
    let (least, most) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let ints = |v: __m256| _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, least), most));
    let (mut hi, mut lo) = ([_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4]);
    for k in 0..4 {
        let scaled = _mm256_mul_ps(v[k], inv);
        let r = _mm256_round_ps::<NEAREST>(scaled);
        hi[k] = ints(r);
        lo[k] = ints(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(
            _mm256_sub_ps(scaled, r),
            steps,
        )));
    }
    _mm256_storeu_si256(q.hi.as_mut_ptr() as *mut __m256i, to_bytes(hi));
    _mm256_storeu_si256(q.lo.as_mut_ptr() as *mut __m256i, to_bytes(lo));
    q
}

/// 32 i32 values within ±127 (four vectors of 8, in order) as 32 bytes in order.
#[inline(always)]
unsafe fn to_bytes(v: [__m256i; 4]) -> __m256i {
    // The packs work within 128-bit lanes: 4-byte groups come out as v0a v1a v2a v3a |
    // v0b v1b v2b v3b (a, b: each vector's first and second four values).
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// The sum of 8 lanes as a tree of halves.
#[inline(always)]
unsafe fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition: round half to even, parts clamped to ±127.
    fn reference(x: &[f32; 32]) -> ([i8; 32], [i8; 32], f32) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let (d, inv) = scale_of(amax);
        let (mut hi, mut lo) = ([0i8; 32], [0i8; 32]);
        for i in 0..32 {
            let scaled = x[i] * inv;
            let r = scaled.round_ties_even();
            hi[i] = r.clamp(-127.0, 127.0) as i8;
            lo[i] = ((scaled - r) * 254.0).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        (hi, lo, d)
    }

    #[test]
    fn every_form_matches_the_definition_and_each_other() {
        let mut s = 12345u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        };
        for case in 0..200 {
            let mut x = [0.0f32; 32];
            for v in x.iter_mut() {
                *v = next() * [1e-3, 1.0, 40.0][case % 3];
            }
            if case == 7 {
                x = [0.0; 32];
            }
            // Values on a half step of the grid (ties).
            if case == 8 {
                for (i, v) in x.iter_mut().enumerate() {
                    *v = (i as f32 - 15.5) * 4.0;
                }
            }
            let (hi, lo, d) = reference(&x);
            let want_sum: f32 = {
                let mut lanes = [0.0f32; 16];
                for i in 0..16 {
                    lanes[i] = x[i] + x[16 + i];
                }
                super::super::simd::hsum16(lanes)
            };
            for isa in DotIsa::runnable() {
                let mut got = None;
                // SAFETY: runnable() checked the features.
                unsafe { quantize_blocks(isa, &x, |_, q| got = Some(q)) };
                let q = got.unwrap();
                assert_eq!((q.hi, q.lo, q.d), (hi, lo, d), "{isa:?}, case {case}");
                assert_eq!(q.sum.to_bits(), want_sum.to_bits(), "{isa:?}, case {case}");
            }
        }
    }
}
