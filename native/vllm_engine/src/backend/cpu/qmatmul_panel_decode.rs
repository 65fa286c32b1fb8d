//! Decoding Q4_0 / Q4_1 / Q8_0 weight rows straight into a float32 panel with AVX-512
//! gathers: the many-rows path of qmatmul.rs (prompts, decode steps of many sequences).
//! The panel wants depth-major order (value kk of row j at kk·32 + j), so decoding row by
//! row and scattering cost ~6 cycles a value: a prompt step of a Q4_1 model spent as long
//! decoding as multiplying. Here one gather takes the same 4 bytes of a block from 16
//! rows, so every level pulled out of it is already a 16-row column: shift, mask, convert,
//! scale, store. The values are those of `decode_row` bit for bit (the same multiply, then
//! add).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;

use super::matmul::PANEL;

/// Whether `decode` runs on this CPU.
pub(super) fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| has!("avx512f") && has!("avx512bw") && has!("f16c"))
}

/// Decodes weight rows 0..width (width ≤ PANEL, each `row_bytes` long from `rows`) into
/// `panel` ([cols, PANEL], depth-major). Columns width..PANEL repeat the last row.
/// `next` (the following panel's rows, or empty) is prefetched on the way: the gathers
/// read 16 rows at once, a pattern the hardware prefetchers do not follow, and a model's
/// weights come from memory, not the caches (`rows_matmul_speed`).
///
/// # Safety
/// `available()`; `rows` holds width·row_bytes bytes of `dtype` blocks for `cols` values
/// (cols a multiple of 32); `panel` holds cols·PANEL floats.
pub(super) unsafe fn decode(
    dtype: GgmlDType,
    rows: &[u8],
    row_bytes: usize,
    width: usize,
    cols: usize,
    panel: &mut [f32],
    next: &[u8],
) {
    debug_assert!((1..=PANEL).contains(&width) && rows.len() >= width * row_bytes && panel.len() >= cols * PANEL);
    match dtype {
        GgmlDType::Q4_0 => decode_avx512::<Q4_0>(rows, row_bytes, width, cols, panel, next),
        GgmlDType::Q4_1 => decode_avx512::<Q4_1>(rows, row_bytes, width, cols, panel, next),
        GgmlDType::Q8_0 => decode_avx512::<Q8_0>(rows, row_bytes, width, cols, panel, next),
        _ => unreachable!("only the row-decoder types"),
    }
}

/// One GGML block type: where its scale, offset and levels sit, and how a gathered dword of
/// levels gives values.
trait Block {
    const BYTES: usize;
    /// Byte offset of the first level byte.
    const LEVELS_AT: usize;
    /// (scale, offset) of 16 rows' blocks from the dword gathered at the block's start.
    unsafe fn scales(head: __m512i) -> (__m512, __m512);
    /// For level dword `q` (bytes LEVELS_AT + 4q..), calls `put(kk, levels)` for the
    /// levels it holds as i32 (before scale and offset).
    unsafe fn levels(q: usize, g: __m512i, put: impl FnMut(usize, __m512i));
}

#[inline(always)]
unsafe fn f16_low(v: __m512i) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
}

struct Q4_0;
struct Q4_1;
struct Q8_0;

