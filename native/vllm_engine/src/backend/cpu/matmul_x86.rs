//! The x86 microkernels of `matmul`: a block of R input rows × one 32-column panel, all
//! accumulators in registers, k walked once. R is a const so the loops unroll fully.
#![cfg(target_arch = "x86_64")]
// Register blocks are indexed by row and lane on purpose: the loops unroll into registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::matmul::PANEL;

/// Dispatches `rows` (1..=12) to its AVX-512 instance.
///
/// # Safety
/// AVX-512F must be present; `x` holds rows × k floats at stride k, `panel` k × 32 floats
/// (64-byte aligned), `out` rows at stride `ldo` with `width` writable columns.
pub unsafe fn block_avx512(
    rows: usize,
    x: *const f32,
    k: usize,
    panel: *const f32,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    macro_rules! go {
        ($($r:literal)*) => {
            match rows {
                $($r => avx512::<$r>(x, k, panel, out, ldo, width),)*
                _ => unreachable!("row block of {rows}"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[target_feature(enable = "avx512f")]
unsafe fn avx512<const R: usize>(x: *const f32, k: usize, panel: *const f32, out: *mut f32, ldo: usize, width: usize) {
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for kk in 0..k {
        let w0 = _mm512_load_ps(panel.add(kk * PANEL));
        let w1 = _mm512_load_ps(panel.add(kk * PANEL + 16));
        for i in 0..R {
            let xv = _mm512_set1_ps(*x.add(i * k + kk));
            lo[i] = _mm512_fmadd_ps(xv, w0, lo[i]);
            hi[i] = _mm512_fmadd_ps(xv, w1, hi[i]);
        }
    }
    let mask = |from: usize| -> __mmask16 {
        let n = width.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for i in 0..R {
        let o = out.add(i * ldo);
        _mm512_mask_storeu_ps(o, m0, lo[i]);
        _mm512_mask_storeu_ps(o.add(16), m1, hi[i]);
    }
}

/// Dispatches `rows` (1..=2) to its AVX2 instance.
///
/// # Safety
/// AVX2 and FMA must be present; the buffers as for `block_avx512`.
pub unsafe fn block_avx2(
    rows: usize,
    x: *const f32,
    k: usize,
    panel: *const f32,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    match rows {
        1 => avx2::<1>(x, k, panel, out, ldo, width),
        2 => avx2::<2>(x, k, panel, out, ldo, width),
        _ => unreachable!("row block of {rows}"),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const R: usize>(x: *const f32, k: usize, panel: *const f32, out: *mut f32, ldo: usize, width: usize) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for kk in 0..k {
        let w = panel.add(kk * PANEL);
        let ws = [
            _mm256_load_ps(w),
            _mm256_load_ps(w.add(8)),
            _mm256_load_ps(w.add(16)),
            _mm256_load_ps(w.add(24)),
        ];
        for i in 0..R {
            let xv = _mm256_set1_ps(*x.add(i * k + kk));
            for j in 0..4 {
                acc[i][j] = _mm256_fmadd_ps(xv, ws[j], acc[i][j]);
            }
        }
    }
    for i in 0..R {
        let mut tmp = [0.0f32; PANEL];
        for j in 0..4 {
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * j), acc[i][j]);
        }
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(i * ldo), width);
    }
}

/// `block_avx512` over bfloat16 weights (widened to float32 in registers).
///
/// # Safety
/// As `block_avx512`; `panel` holds k × 32 bfloat16 values, 64-byte aligned.
pub unsafe fn block_avx512_bf16(
    rows: usize,
    x: *const f32,
    k: usize,
    panel: *const u16,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    macro_rules! go {
        ($($r:literal)*) => {
            match rows {
                $($r => avx512_bf16::<$r>(x, k, panel, out, ldo, width),)*
                _ => unreachable!("row block of {rows}"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn avx512_bf16<const R: usize>(
    x: *const f32,
    k: usize,
    panel: *const u16,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for kk in 0..k {
        let raw = _mm512_load_si512(panel.add(kk * PANEL) as *const _);
        let w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)),
            16,
        ));
        let w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)),
            16,
        ));
        for i in 0..R {
            let xv = _mm512_set1_ps(*x.add(i * k + kk));
            lo[i] = _mm512_fmadd_ps(xv, w0, lo[i]);
            hi[i] = _mm512_fmadd_ps(xv, w1, hi[i]);
        }
    }
    let mask = |from: usize| -> __mmask16 {
        let n = width.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for i in 0..R {
        let o = out.add(i * ldo);
        _mm512_mask_storeu_ps(o, m0, lo[i]);
        _mm512_mask_storeu_ps(o.add(16), m1, hi[i]);
    }
}

/// `block_avx2` over bfloat16 weights.
///
/// # Safety
/// As `block_avx2`; `panel` holds k × 32 bfloat16 values.
pub unsafe fn block_avx2_bf16(
    rows: usize,
    x: *const f32,
    k: usize,
    panel: *const u16,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    match rows {
        1 => avx2_bf16::<1>(x, k, panel, out, ldo, width),
        2 => avx2_bf16::<2>(x, k, panel, out, ldo, width),
        _ => unreachable!("row block of {rows}"),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_bf16<const R: usize>(
    x: *const f32,
    k: usize,
    panel: *const u16,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for kk in 0..k {
        let w = panel.add(kk * PANEL);
        let widen = |j: usize| {
            let h = _mm_loadu_si128(w.add(8 * j) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        };
        let ws = [widen(0), widen(1), widen(2), widen(3)];
        for i in 0..R {
            let xv = _mm256_set1_ps(*x.add(i * k + kk));
            for j in 0..4 {
                acc[i][j] = _mm256_fmadd_ps(xv, ws[j], acc[i][j]);
            }
        }
    }
    for i in 0..R {
        let mut tmp = [0.0f32; PANEL];
        for j in 0..4 {
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * j), acc[i][j]);
        }
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(i * ldo), width);
    }
}
