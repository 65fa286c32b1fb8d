//! The x86 microkernels of `matmul`: a block of R input rows × one 32-column panel, all
//! accumulators in registers, k walked once. R is a const so the loops unroll fully.
//! Each kernel exists for float32 and bfloat16 panels; the two differ only in how a
//! depth's 32 weights reach the registers, so one macro body serves both.
#![cfg(target_arch = "x86_64")]
// Register blocks are indexed by row and lane on purpose: the loops unroll into registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::matmul::PANEL;

/// How far ahead of its loads a few-row kernel asks for weights: one or two rows stream
/// weights from memory faster than the hardware prefetcher alone brings them.
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the `len` bytes (one or two cache lines) `PREFETCH_BYTES` past `at`. Past the
/// end of a panel this is the next panel (contiguous), past the matrix a harmless no-op.
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead(base: *const i8, at: usize, len: usize) {
    let p = base.wrapping_add(at + PREFETCH_BYTES);
    _mm_prefetch::<_MM_HINT_T0>(p);
    if len > 64 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
    }
}

/// `kernel::<R>(args)` for a run-time row count R in 1..=12: the AVX-512 kernels' const
/// row blocks.
macro_rules! by_row_count {
    ($rows:expr, $kernel:ident($($arg:expr),*)) => {
        match $rows {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            12 => $kernel::<12>($($arg),*),
            rows => unreachable!("row block of {rows}"),
        }
    };
}
pub(crate) use by_row_count;

/// Stores R rows of a panel's accumulators (columns 0..16 in `lo`, 16..32 in `hi`) at
/// stride `ldo`, the columns from `width` on masked off.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn store_panel_rows<const R: usize>(
    lo: &[__m512; R],
    hi: &[__m512; R],
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
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

/// An AVX-512 kernel over panels of `$elem` (up to 12 rows), and its dispatcher `$dispatch`.
/// `|$panel, $kk| $load` yields the two 16-lane float vectors of depth `$kk`.
macro_rules! avx512_kernel {
    ($(#[$doc:meta])* $dispatch:ident, $kernel:ident, $elem:ty, $features:literal,
     |$panel:ident, $kk:ident| $load:block) => {
        $(#[$doc])*
        pub unsafe fn $dispatch(
            rows: usize,
            x: *const f32,
            k: usize,
            panel: *const $elem,
            out: *mut f32,
            ldo: usize,
            width: usize,
        ) {
            by_row_count!(rows, $kernel(x, k, panel, out, ldo, width))
        }

        #[target_feature(enable = $features)]
        unsafe fn $kernel<const R: usize>(
            x: *const f32,
            k: usize,
            panel: *const $elem,
            out: *mut f32,
            ldo: usize,
            width: usize,
        ) {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            let depth_bytes = PANEL * std::mem::size_of::<$elem>();
            for kk in 0..k {
                if R <= 2 {
                    prefetch_ahead(panel as *const i8, kk * depth_bytes, depth_bytes);
                }
                let (w0, w1) = {
                    let ($panel, $kk) = (panel, kk);
                    $load
                };
                for i in 0..R {
                    let xv = _mm512_set1_ps(*x.add(i * k + kk));
                    lo[i] = _mm512_fmadd_ps(xv, w0, lo[i]);
                    hi[i] = _mm512_fmadd_ps(xv, w1, hi[i]);
                }
            }
            store_panel_rows(&lo, &hi, out, ldo, width);
        }
    };
}

/// An AVX2 kernel over panels of `$elem` (1 or 2 rows), and its dispatcher `$dispatch`.
/// `|$panel, $kk| $load` yields the four 8-lane float vectors of depth `$kk`.
macro_rules! avx2_kernel {
    ($(#[$doc:meta])* $dispatch:ident, $kernel:ident, $elem:ty,
     |$panel:ident, $kk:ident| $load:block) => {
        $(#[$doc])*
        pub unsafe fn $dispatch(
            rows: usize,
            x: *const f32,
            k: usize,
            panel: *const $elem,
            out: *mut f32,
            ldo: usize,
            width: usize,
        ) {
            match rows {
                1 => $kernel::<1>(x, k, panel, out, ldo, width),
                2 => $kernel::<2>(x, k, panel, out, ldo, width),
                _ => unreachable!("row block of {rows}"),
            }
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn $kernel<const R: usize>(
            x: *const f32,
            k: usize,
            panel: *const $elem,
            out: *mut f32,
            ldo: usize,
            width: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            for kk in 0..k {
                let ws: [__m256; 4] = {
                    let ($panel, $kk) = (panel, kk);
                    $load
                };
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
    };
}

avx512_kernel!(
    /// `rows` (1..=12) input rows times one float32 panel.
    ///
    /// # Safety
    /// AVX-512F must be present; `x` holds rows × k floats at stride k, `panel` k × 32
    /// floats (64-byte aligned), `out` rows at stride `ldo` with `width` writable columns.
    block_avx512, avx512, f32, "avx512f",
    |panel, kk| {
        (_mm512_load_ps(panel.add(kk * PANEL)), _mm512_load_ps(panel.add(kk * PANEL + 16)))
    }
);

avx512_kernel!(
    /// `block_avx512` over bfloat16 weights (widened to float32 in registers).
    ///
    /// # Safety
    /// As `block_avx512`; `panel` holds k × 32 bfloat16 values, 64-byte aligned.
    block_avx512_bf16, avx512_bf16, u16, "avx512f,avx512bw",
    |panel, kk| {
        let raw = _mm512_load_si512(panel.add(kk * PANEL) as *const _);
        let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw));
        let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1));
        (
            _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)),
            _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)),
        )
    }
);

avx2_kernel!(
    /// `rows` (1..=2) input rows times one float32 panel.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; the buffers as for `block_avx512`.
    block_avx2, avx2, f32,
    |panel, kk| {
        let w = panel.add(kk * PANEL);
        [_mm256_load_ps(w), _mm256_load_ps(w.add(8)), _mm256_load_ps(w.add(16)), _mm256_load_ps(w.add(24))]
    }
);

avx2_kernel!(
    /// `block_avx2` over bfloat16 weights.
    ///
    /// # Safety
    /// As `block_avx2`; `panel` holds k × 32 bfloat16 values.
    block_avx2_bf16, avx2_bf16, u16,
    |panel, kk| {
        let w = panel.add(kk * PANEL);
        let widen = |j: usize| {
            let h = _mm_loadu_si128(w.add(8 * j) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        };
        [widen(0), widen(1), widen(2), widen(3)]
    }
);
