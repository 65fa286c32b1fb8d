//! The LoRA deltas of one projection over a whole forward batch (the CPU's shrink/expand):
//! every row whose sequence names a resident slot gets `x·Aᵀ` (shrink to the rank) then
//! `·(scale·B)ᵀ` (expand) added onto its output columns. Rows of all adapters go through
//! one parallel pass, so 32 decode rows on 4 adapters cost one rayon split per
//! projection, not one call per sequence; nothing is allocated for ranks up to
//! `STACK_RANK`.

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::lora::{LoraAdapter, LoraTarget};
use crate::models::SeqSlice;

/// Ranks up to this keep the shrunk row on the stack.
const STACK_RANK: usize = 64;

/// Multiply-adds below which a projection's LoRA work stays on the calling thread
/// (a rayon split costs a few microseconds).
const PARALLEL_MACS: usize = 1 << 16;

/// Adds the deltas of layer `layer`'s `parts` (each target and the column offset of its
/// part in a fused output) for every sequence of `seqs` that has a LoRA slot. `x` is the
/// projection input ([rows, in]), `out` its output ([rows, out_width]). Returns whether
/// any delta was added. A slot a sequence names but `slots` leaves empty is `:internal`.
pub fn add_batch_deltas(
    slots: &[Option<Arc<LoraAdapter>>],
    seqs: &[SeqSlice],
    layer: usize,
    parts: &[(LoraTarget, usize)],
    x: &[f32],
    out: &mut [f32],
    out_width: usize,
) -> Result<bool> {
    let rows = out.len() / out_width.max(1);
    if rows == 0 {
        return Ok(false);
    }
    let in_width = x.len() / rows;
    // Resolve every slot once and size the work: multiply-adds per row, summed.
    let mut macs = 0usize;
    for seq in seqs {
        let Some(slot) = seq.lora_slot else { continue };
        let adapter = slots
            .get(slot)
            .and_then(Option::as_ref)
            .ok_or_else(|| EngineError::internal(format!("forward batch names empty LoRA slot {slot}")))?;
        let per_row: usize = parts
            .iter()
            .filter_map(|&(t, _)| adapter.pair(layer, t))
            .map(|p| p.rank * (p.in_features + p.out_features))
            .sum();
        macs += per_row * seq.query_len;
    }
    if macs == 0 {
        return Ok(false);
    }
    // Rows are in `seqs` order (query_start ascending): find a row's sequence by search.
    let adapter_of_row = |row: usize| -> Option<&LoraAdapter> {
        let i = seqs.partition_point(|s| s.query_start <= row).checked_sub(1)?;
        let seq = &seqs[i];
        if row >= seq.query_start + seq.query_len {
            return None;
        }
        slots.get(seq.lora_slot?)?.as_deref()
    };
    let row_delta = |row: usize, xr: &[f32], or: &mut [f32]| {
        if let Some(adapter) = adapter_of_row(row) {
            for &(target, offset) in parts {
                if let Some(pair) = adapter.pair(layer, target) {
                    pair.add_row_delta(xr, &mut or[offset..offset + pair.out_features]);
                }
            }
        }
    };
    let threads = rayon::current_num_threads();
    if macs < PARALLEL_MACS || threads < 2 || rows < 2 {
        for (row, (xr, or)) in x
            .chunks_exact(in_width)
            .zip(out.chunks_exact_mut(out_width))
            .enumerate()
        {
            row_delta(row, xr, or);
        }
    } else {
        // About two tasks per thread, none smaller than PARALLEL_MACS / 4.
        let per_row = macs.div_ceil(rows).max(1);
        let min_rows = (PARALLEL_MACS / 4).div_ceil(per_row);
        let chunk = rows.div_ceil(2 * threads).max(min_rows).max(1);
        x.par_chunks(in_width * chunk)
            .zip(out.par_chunks_mut(out_width * chunk))
            .enumerate()
            .for_each(|(c, (xs, os))| {
                for (r, (xr, or)) in xs
                    .chunks_exact(in_width)
                    .zip(os.chunks_exact_mut(out_width))
                    .enumerate()
                {
                    row_delta(c * chunk + r, xr, or);
                }
            });
    }
    Ok(true)
}

impl crate::lora::LoraPair {
    /// `out += (x · Aᵀ) · B_scaledᵀ` for one row: shrink to the rank, then expand as
    /// `rank` contiguous axpys over the packed `b_t` (vectorizes; B's own rows would be
    /// `rank`-long dots).
    pub fn add_row_delta(&self, x: &[f32], out: &mut [f32]) {
        let mut stack = [0.0f32; STACK_RANK];
        let mut heap = Vec::new();
        let mid: &mut [f32] = if self.rank <= STACK_RANK {
            &mut stack[..self.rank]
        } else {
            heap.resize(self.rank, 0.0);
            &mut heap
        };
        for (m, a_row) in mid.iter_mut().zip(self.a.chunks_exact(self.in_features)) {
            *m = dot(x, a_row);
        }
        for (&m, bt_row) in mid.iter().zip(self.b_t.chunks_exact(self.out_features)) {
            for (o, &b) in out.iter_mut().zip(bt_row) {
                *o += m * b;
            }
        }
    }
}

