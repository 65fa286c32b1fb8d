//! bfloat16 × bfloat16 products with AVX512_BF16's `vdpbf16ps` (two multiply-adds per
//! 32-bit lane: twice the f32 FMA's arithmetic per instruction), for `WeightFormat::Bf16`
//! on CPUs that have it.
//!
//! Layout: panels of 32 output columns; within a panel, for every pair of input indices
//! (k, k + 1), two cache lines of 32 bfloat16 each: line 0 holds outputs 0..16, line 1
//! outputs 16..32, each output's two weights side by side (`[w_j(k), w_j(k+1)]` in lane j),
//! which is the operand order `vdpbf16ps` multiplies against a broadcast (x(k), x(k+1)).
//! An odd k's last pair is padded with zeros (weight and input alike).
//!
//! Inputs are rounded to bfloat16 once per call (nearest even, as a bf16 model's matmuls
//! take them) into a per-thread buffer that is reused. A row's bf16 inputs in memory order
//! are exactly its (x(k), x(k+1)) 32-bit pairs.
//!
//! Every output is one chain of `vdpbf16ps` over the k-pairs in order whatever the row
//! count, the row block or the thread: results are bit-identical alone or batched.

use std::cell::Cell;

use super::matmul::{from_bf16, to_bf16, LineBf16, PANEL};

/// Largest row block: 2 × 12 accumulators + 2 weight vectors + 1 broadcast of 32 zmm.
pub(crate) const MAX_ROWS: usize = 12;

/// Index pairs of a depth-k input row (an odd k gets a zero partner).
pub(crate) fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// Packs a row-major [rows, cols] matrix into the k-pair panel layout (2 lines per pair).
pub(crate) fn pack(w: &[f32], rows: usize, cols: usize) -> Vec<LineBf16> {
    use rayon::prelude::*;
    let kp = pairs(cols);
    let panels = rows.div_ceil(PANEL);
    let mut lines = vec![LineBf16([0; 32]); panels * kp * 2];
    lines.par_chunks_mut(kp * 2).enumerate().for_each(|(p, panel)| {
        for j in 0..PANEL.min(rows - p * PANEL) {
            let row = &w[(p * PANEL + j) * cols..(p * PANEL + j + 1) * cols];
            for (k, &v) in row.iter().enumerate() {
                panel[2 * (k / 2) + j / 16].0[2 * (j % 16) + k % 2] = to_bf16(v);
            }
        }
    });
    lines
}

/// W[r][kk] as stored (bfloat16 widened), from a matrix of depth `cols` packed by `pack`.
pub(crate) fn weight(lines: &[LineBf16], cols: usize, r: usize, kk: usize) -> f32 {
    let (p, j) = (r / PANEL, r % PANEL);
    let line = &lines[p * pairs(cols) * 2 + 2 * (kk / 2) + j / 16];
    from_bf16(line.0[2 * (j % 16) + kk % 2])
}

thread_local! {
    /// The calling thread's rounded inputs, kept between calls (taken while in use, so a
    /// nested call on the same thread allocates its own instead of sharing it).
    static INPUT: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `x` ([m, k] float32) rounded to bfloat16, each row padded to an even length:
/// row i's pair q is the u32 at `i * pairs(k) + q`.
pub(crate) fn with_rounded_input<R>(x: &[f32], m: usize, k: usize, f: impl FnOnce(&[u32]) -> R) -> R {
    let kp = pairs(k);
    let mut buf = INPUT.with(Cell::take);
    // Grown, never cleared: every value read below is written first.
    if buf.len() < m * kp * 2 + 1 {
        buf.resize(m * kp * 2 + 1, 0);
    }
    // Start at a 4-byte boundary so the pairs can be read as u32.
    let skip = (buf.as_ptr() as usize / 2) % 2;
    let rows = &mut buf[skip..skip + m * kp * 2];
    super::simd::vectorized(|| {
        for (src, dst) in x[..m * k].chunks_exact(k).zip(rows.chunks_exact_mut(kp * 2)) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = to_bf16(v);
            }
            // An odd k's zero partner.
            dst[k..].fill(0);
        }
    });
    // SAFETY: `rows` starts 4-byte aligned and holds m · kp u32s' worth of u16s.
    let as_pairs = unsafe { std::slice::from_raw_parts(rows.as_ptr() as *const u32, m * kp) };
    let r = f(as_pairs);
    INPUT.with(|c| c.set(buf));
    r
}