/// The low and high nibbles of the 4 bytes of `g` (bytes 4q..4q + 4 of a 4-bit block's
/// levels): values 4q + t and 16 + 4q + t.
#[inline(always)]
unsafe fn nibbles(q: usize, g: __m512i, bias: i32, mut put: impl FnMut(usize, __m512i)) {
    let (mask, bias) = (_mm512_set1_epi32(0x0F), _mm512_set1_epi32(bias));
    for t in 0..4 {
        let shifted = _mm512_srlv_epi32(g, _mm512_set1_epi32(8 * t as i32));
        put(4 * q + t, _mm512_sub_epi32(_mm512_and_si512(shifted, mask), bias));
        put(
            16 + 4 * q + t,
            _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(shifted, 4), mask), bias),
        );
    }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const LEVELS_AT: usize = 2;
    #[inline(always)]
    unsafe fn scales(head: __m512i) -> (__m512, __m512) {
        (f16_low(head), _mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn levels(q: usize, g: __m512i, put: impl FnMut(usize, __m512i)) {
        nibbles(q, g, 8, put)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const LEVELS_AT: usize = 4;
    #[inline(always)]
    unsafe fn scales(head: __m512i) -> (__m512, __m512) {
        (f16_low(head), f16_low(_mm512_srli_epi32(head, 16)))
    }
    #[inline(always)]
    unsafe fn levels(q: usize, g: __m512i, put: impl FnMut(usize, __m512i)) {
        nibbles(q, g, 0, put)
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const LEVELS_AT: usize = 2;
    #[inline(always)]
    unsafe fn scales(head: __m512i) -> (__m512, __m512) {
        (f16_low(head), _mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn levels(q: usize, g: __m512i, mut put: impl FnMut(usize, __m512i)) {
        for t in 0..4 {
            // Byte t to the top, then an arithmetic shift back: the signed level.
            let top = _mm512_sllv_epi32(g, _mm512_set1_epi32(24 - 8 * t as i32));
            put(4 * q + t, _mm512_srai_epi32(top, 24));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn decode_avx512<B: Block>(
    rows: &[u8],
    row_bytes: usize,
    width: usize,
    cols: usize,
    panel: &mut [f32],
    next: &[u8],
) {
    let base = rows.as_ptr();
    let out = panel.as_mut_ptr();
    // `next`'s cache lines, spread evenly over the block steps of both halves.
    let steps = (PANEL / 16) * (cols / 32);
    let lines_per_step = next.len().div_ceil(64).div_ceil(steps);
    let mut line = 0;
    for half in 0..PANEL / 16 {
        // Byte offsets of the 16 rows of this half (past `width`: the last row again).
        let mut at = [0i32; 16];
        for (l, a) in at.iter_mut().enumerate() {
            *a = ((16 * half + l).min(width - 1) * row_bytes) as i32;
        }
        let at = _mm512_loadu_si512(at.as_ptr() as *const _);
        for b in 0..cols / 32 {
            for _ in 0..lines_per_step {
                if line * 64 < next.len() {
                    _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().add(line * 64) as *const i8);
                }
                line += 1;
            }
            let block = base.add(b * B::BYTES);
            let (d, m) = B::scales(_mm512_i32gather_epi32::<1>(at, block as *const _));
            for q in 0..(B::BYTES - B::LEVELS_AT) / 4 {
                let g = _mm512_i32gather_epi32::<1>(at, block.add(B::LEVELS_AT + 4 * q) as *const _);
                B::levels(q, g, |kk, levels| {
                    let v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(levels), d), m);
                    _mm512_storeu_ps(out.add((32 * b + kk) * PANEL + 16 * half), v);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::qmatmul::decode_row;

    /// Random bytes for every field of every block: any f16 scale (finite ones only, so
    /// the comparison by bits is meaningful), any levels.
    fn blocks(dtype: GgmlDType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.max(1);
        let mut byte = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as u8
        };
        let size = dtype.type_size();
        let scale_bytes = if dtype == GgmlDType::Q4_1 { 4 } else { 2 };
        let mut out = vec![0u8; rows * cols / 32 * size];
        for block in out.chunks_exact_mut(size) {
            for (i, b) in block.iter_mut().enumerate() {
                // f16 scales within ±(2^-6 .. 2^2): a high byte of 0x20..0x43, either sign.
                *b = if i < scale_bytes && i % 2 == 1 {
                    (0x20 + byte() % 0x24) | (byte() & 0x80)
                } else {
                    byte()
                };
            }
        }
        out
    }

    #[test]
    fn gathered_panels_equal_decoded_rows_bit_for_bit() {
        if !available() {
            return;
        }
        let cols = 96;
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let row_bytes = cols / 32 * dtype.type_size();
            for width in [1, 7, 16, 17, 32] {
                let data = blocks(dtype, width, cols, 77 + width as u32);
                let mut panel = vec![f32::NAN; cols * PANEL];
                // SAFETY: available(); sizes as documented.
                unsafe { decode(dtype, &data, row_bytes, width, cols, &mut panel, &[]) };
                let mut row = vec![0.0f32; cols];
                for j in 0..PANEL {
                    let source = j.min(width - 1);
                    decode_row(dtype, &data[source * row_bytes..(source + 1) * row_bytes], &mut row);
                    for kk in 0..cols {
                        assert_eq!(
                            panel[kk * PANEL + j].to_bits(),
                            row[kk].to_bits(),
                            "{dtype:?} width {width} row {j} value {kk}"
                        );
                    }
                }
            }
        }
    }
}
