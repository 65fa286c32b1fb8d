//! AVX2+FMA version of the decode-path kernel of qmatmul.rs: a weight row's blocks are
//! unpacked to integer levels in registers and dotted with up to 8 f32 input rows.
//! Same arithmetic as the portable kernel: d * sum(level * x) + min * sum(x) per block.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::qmatmul::DOT_PATH_MAX_ROWS;

/// For each weight row in `bytes` ([rows, row_bytes] of Q4_0 / Q4_1 / Q8_0 blocks), its dot
/// with each of the m = x.len() / cols input rows into out ([rows, m]). `x_sums` holds the
/// sum of every 32-value block of x.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(
    dtype: GgmlDType,
    bytes: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    x_sums: &[f32],
    out: &mut [f32],
) {
    let m = x.len() / cols;
    let blocks = cols / 32;
    let block_bytes = dtype.type_size();
    let mut acc = [_mm256_setzero_ps(); DOT_PATH_MAX_ROWS];
    let mut min_acc = [0.0f32; DOT_PATH_MAX_ROWS];
    for (row, out_row) in bytes.chunks_exact(row_bytes).zip(out.chunks_mut(m)) {
        acc[..m].iter_mut().for_each(|a| *a = _mm256_setzero_ps());
        min_acc[..m].iter_mut().for_each(|a| *a = 0.0);
        for b in 0..blocks {
            let block = &row[b * block_bytes..(b + 1) * block_bytes];
            let (levels, d, min) = unpack(dtype, block);
            let dv = _mm256_set1_ps(d);
            for r in 0..m {
                let xp = x.as_ptr().add(r * cols + b * 32);
                let mut s = _mm256_mul_ps(levels[0], _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(levels[1], _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(levels[2], _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(levels[3], _mm256_loadu_ps(xp.add(24)), s);
                acc[r] = _mm256_fmadd_ps(dv, s, acc[r]);
                min_acc[r] += min * x_sums[r * blocks + b];
            }
        }
        for r in 0..m {
            out_row[r] = hsum(acc[r]) + min_acc[r];
        }
    }
}

/// The block's 32 integer levels as four 8-lane vectors (values 0..8, 8..16, 16..24,
/// 24..32), its scale and its min.
#[inline(always)]
unsafe fn unpack(dtype: GgmlDType, block: &[u8]) -> ([__m256; 4], f32, f32) {
    let half = |at: usize| {
        let bits = u16::from_le_bytes([block[at], block[at + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    };
    let to_f32 = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    let to_f32_signed = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    match dtype {
        GgmlDType::Q8_0 => {
            let lo = _mm_loadu_si128(block.as_ptr().add(2) as *const __m128i);
            let hi = _mm_loadu_si128(block.as_ptr().add(18) as *const __m128i);
            let levels = [
                to_f32_signed(lo),
                to_f32_signed(_mm_srli_si128(lo, 8)),
                to_f32_signed(hi),
                to_f32_signed(_mm_srli_si128(hi, 8)),
            ];
            (levels, half(0), 0.0)
        }
        _ => {
            // Q4_0 and Q4_1: 16 bytes, low nibbles are values 0..16, high nibbles 16..32.
            let q4_1 = dtype == GgmlDType::Q4_1;
            let qs = _mm_loadu_si128(block.as_ptr().add(if q4_1 { 4 } else { 2 }) as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let mut levels = [
                to_f32(lo),
                to_f32(_mm_srli_si128(lo, 8)),
                to_f32(hi),
                to_f32(_mm_srli_si128(hi, 8)),
            ];
            if q4_1 {
                (levels, half(0), half(2))
            } else {
                let eight = _mm256_set1_ps(8.0);
                levels.iter_mut().for_each(|l| *l = _mm256_sub_ps(*l, eight));
                (levels, half(0), 0.0)
            }
        }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
