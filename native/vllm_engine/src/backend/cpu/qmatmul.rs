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

use crate::error::{EngineError, Result};

/// Up to this many input rows use the fused decode-and-dot path.
const DOT_PATH_MAX_ROWS: usize = 8;
/// Weight rows decoded at once on the gemm path.
const TILE_ROWS: usize = 512;
/// Weight rows per rayon task on the dot path.
const DOT_CHUNK_ROWS: usize = 32;

/// A [rows, cols] matrix of GGML blocks.
pub struct QuantMatrix {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl QuantMatrix {
    pub fn new(q: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let block = q.dtype().block_size();
        if rows == 0 || !cols.is_multiple_of(block) {
            return Err(EngineError::validation(format!(
                "quantized matrix [{rows}, {cols}] does not split into rows of whole {:?} blocks",
                q.dtype()
            )));
        }
        let row_bytes = cols / block * q.dtype().type_size();
        Ok(QuantMatrix { q, rows, cols, row_bytes })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// x: [m, cols] row-major. Returns x W^T as [m, rows].
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.cols {
            return Err(EngineError::internal(format!(
                "quantized matmul: input of {} values is not [{m}, {}]",
                x.len(),
                self.cols
            )));
        }
        let data = self.q.data()?;
        if m <= DOT_PATH_MAX_ROWS && has_row_decoder(self.q.dtype()) {
            Ok(self.forward_dot(&data, x, m))
        } else {
            self.forward_tiles(&data, x, m)
        }
    }

    fn forward_dot(&self, data: &[u8], x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols, row_bytes) = (self.rows, self.cols, self.row_bytes);
        let dtype = self.q.dtype();
        // Transposed result [rows, m] so each task writes one contiguous run.
        let mut out_t = vec![0.0f32; rows * m];
        out_t
            .par_chunks_mut(DOT_CHUNK_ROWS * m)
            .enumerate()
            .for_each(|(chunk, out)| {
                let mut decoded = vec![0.0f32; cols];
                for (i, out_row) in out.chunks_mut(m).enumerate() {
                    let r = chunk * DOT_CHUNK_ROWS + i;
                    decode_row(dtype, &data[r * row_bytes..(r + 1) * row_bytes], &mut decoded);
                    for (o, xr) in out_row.iter_mut().zip(x.chunks(cols)) {
                        *o = dot(&decoded, xr);
                    }
                }
            });
        let mut out = vec![0.0f32; m * rows];
        for (r, row) in out_t.chunks(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * rows + r] = v;
            }
        }
        out
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

fn has_row_decoder(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// Decodes one row of Q4_0 / Q4_1 / Q8_0 blocks exactly as ggml dequantizes them.
fn decode_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match dtype {
        GgmlDType::Q4_0 => {
            for (block, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = half(block);
                let (lo, hi) = o.split_at_mut(16);
                for ((q, l), h) in block[2..].iter().zip(lo).zip(hi) {
                    *l = ((q & 0x0F) as i16 - 8) as f32 * d;
                    *h = ((q >> 4) as i16 - 8) as f32 * d;
                }
            }
        }
        GgmlDType::Q4_1 => {
            for (block, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (half(block), half(&block[2..]));
                let (lo, hi) = o.split_at_mut(16);
                for ((q, l), h) in block[4..].iter().zip(lo).zip(hi) {
                    *l = (q & 0x0F) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (block, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = half(block);
                for (q, v) in block[2..].iter().zip(o) {
                    *v = (*q as i8) as f32 * d;
                }
            }
        }
        _ => unreachable!("has_row_decoder guards the types"),
    }
}

/// Dot product with eight independent accumulators so it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a.chunks_exact(8).remainder().iter().zip(b.chunks_exact(8).remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_match_dequantized_matmul_for_each_type() {
        let (rows, cols) = (40, 64);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let cols = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 256 } else { cols };
            let wt = if cols == 64 { wt.clone() } else { Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap() };
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let reference_w = q.dequantize(&Device::Cpu).unwrap();
            let matrix = QuantMatrix::new(Arc::new(q)).unwrap();
            for m in [1, 3, 20] {
                let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
                let expected = xt.matmul(&reference_w.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = matrix.forward(&x, m).unwrap();
                for (a, b) in got.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{dtype:?} m {m}: {a} vs {b}");
                }
            }
        }
    }
}
