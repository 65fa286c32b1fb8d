//! Attention's inner kernels over several query rows at once: scores of R rows against a
//! block's keys and the weighted sum of its values into R rows, each key vector and value
//! row loaded (and widened from the cache's element) once for all R rows. Per row the
//! operations and their order are fixed, whatever R: a row's bits do not depend on the
//! rows it is computed with.

use super::attention::LANES;
use crate::kv_cache::paged_cache::KvElement;

/// Rows (query heads) scored or weighted together: 4 × 4 score accumulators, or 4 × 4
/// value accumulators of 64 columns, fit the 32 vector registers with the loads.
const ROWS: usize = 4;

/// Unscaled scores of `rows` query rows (row r is `q[q_at(r)..][..head_dim]`) against the
/// block's slots lo..hi, into `scores[row_at(r)..][..hi - lo]`, `ROWS` rows at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn score_all_rows<T: KvElement>(
    q: &[f32],
    rows: usize,
    q_at: impl Fn(usize) -> usize,
    keys: &[T],
    bs: usize,
    lo: usize,
    hi: usize,
    scores: &mut [f32],
    row_at: impl Fn(usize) -> usize,
) {
    let mut r = 0;
    while r < rows {
        let take = ROWS.min(rows - r);
        let (qa, ra) = (|k: usize| q_at(r + k), |k: usize| row_at(r + k));
        match take {
            4 => score_rows::<T, 4>(q, [0, 1, 2, 3].map(qa), keys, bs, lo, hi, scores, [0, 1, 2, 3].map(ra)),
            3 => score_rows::<T, 3>(q, [0, 1, 2].map(qa), keys, bs, lo, hi, scores, [0, 1, 2].map(ra)),
            2 => score_rows::<T, 2>(q, [0, 1].map(qa), keys, bs, lo, hi, scores, [0, 1].map(ra)),
            _ => score_rows::<T, 1>(q, [qa(0)], keys, bs, lo, hi, scores, [ra(0)]),
        }
        r += take;
    }
}

/// out[r] += Σ_i w_r[i] · values[i * width + at ..][..head_dim] for `rows` rows (`out` is
/// [rows, head_dim], w_r = `weights[w_at(r)..][..n]`), `ROWS` rows at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn weigh_all_rows<T: KvElement>(
    weights: &[f32],
    rows: usize,
    w_at: impl Fn(usize) -> usize,
    n: usize,
    values: &[T],
    width: usize,
    at: usize,
    out: &mut [f32],
) {
    let hd = out.len() / rows;
    let mut r = 0;
    while r < rows {
        let take = ROWS.min(rows - r);
        let wa = |k: usize| w_at(r + k);
        let o = &mut out[r * hd..(r + take) * hd];
        match take {
            4 => weigh_rows::<T, 4>(weights, [0, 1, 2, 3].map(wa), n, values, width, at, o),
            3 => weigh_rows::<T, 3>(weights, [0, 1, 2].map(wa), n, values, width, at, o),
            2 => weigh_rows::<T, 2>(weights, [0, 1].map(wa), n, values, width, at, o),
            _ => weigh_rows::<T, 1>(weights, [wa(0)], n, values, width, at, o),
        }
        r += take;
    }
}

/// `s` (N elements) widened to float32, exactly; vectorises to a load and a widening.
#[inline(always)]
fn widen<T: KvElement, const N: usize>(s: &[T]) -> [f32; N] {
    match <&[T; N]>::try_from(s) {
        Ok(a) => a.map(T::load),
        Err(_) => [0.0; N],
    }
}

/// Unscaled scores of R query rows (`q[q_at[r]..][..head_dim]`) against the block's slots
/// lo..hi (`keys` is [head_dim, block_size]), into `scores[row_at[r]..][..hi - lo]`. With
/// block_size a multiple of 16, 16 slots at a time: four accumulators per row over the
/// head dimension, so the FMAs do not wait on each other; a key vector is loaded once for
/// all R rows.
#[inline(always)]
// `a` indexes the accumulators and the key rows alike.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn score_rows<T: KvElement, const R: usize>(
    q: &[f32],
    q_at: [usize; R],
    keys: &[T],
    bs: usize,
    lo: usize,
    hi: usize,
    scores: &mut [f32],
    row_at: [usize; R],
) {
    let hd = keys.len() / bs;
    if !bs.is_multiple_of(LANES) {
        for r in 0..R {
            let q = &q[q_at[r]..][..hd];
            for slot in lo..hi {
                let s = q.iter().enumerate().map(|(d, &x)| x * keys[d * bs + slot].load()).sum();
                scores[row_at[r] + slot - lo] = s;
            }
        }
        return;
    }
    let qs: [&[f32]; R] = q_at.map(|at| &q[at..at + hd]);
    let hd4 = hd / 4 * 4;
    // The loads below stay inside `keys` and each `qs[r]`: the hot loop skips their checks.
    assert!(hi <= bs && keys.len() >= hd * bs);
    for chunk in (lo / LANES)..hi.div_ceil(LANES) {
        let base = chunk * LANES;
        let (from, to) = (lo.max(base), hi.min(base + LANES));
        let s = score_16::<T, R>(qs, keys, bs, base, hd4);
        for r in 0..R {
            scores[row_at[r] + from - lo..][..to - from].copy_from_slice(&s[r][from - base..to - base]);
        }
    }
}