/// out[i, 32p ..] for every row i < m and panel p in p0..p1, from rounded input pairs.
///
/// # Safety
/// The CPU has AVX512F and AVX512_BF16; `x` holds m × pairs(k) pairs, `lines` the packed
/// matrix of `rows` outputs, `out` m rows at stride `rows`; tasks write disjoint panels.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn panels(
    lines: &[LineBf16],
    rows: usize,
    k: usize,
    x: &[u32],
    m: usize,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let kp = pairs(k);
    for p in p0..p1 {
        let width = PANEL.min(rows - p * PANEL);
        let panel = lines[p * kp * 2..].as_ptr() as *const u16;
        let mut i = 0;
        while i < m {
            let r = MAX_ROWS.min(m - i);
            x86::block(
                r,
                x[i * kp..].as_ptr(),
                kp,
                panel,
                out.add(i * rows + p * PANEL),
                rows,
                width,
            );
            i += r;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // Register blocks are indexed by row on purpose: the loops unroll into registers.
    #![allow(clippy::needless_range_loop)]
    use std::arch::x86_64::*;

    use super::super::matmul_x86::{by_row_count, prefetch_ahead, store_panel_rows};
    use super::PANEL;

    /// `rows` (1..=12) rows of input pairs times one packed panel.
    ///
    /// # Safety
    /// As `panels`: AVX512_BF16 present, `x` rows × kp pairs at stride kp, `panel` kp × 64
    /// bfloat16 (64-byte aligned), `out` rows at stride `ldo` with `width` writable columns.
    pub(super) unsafe fn block(
        rows: usize,
        x: *const u32,
        kp: usize,
        panel: *const u16,
        out: *mut f32,
        ldo: usize,
        width: usize,
    ) {
        by_row_count!(rows, kernel(x, kp, panel, out, ldo, width))
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize>(
        x: *const u32,
        kp: usize,
        panel: *const u16,
        out: *mut f32,
        ldo: usize,
        width: usize,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let pair_bytes = 2 * PANEL * 2;
        for q in 0..kp {
            if R <= 2 {
                prefetch_ahead(panel as *const i8, q * pair_bytes, pair_bytes);
            }
            let w = panel.add(q * 2 * PANEL);
            let w0: __m512bh = std::mem::transmute(_mm512_load_si512(w as *const _));
            let w1: __m512bh = std::mem::transmute(_mm512_load_si512(w.add(PANEL) as *const _));
            for i in 0..R {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(i * kp + q) as i32));
                lo[i] = _mm512_dpbf16_ps(lo[i], xv, w0);
                hi[i] = _mm512_dpbf16_ps(hi[i], xv, w1);
            }
        }
        store_panel_rows(&lo, &hi, out, ldo, width);
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::tests::isas;
    use super::super::matmul::{detected_isa, from_bf16, to_bf16, Isa, PackedMatrix, WeightFormat};

    /// Values that bfloat16 cannot hold exactly (so rounding the inputs shows).
    fn irregular(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 10_007) as f32 / 5003.0 - 1.0 + 1e-4 * (i % 7) as f32)
            .collect()
    }

    fn round_bf16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
    }

    /// Every output within the f32 summation's own rounding bound (one rounding per
    /// addition: k · 2⁻²⁴ · Σ|x w|) of the f64 product of `x` ([m, cols]) and `w`ᵀ.
    fn assert_within_f32_rounding(out: &[f32], x: &[f32], w: &[f32], m: usize, rows: usize, cols: usize, what: &str) {
        for i in 0..m {
            for r in 0..rows {
                let terms = (0..cols).map(|k| x[i * cols + k] as f64 * w[r * cols + k] as f64);
                let exact: f64 = terms.clone().sum();
                let bound = cols as f64 * f64::powi(2.0, -24) * terms.map(f64::abs).sum::<f64>();
                let got = out[i * rows + r];
                assert!(
                    (got as f64 - exact).abs() <= bound,
                    "{what} m {m} row {i} col {r}: {got} vs {exact} (bound {bound:e})"
                );
            }
        }
    }

    /// The bf16 dot-product kernel (AVX512_BF16) against an f64 product of the
    /// bf16-rounded inputs and weights, within the f32 summation's rounding bound, over odd depths, panels narrower
    /// than 32, every row block size (1..=12) and blocks of 12 plus a remainder; and every
    /// row bit-identical to the same row multiplied alone.
    #[test]
    fn bf16_dot_kernel_matches_an_f64_product_of_the_rounded_operands_and_is_batch_invariant() {
        if detected_isa() != Isa::Avx512Bf16 {
            eprintln!("no AVX512_BF16 on this CPU: the dot-product kernel is not used here");
            return;
        }
        for (rows, cols) in [(5, 3), (31, 7), (32, 64), (77, 129), (200, 576), (40, 1)] {
            let w = irregular(rows * cols, 1);
            let packed = PackedMatrix::pack_with(&w, rows, cols, WeightFormat::Bf16, Isa::Avx512Bf16);
            assert!(packed.is_bf16_pairs());
            let wr = round_bf16(&w);
            let max_m = 27;
            let x = irregular(max_m * cols, 2);
            let xr = round_bf16(&x);
            let alone: Vec<Vec<f32>> = (0..max_m)
                .map(|i| {
                    let mut out = vec![f32::NAN; rows];
                    packed.matmul(&x[i * cols..(i + 1) * cols], 1, &mut out);
                    out
                })
                .collect();
            for m in 1..=max_m {
                let mut out = vec![f32::NAN; m * rows];
                packed.matmul(&x[..m * cols], m, &mut out);
                assert_within_f32_rounding(&out, &xr, &wr, m, rows, cols, &format!("[{rows},{cols}]"));
                for i in 0..m {
                    assert_eq!(
                        out[i * rows..(i + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        alone[i].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "[{rows},{cols}] m {m}: row {i} differs from the same row alone"
                    );
                }
            }
        }
    }

    /// A bf16 matrix packed for a CPU without AVX512_BF16 (the ISA forced) keeps the
    /// widening kernel: float32 inputs against the rounded weights, no input rounding.
    #[test]
    fn bf16_weights_without_the_dot_product_widen_to_f32() {
        let (rows, cols) = (70, 131);
        let w = irregular(rows * cols, 3);
        let wr = round_bf16(&w);
        for isa in isas().into_iter().filter(|&i| i != Isa::Avx512Bf16) {
            let packed = PackedMatrix::pack_with(&w, rows, cols, WeightFormat::Bf16, isa);
            assert!(!packed.is_bf16_pairs(), "{isa:?}");
            for m in [1, 2, 13] {
                let x = irregular(m * cols, 4);
                let mut out = vec![f32::NAN; m * rows];
                packed.matmul(&x, m, &mut out);
                assert_within_f32_rounding(&out, &x, &wr, m, rows, cols, &format!("{isa:?}"));
            }
        }
    }

    /// On a CPU that lists avx512_bf16, detection picks the dot-product kernel.
    #[test]
    fn detection_finds_avx512_bf16_when_the_cpu_lists_it() {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        let listed = flags.split_whitespace().any(|f| f == "avx512_bf16");
        let avx512 = flags.split_whitespace().any(|f| f == "avx512f");
        assert_eq!(detected_isa() == Isa::Avx512Bf16, listed && avx512, "flags: {flags}");
    }
}
