//! Matmuls over GGML-quantized weights kept in their blocks. Weights are decoded to f32 on
//! the fly (activations stay f32, unlike ggml's q8 activation path), so results match the
//! dequantized model up to summation order while memory holds only the blocks.
//!
//! Few rows (decode): each weight row is decoded block by block and dotted with every input
//! row. Many rows (prefill): tiles of weight rows are decoded and handed to gemm.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::int8_dot::DotIsa;
use super::matmul::{for_panel_ranges, PanelBuffer, PANEL};
use crate::error::{EngineError, Result};

/// The output of a matmul shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not a field access) so closures capture the whole Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A thread's float32 panel and decoded-row scratch for `forward_panels`.
type PanelScratch = (PanelBuffer, Vec<f32>);

thread_local! {
    static PANEL_SCRATCH: std::cell::RefCell<PanelScratch> =
        std::cell::RefCell::new((PanelBuffer::new(0), Vec::new()));
}

/// Up to this many input rows use the fused decode-and-dot path.
pub(crate) const DOT_PATH_MAX_ROWS: usize = 8;
/// From this many input rows on, weights are decoded into float32 panels where the CPU
/// lacks the gathers of qmatmul_panel_decode.rs (decoding row by row costs ~7x more).
const PANEL_PATH_MIN_ROWS: usize = 64;
/// Weight rows decoded at once on the gemm path.
const TILE_ROWS: usize = 512;
/// Weight rows per rayon task on the dot path.
const DOT_CHUNK_ROWS: usize = 64;
/// Smaller matrices run on the calling thread (a rayon fork costs more than the work).
const SERIAL_MAX_ELEMS: usize = 1 << 16;

/// A [rows, cols] matrix of GGML blocks: repacked for the int8 kernel where the CPU has one
/// and the type allows, else kept as GGML stores it and decoded to f32.
pub struct QuantMatrix {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    #[cfg(target_arch = "x86_64")]
    int8: Option<super::qmatmul_int8::Int8Matrix>,
}

impl QuantMatrix {
    pub fn new(q: Arc<QTensor>) -> Result<Self> {
        Self::with_kernel(q, true)
    }