/// R query rows' unscaled scores against the 16 keys of slots base..base + 16: four
/// accumulators a row over the head dimension, so the FMAs do not wait on each other; a
/// key vector is loaded once for all R rows. Every index into the accumulators is a
/// constant once unrolled, so they stay in registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn score_16<T: KvElement, const R: usize>(
    qs: [&[f32]; R],
    keys: &[T],
    bs: usize,
    base: usize,
    hd4: usize,
) -> [[f32; LANES]; R] {
    let hd = qs[0].len();
    let mut acc = [[[0.0f32; LANES]; 4]; R];
    for d in (0..hd4).step_by(4) {
        for a in 0..4 {
            let at = (d + a) * bs + base;
            // SAFETY: d + a < head_dim and base + LANES <= bs (the caller's checks), so
            // at + LANES <= head_dim * bs <= keys.len().
            let k: [f32; LANES] = widen(unsafe { keys.get_unchecked(at..at + LANES) });
            for r in 0..R {
                // SAFETY: d + a < head_dim = qs[r].len().
                let x = unsafe { *qs[r].get_unchecked(d + a) };
                for l in 0..LANES {
                    acc[r][a][l] = x.mul_add(k[l], acc[r][a][l]);
                }
            }
        }
    }
    for d in hd4..hd {
        let k: [f32; LANES] = widen(&keys[d * bs + base..][..LANES]);
        for r in 0..R {
            for l in 0..LANES {
                acc[r][0][l] = qs[r][d].mul_add(k[l], acc[r][0][l]);
            }
        }
    }
    // Plain loops: `array::map` here compiled to a call per row.
    let mut s = [[0.0f32; LANES]; R];
    for r in 0..R {
        for l in 0..LANES {
            s[r][l] = (acc[r][0][l] + acc[r][1][l]) + (acc[r][2][l] + acc[r][3][l]);
        }
    }
    s
}

/// out[r] += Σ_i w_r[i] · values[i * width + at ..][..head_dim] for R rows (`out` is [R,
/// head_dim], w_r = `weights[w_at[r]..][..n]`), 64 (then 16) columns in registers at a
/// time: each value vector loaded once for all R rows. Every column sums in position
/// order.
#[inline(always)]
fn weigh_rows<T: KvElement, const R: usize>(
    weights: &[f32],
    w_at: [usize; R],
    n: usize,
    values: &[T],
    width: usize,
    at: usize,
    out: &mut [f32],
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn columns<T: KvElement, const R: usize, const W: usize>(
        weights: &[f32],
        w_at: [usize; R],
        n: usize,
        values: &[T],
        width: usize,
        at: usize,
        out: &mut [f32],
        (hd, c): (usize, usize),
    ) {
        let mut acc = [[0.0f32; W]; R];
        for r in 0..R {
            acc[r].copy_from_slice(&out[r * hd + c..][..W]);
        }
        let ws: [&[f32]; R] = w_at.map(|a| &weights[a..a + n]);
        // The loads below stay inside `values`: the hot loop skips their checks.
        assert!(n == 0 || (n - 1) * width + at + c + W <= values.len());
        for i in 0..n {
            let from = i * width + at + c;
            // SAFETY: i < n, so from + W <= (n - 1) * width + at + c + W <= values.len().
            let v: [f32; W] = widen(unsafe { values.get_unchecked(from..from + W) });
            for r in 0..R {
                // SAFETY: i < n = ws[r].len().
                let w = unsafe { *ws[r].get_unchecked(i) };
                for l in 0..W {
                    acc[r][l] = w.mul_add(v[l], acc[r][l]);
                }
            }
        }
        for r in 0..R {
            out[r * hd + c..][..W].copy_from_slice(&acc[r]);
        }
    }
    let hd = out.len() / R;
    let mut c = 0;
    while c < hd {
        let rest = hd - c;
        if rest >= 64 {
            columns::<T, R, 64>(weights, w_at, n, values, width, at, out, (hd, c));
            c += 64;
        } else if rest >= LANES {
            columns::<T, R, LANES>(weights, w_at, n, values, width, at, out, (hd, c));
            c += LANES;
        } else {
            for r in 0..R {
                for i in 0..n {
                    let w = weights[w_at[r] + i];
                    let v = &values[i * width + at + c..][..rest];
                    for (o, &v) in out[r * hd + c..][..rest].iter_mut().zip(v) {
                        *o = w.mul_add(v.load(), *o);
                    }
                }
            }
            c = hd;
        }
    }
}