/// A dot product with eight independent partial sums, so the compiler vectorizes it
/// (a plain `.sum()` of products must add in order and stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += xa[i] * xb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraPair;

    /// A pair whose A and B are small integers, so f32 sums are exact.
    fn pair(rank: usize, inf: usize, outf: usize, seed: usize, scale: f32) -> LoraPair {
        let a: Vec<f32> = (0..rank * inf).map(|i| ((i * 7 + seed) % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..outf * rank).map(|i| ((i * 3 + seed) % 7) as f32 - 3.0).collect();
        LoraPair::new(a, b, rank, inf, outf, scale)
    }

    /// out[r, off..] += scale · B (A x) straight from the definition.
    fn reference(p: &LoraPair, b: &[f32], scale: f32, x: &[f32], out: &mut [f32]) {
        let mid: Vec<f32> = (0..p.rank)
            .map(|j| (0..p.in_features).map(|i| p.a[j * p.in_features + i] * x[i]).sum())
            .collect();
        for (o, v) in out.iter_mut().enumerate() {
            *v += scale * (0..p.rank).map(|j| b[o * p.rank + j] * mid[j]).sum::<f32>();
        }
    }

    fn adapter(layers: usize, seed: usize, scale: f32, q: (usize, usize), k: (usize, usize)) -> LoraAdapter {
        let rank = 4;
        LoraAdapter {
            rank,
            scale,
            layers: (0..layers)
                .map(|l| {
                    let mut targets: [Option<LoraPair>; 7] = Default::default();
                    targets[0] = Some(pair(rank, q.0, q.1, seed + l, scale));
                    targets[1] = Some(pair(rank, k.0, k.1, seed + l + 1, scale));
                    targets
                })
                .collect(),
        }
    }

    fn seq(query_start: usize, query_len: usize, lora_slot: Option<usize>) -> SeqSlice {
        SeqSlice {
            query_start,
            query_len,
            lora_slot,
            ..Default::default()
        }
    }

    /// Two adapters and base rows interleaved in one batch (decodes and a prefill chunk),
    /// each row exactly what the definition gives, base rows untouched; serially and in
    /// parallel (the batch repeated until it crosses PARALLEL_MACS).
    #[test]
    fn batch_deltas_match_the_definition_per_row_and_leave_base_rows_alone() {
        let (inf, qout, kout) = (24, 16, 8);
        let width = qout + kout;
        let slots = vec![
            Some(Arc::new(adapter(2, 1, 0.5, (inf, qout), (inf, kout)))),
            None,
            Some(Arc::new(adapter(2, 9, 2.0, (inf, qout), (inf, kout)))),
        ];
        for repeat in [1usize, 200] {
            let mut seqs = Vec::new();
            let mut row = 0;
            for _ in 0..repeat {
                for (len, slot) in [(1, Some(0)), (1, None), (3, Some(2)), (1, Some(0)), (2, None)] {
                    seqs.push(seq(row, len, slot));
                    row += len;
                }
            }
            let rows = row;
            let x: Vec<f32> = (0..rows * inf).map(|i| ((i * 13) % 9) as f32 - 4.0).collect();
            let base: Vec<f32> = (0..rows * width).map(|i| (i % 11) as f32).collect();
            let parts = [(LoraTarget::Q, 0), (LoraTarget::K, qout)];
            let layer = 1;
            let mut out = base.clone();
            assert!(add_batch_deltas(&slots, &seqs, layer, &parts, &x, &mut out, width).unwrap());
            let mut want = base.clone();
            for s in &seqs {
                let Some(slot) = s.lora_slot else { continue };
                let ad = slots[slot].as_ref().unwrap();
                for r in s.query_start..s.query_start + s.query_len {
                    let xr = &x[r * inf..(r + 1) * inf];
                    for &(t, off) in &parts {
                        let p = ad.pair(layer, t).unwrap();
                        let b = raw_b(p, ad.scale);
                        let o = &mut want[r * width + off..r * width + off + p.out_features];
                        reference(p, &b, ad.scale, xr, o);
                    }
                }
            }
            assert_eq!(out, want, "repeat {repeat}");
        }
    }

    /// B back from the packed, scaled transpose (exact: the scales are powers of two).
    fn raw_b(p: &LoraPair, scale: f32) -> Vec<f32> {
        let mut b = vec![0.0; p.out_features * p.rank];
        for j in 0..p.rank {
            for o in 0..p.out_features {
                b[o * p.rank + j] = p.b_t[j * p.out_features + o] / scale;
            }
        }
        b
    }

    #[test]
    fn no_lora_rows_add_nothing_and_an_empty_slot_is_an_internal_error() {
        let slots: Vec<Option<Arc<LoraAdapter>>> = vec![None];
        let x = vec![1.0; 8];
        let mut out = vec![0.0; 8];
        let parts = [(LoraTarget::Q, 0)];
        assert!(!add_batch_deltas(&slots, &[seq(0, 2, None)], 0, &parts, &x, &mut out, 4).unwrap());
        let err = add_batch_deltas(&slots, &[seq(0, 2, Some(0))], 0, &parts, &x, &mut out, 4).unwrap_err();
        assert_eq!(err.category, crate::error::ErrorCategory::Internal);
    }

    #[test]
    fn dot_matches_an_ordered_sum_on_exact_values() {
        for n in [0, 1, 7, 8, 9, 33] {
            let a: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 3) as f32 - 1.0).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), want, "n = {n}");
        }
    }
}