    /// `int8`: use the int8 kernel when the CPU has one and it applies (the f32-decoding
    /// kernel otherwise).
    pub fn with_kernel(q: Arc<QTensor>, int8: bool) -> Result<Self> {
        #[cfg(target_arch = "x86_64")]
        return Self::with_isa(q, if int8 { DotIsa::detected() } else { None });
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = int8;
            Self::checked(q)
        }
    }

    /// The int8 kernel compiled for `isa` (one this CPU has), or none.
    #[cfg(target_arch = "x86_64")]
    pub fn with_isa(q: Arc<QTensor>, isa: Option<DotIsa>) -> Result<Self> {
        let mut matrix = Self::checked(q)?;
        if let Some(isa) = isa {
            let q = &matrix.q;
            matrix.int8 = super::qmatmul_int8::Int8Matrix::pack(isa, q.dtype(), &q.data()?, matrix.rows, matrix.cols);
        }
        Ok(matrix)
    }

    /// The blocks as they are, after checking that rows hold whole blocks.
    fn checked(q: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let block = q.dtype().block_size();
        if rows == 0 || !cols.is_multiple_of(block) {
            return Err(EngineError::validation(format!(
                "quantized matrix [{rows}, {cols}] does not split into rows of whole {:?} blocks",
                q.dtype()
            )));
        }
        let row_bytes = cols / block * q.dtype().type_size();
        Ok(QuantMatrix {
            q,
            rows,
            cols,
            row_bytes,
            #[cfg(target_arch = "x86_64")]
            int8: None,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = &self.int8 {
            return v.bytes();
        }
        self.q.storage_size_in_bytes()
    }

    /// x: [m, cols] row-major. Returns x W^T as [m, rows].
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; m * self.rows];
        self.forward_into(x, m, &mut out)?;
        Ok(out)
    }

    /// `forward` into `out` ([m, rows]); the int8 and panel paths allocate nothing.
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if out.len() != m * self.rows || x.len() != m * self.cols {
            return Err(EngineError::internal(format!(
                "quantized matmul: input of {} and output of {} values for [{m}, {}] x [{}, {}]^T",
                x.len(),
                out.len(),
                self.cols,
                self.rows,
                self.cols
            )));
        }
        if m >= self.panel_path_min_rows() && has_row_decoder(self.q.dtype()) {
            self.forward_panels(&self.q.data()?, x, m, out);
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = &self.int8 {
            v.forward(x, m, out);
            return Ok(());
        }
        let data = self.q.data()?;
        let y = if m <= DOT_PATH_MAX_ROWS && has_row_decoder(self.q.dtype()) {
            self.forward_dot(&data, x, m)
        } else {
            self.forward_tiles(&data, x, m)?
        };
        out.copy_from_slice(&y);
        Ok(())
    }

    /// Input rows from which the float32 panels (decoded once for all rows) beat the
    /// kernels whose work grows with every row: prompts, and decode steps of many
    /// sequences. `rows_matmul_speed` with AVX-512 gathers, weights streamed from memory:
    /// on a 2-core Zen 4 (VNNI) the panels overtake the int8 kernel between 12 and 16
    /// rows for gate_up (32 rows: 0.66 against 0.88 ms) and tie for down; on a 2-core
    /// Skylake-SP (AVX-512BW, about twice the int8 work a row) they overtook between 8
    /// and 12 rows with hot weights. A row's result then depends on how many rows share
    /// its step (int8 input rounding below, float32 at or above).
    fn panel_path_min_rows(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if super::qmatmul_panel_decode::available() {
            return match self.int8.as_ref().map(|v| v.isa()) {
                Some(DotIsa::Vnni) => 16,
                _ => 12,
            };
        }
        PANEL_PATH_MIN_ROWS
    }

    fn forward_dot(&self, data: &[u8], x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols, row_bytes) = (self.rows, self.cols, self.row_bytes);
        let dtype = self.q.dtype();
        let simd = has_avx2_fma_f16c();
        let x_sums: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let run = |first: usize, out: &mut [f32]| {
            let bytes = &data[first * row_bytes..(first + out.len() / m) * row_bytes];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2, FMA and F16C were detected at run time.
                unsafe { super::qmatmul_avx2::dot_rows(dtype, bytes, row_bytes, x, cols, &x_sums, out) };
                return;
            }
            dot_rows(dtype, bytes, row_bytes, x, cols, &x_sums, out);
        };
        // Transposed result [rows, m] so each task writes one contiguous run.
        let mut out_t = vec![0.0f32; rows * m];
        if rows * cols < SERIAL_MAX_ELEMS {
            run(0, &mut out_t);
        } else {
            out_t
                .par_chunks_mut(DOT_CHUNK_ROWS * m)
                .enumerate()
                .for_each(|(chunk, out)| run(chunk * DOT_CHUNK_ROWS, out));
        }
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0.0f32; m * rows];
        for (r, row) in out_t.chunks(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * rows + r] = v;
            }
        }
        out
    }

    /// Many input rows: `out` = x Wᵀ, each 32-row panel of weights decoded to float32 in
    /// the packed matmul's layout, then multiplied by every input row with its
    /// microkernel, a few panel ranges per thread. Decode steps of many sequences come
    /// here too, so the loop goes to the team like the other decode products (rayon's
    /// workers would contend with its spinning helpers), and each thread keeps its panel
    /// between calls.
    fn forward_panels(&self, data: &[u8], x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let run = |p0: usize, p1: usize, (panel, row): &mut PanelScratch| {
            panel.set_depth(cols);
            row.resize(cols, 0.0);
            for p in p0..p1 {
                let width = PANEL.min(rows - p * PANEL);
                self.decode_panel(data, p * PANEL, width, panel.as_mut_f32(), row);
                // SAFETY: x is [m, cols]; each range writes columns p*32.. of its own panels.
                unsafe { panel.product(x.as_ptr(), m, out_ptr.get().add(p * PANEL), rows, width) };
            }
        };
        for_panel_ranges(rows, cols, m, |p0, p1| {
            PANEL_SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => run(p0, p1, &mut scratch),
                Err(_) => run(p0, p1, &mut (PanelBuffer::new(cols), Vec::new())),
            });
        });
    }

    /// Weight rows r0..r0 + width into a float32 panel ([cols, PANEL], depth-major);
    /// `row` is scratch for one decoded row.
    fn decode_panel(&self, data: &[u8], r0: usize, width: usize, panel: &mut [f32], row: &mut [f32]) {
        let (dtype, row_bytes) = (self.q.dtype(), self.row_bytes);
        #[cfg(target_arch = "x86_64")]
        if super::qmatmul_panel_decode::available() {
            let bytes = &data[r0 * row_bytes..(r0 + width) * row_bytes];
            let end = (r0 + width) * row_bytes;
            let next = &data[end..(end + PANEL * row_bytes).min(data.len())];
            // SAFETY: the features were detected; `bytes` holds `width` rows of blocks.
            unsafe { super::qmatmul_panel_decode::decode(dtype, bytes, row_bytes, width, self.cols, panel, next) };
            return;
        }
        for j in 0..width {
            decode_row(dtype, &data[(r0 + j) * row_bytes..(r0 + j + 1) * row_bytes], row);
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * PANEL + j] = v;
            }
        }
    }

    fn forward_tiles(&self, data: &[u8], x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (rows, cols) = (self.rows, self.cols);
        let xt = Tensor::from_slice(x, (m, cols), &Device::Cpu)?;
        let mut out = vec![0.0f32; m * rows];
        let mut tile = Vec::new();
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let r1 = (r0 + TILE_ROWS).min(rows);
            tile.resize((r1 - r0) * cols, 0.0);
            self.decode_rows(data, r0, r1, &mut tile)?;
            let w = Tensor::from_slice(&tile, (r1 - r0, cols), &Device::Cpu)?;
            let y = xt.matmul(&w.t()?)?.to_vec2::<f32>()?;
            for (i, yr) in y.iter().enumerate() {
                out[i * rows + r0..i * rows + r1].copy_from_slice(yr);
            }
        }
        Ok(out)
    }

    /// Decodes weight rows r0..r1 into `out` ([r1 - r0, cols]).
    fn decode_rows(&self, data: &[u8], r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
        let dtype = self.q.dtype();
        let bytes = &data[r0 * self.row_bytes..r1 * self.row_bytes];
        if has_row_decoder(dtype) {
            out.par_chunks_mut(self.cols)
                .zip(bytes.par_chunks(self.row_bytes))
                .for_each(|(o, b)| decode_row(dtype, b, o));
            return Ok(());
        }
        // K-quants and others: candle's dequantizer over a copy of the rows.
        let t = qtensor_from_ggml(dtype, bytes, vec![r1 - r0, self.cols], &Device::Cpu)?.dequantize(&Device::Cpu)?;
        out.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// For each weight row in `bytes`, its dot with every input row: out is [rows, m].
fn dot_rows(dtype: GgmlDType, bytes: &[u8], row_bytes: usize, x: &[f32], cols: usize, x_sums: &[f32], out: &mut [f32]) {
    match dtype {
        GgmlDType::Q4_0 => dot_rows_with::<18>(unpack_q4_0, bytes, row_bytes, x, cols, x_sums, out),
        GgmlDType::Q4_1 => dot_rows_with::<20>(unpack_q4_1, bytes, row_bytes, x, cols, x_sums, out),
        GgmlDType::Q8_0 => dot_rows_with::<34>(unpack_q8_0, bytes, row_bytes, x, cols, x_sums, out),
        _ => unreachable!("has_row_decoder guards the types"),
    }
}

/// Each 32-value block (of B bytes) is unpacked on the stack to its integer levels q (as
/// f32) and used at once by every input row (m <= DOT_PATH_MAX_ROWS): a block contributes
/// d * sum(q x) + min * sum(x), the per-block sums of x computed once.
#[inline(always)]
fn dot_rows_with<const B: usize>(
    unpack: impl Fn(&[u8; B], &mut [f32; 32]) -> (f32, f32),
    bytes: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    x_sums: &[f32],
    out: &mut [f32],
) {
    let m = x.len() / cols;
    let blocks = cols / 32;
    let mut acc = [[0.0f32; 8]; DOT_PATH_MAX_ROWS];
    let mut min_acc = [0.0f32; DOT_PATH_MAX_ROWS];
    let mut levels = [0.0f32; 32];
    for (row, out_row) in bytes.chunks_exact(row_bytes).zip(out.chunks_mut(m)) {
        acc[..m].iter_mut().for_each(|a| *a = [0.0; 8]);
        min_acc[..m].iter_mut().for_each(|a| *a = 0.0);
        for (block, b) in row.chunks_exact(B).zip(0..) {
            let block: &[u8; B] = block.try_into().unwrap_or(&[0; B]);
            let (d, min) = unpack(block, &mut levels);
            for (r, xr) in x.chunks_exact(cols).enumerate() {
                let xs: &[f32; 32] = xr[b * 32..b * 32 + 32].try_into().unwrap_or(&[0.0; 32]);
                let mut s = [0.0f32; 8];
                for j in 0..4 {
                    for i in 0..8 {
                        s[i] += levels[j * 8 + i] * xs[j * 8 + i];
                    }
                }
                for i in 0..8 {
                    acc[r][i] += d * s[i];
                }
                min_acc[r] += min * x_sums[r * blocks + b];
            }
        }
        for ((o, a), mn) in out_row.iter_mut().zip(&acc[..m]).zip(&min_acc[..m]) {
            *o = a.iter().sum::<f32>() + mn;
        }
    }
}

fn has_row_decoder(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: value = (nibble - 8) * d; low nibbles are values 0..16, high nibbles 16..32.
#[inline(always)]
fn unpack_q4_0(block: &[u8; 18], levels: &mut [f32; 32]) -> (f32, f32) {
    for j in 0..16 {
        let q = block[2 + j];
        levels[j] = ((q & 0x0F) as i16 - 8) as f32;
        levels[j + 16] = ((q >> 4) as i16 - 8) as f32;
    }
    (f16_at(block, 0), 0.0)
}

/// Q4_1: value = nibble * d + min.
#[inline(always)]
fn unpack_q4_1(block: &[u8; 20], levels: &mut [f32; 32]) -> (f32, f32) {
    for j in 0..16 {
        let q = block[4 + j];
        levels[j] = (q & 0x0F) as f32;
        levels[j + 16] = (q >> 4) as f32;
    }
    (f16_at(block, 0), f16_at(block, 2))
}

/// Q8_0: value = q * d.
#[inline(always)]
fn unpack_q8_0(block: &[u8; 34], levels: &mut [f32; 32]) -> (f32, f32) {
    for j in 0..32 {
        levels[j] = (block[2 + j] as i8) as f32;
    }
    (f16_at(block, 0), 0.0)
}

/// Decodes one row of Q4_0 / Q4_1 / Q8_0 blocks exactly as ggml dequantizes them.
pub(super) fn decode_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    fn each<const B: usize>(unpack: fn(&[u8; B], &mut [f32; 32]) -> (f32, f32), bytes: &[u8], out: &mut [f32]) {
        for (block, o) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(32)) {
            if let (Ok(block), Ok(o)) = (block.try_into(), <&mut [f32; 32]>::try_from(o)) {
                let (d, min) = unpack(block, o);
                o.iter_mut().for_each(|v| *v = *v * d + min);
            }
        }
    }
    match dtype {
        GgmlDType::Q4_0 => each::<18>(unpack_q4_0, bytes, out),
        GgmlDType::Q4_1 => each::<20>(unpack_q4_1, bytes, out),
        GgmlDType::Q8_0 => each::<34>(unpack_q8_0, bytes, out),
        _ => unreachable!("has_row_decoder guards the types"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_match_dequantized_matmul_for_each_type() {
        let (rows, cols) = (40, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let cols = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) {
                256
            } else {
                cols
            };
            let wt = if cols == 64 {
                wt.clone()
            } else {
                Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap()
            };
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let reference_w = q.dequantize(&Device::Cpu).unwrap();
            let matrix = QuantMatrix::with_kernel(Arc::new(q), false).unwrap();
            // 70 rows: the float32-panel path (40 weight rows: one full, one partial panel).
            for m in [1, 3, 20, 70] {
                let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
                let expected = xt
                    .matmul(&reference_w.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = matrix.forward(&x, m).unwrap();
                for (a, b) in got.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{dtype:?} m {m}: {a} vs {b}");
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod int8_tests {
    use super::*;

    /// The int8 kernel against the dequantized matmul: the only difference allowed is the
    /// rounding of the input to hi + lo/254 steps of amax/127 per 32-block (at most
    /// amax/127/508 per value).
    #[test]
    fn int8_kernel_matches_dequantized_matmul_within_input_rounding() {
        let isas = DotIsa::runnable();
        if isas.is_empty() {
            eprintln!("no AVX-512BW or AVX2 here: int8 kernel not exercised");
            return;
        }
        for (isa, dtype) in isas
            .iter()
            .flat_map(|&isa| [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0].map(|d| (isa, d)))
        {
            for (rows, cols) in [(40, 64), (70, 96), (33, 576), (9, 1536)] {
                let w: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
                    .collect();
                let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&wt, dtype).unwrap();
                let deq = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let matrix = QuantMatrix::with_isa(Arc::new(q), Some(isa)).unwrap();
                // The kernel itself, at any row count (QuantMatrix hands many rows to the
                // float32 panels).
                let Some(kernel) = &matrix.int8 else {
                    panic!("{isa:?} {dtype:?} was not repacked")
                };
                let forward = |x: &[f32], m: usize| {
                    let mut out = vec![0.0f32; m * rows];
                    kernel.forward(x, m, &mut out);
                    out
                };
                for m in [1, 3, 9, 20] {
                    let x: Vec<f32> = (0..m * cols)
                        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0 + (i % 5) as f32 * 0.013)
                        .collect();
                    let got = forward(&x, m);
                    for i in 0..m {
                        let xr = &x[i * cols..(i + 1) * cols];
                        for r in 0..rows {
                            let wr = &deq[r * cols..(r + 1) * cols];
                            let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                            // Bound: Σ_blocks (amax_b / 254) Σ |w| in the block.
                            let bound: f64 = xr
                                .chunks(32)
                                .zip(wr.chunks(32))
                                .map(|(xb, wb)| {
                                    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                                    amax / 127.0 / 508.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                                })
                                .sum();
                            let g = got[i * rows + r] as f64;
                            assert!(
                                (g - exact).abs() <= bound * 1.01 + 1e-5 * (1.0 + exact.abs()),
                                "{isa:?} {dtype:?} [{rows},{cols}] m {m} ({i},{r}): {g} vs {exact} (bound {bound})"
                            );
                        }
                    }
                    // Batch invariance: row 0 alone gives the same bits.
                    let alone = forward(&x[..cols], 1);
                    assert_eq!(alone[..], got[..rows], "{isa:?} {dtype:?} m {m}: row 0 differs alone");
                }
            }
        }
    }

    /// Both forms of the dot products sum the same integers exactly, so the kernels agree
    /// bit for bit (runs where the CPU has VNNI).
    #[test]
    fn avx512bw_kernel_gives_the_vnni_kernels_bits() {
        if !DotIsa::runnable().contains(&DotIsa::Vnni) {
            eprintln!("no AVX-512 VNNI here: nothing to compare the AVX-512BW kernel with");
            return;
        }
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (36, 672);
            let wt = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&wt, dtype).unwrap());
            let vnni = QuantMatrix::with_isa(q.clone(), Some(DotIsa::Vnni)).unwrap();
            let bw = QuantMatrix::with_isa(q, Some(DotIsa::Avx512Bw)).unwrap();
            let m = 5;
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            assert_eq!(vnni.forward(&x, m).unwrap(), bw.forward(&x, m).unwrap(), "{dtype:?}");
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore = "timing report"]
    fn q4_1_decode_matmul_speed() {
        for (dtype, rows) in [
            (GgmlDType::Q4_1, 1536 * 30),
            (GgmlDType::Q8_0, 49152),
            (GgmlDType::Q4_1, 192),
        ] {
            let cols = 576;
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let q = QuantMatrix::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap();
            let q_f32 = QuantMatrix::with_kernel(Arc::new(QTensor::quantize(&w, dtype).unwrap()), false).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                q_f32.forward(&[0.5; 576], 1).unwrap();
            }
            println!("f32-decoding kernel: {:.3} ms", t.elapsed().as_secs_f64() * 100.0);
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.1).sin()).collect();
            q.forward(&x, 1).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                q.forward(&x, 1).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / 10.0;
            let wt = w.t().unwrap();
            let xt = Tensor::from_slice(&x, (1, cols), &Device::Cpu).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                xt.matmul(&wt).unwrap();
            }
            let f = t.elapsed().as_secs_f64() / 10.0;
            println!(
                "{dtype:?} [{rows}, {cols}] x 1: {:.3} ms ({:.2} Gelem/s), f32 {:.3} ms",
                s * 1e3,
                (rows * cols) as f64 / s / 1e9,
                f * 1e3
            );
        }
    }

    /// The products of a step of m input rows on each Q4_1 path: the int8 kernel, the
    /// float32 panels, and the same weights packed as float32 (`cargo test --release -p
    /// vllm_engine rows_matmul_speed -- --ignored --nocapture`). Where the panels win sets
    /// `panel_path_min_rows`. Each pass runs over copies of the matrix that together
    /// exceed the caches, as a model's layers do: with one hot matrix the gathers of the
    /// panels' decode looked twice as fast as they are in a model.
    #[test]
    #[ignore = "timing report"]
    fn rows_matmul_speed() {
        use super::super::matmul::{PackedMatrix, WeightFormat};
        const STREAMED_BYTES: usize = 96 << 20;
        for (name, rows, cols) in [("gate_up", 3072, 576), ("down", 576, 1536)] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let copies = STREAMED_BYTES.div_ceil(q.storage_size_in_bytes());
            let quant: Vec<QuantMatrix> = (0..copies)
                .map(|_| QuantMatrix::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())).unwrap())
                .collect();
            let w = w.flatten_all().unwrap().to_vec1().unwrap();
            let float: Vec<PackedMatrix> = (0..STREAMED_BYTES.div_ceil(rows * cols * 4))
                .map(|_| PackedMatrix::pack(&w, rows, cols, WeightFormat::F32))
                .collect();
            for m in [4, 8, 12, 16, 24, 32, 64, 128] {
                let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.1).sin()).collect();
                let mut out = vec![0.0f32; m * rows];
                // Best of 5 passes, in ms per matrix.
                let per_matrix = |n: usize, f: &mut dyn FnMut(usize)| {
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            (0..n).for_each(&mut *f);
                            t.elapsed().as_secs_f64() * 1e3 / n as f64
                        })
                        .fold(f64::MAX, f64::min)
                };
                let int8 = per_matrix(quant.len(), &mut |i| {
                    quant[i].int8.as_ref().unwrap().forward(&x, m, &mut out)
                });
                let panels = per_matrix(quant.len(), &mut |i| {
                    quant[i].forward_panels(&quant[i].q.data().unwrap(), &x, m, &mut out)
                });
                let f32 = per_matrix(float.len(), &mut |i| float[i].matmul(&x, m, &mut out));
                println!("{name} [{rows}, {cols}] x {m}: Q4_1 int8 {int8:.3} ms, panels {panels:.3} ms, f32 packed {f32:.3} ms");
            }
        }
    }
}
