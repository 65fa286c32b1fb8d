//! Shared building blocks of decoder models: linear projections over candle tensors and the
//! small elementwise ops (RMSNorm, rotary, SiLU-and-mul) done in place on f32 rows.

use candle_core::quantized::QTensor;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{CpuStorage, Device, Storage, Tensor};

use crate::backend::cpu::matmul::{PackedMatrix, WeightFormat};
use crate::backend::cpu::qmatmul::QuantMatrix;
use crate::backend::cpu::simd::{self, vectorized};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Below this many rows the elementwise ops stay on one thread (rayon overhead dominates).
const PARALLEL_ROWS: usize = 16;

/// Runs `f` over a contiguous f32 CPU tensor's data without copying it.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let offsets = layout
        .contiguous_offsets()
        .ok_or_else(|| EngineError::internal("expected a contiguous tensor"))?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Ok(f(&data[offsets.0..offsets.1])),
        _ => Err(EngineError::internal("expected an f32 CPU tensor")),
    }
}

/// Copies a tensor's f32 data out (used at load time only).
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The matrix of a projection: float32 packed for our kernel, or GGML blocks multiplied
/// without dequantizing.
enum Weight {
    F32(Arc<PackedMatrix>),
    Quantized(QuantMatrix),
}

impl Weight {
    fn rows(&self) -> usize {
        match self {
            Weight::F32(w) => w.rows(),
            Weight::Quantized(q) => q.rows(),
        }
    }

    /// out: [m, rows] = x [m, in] Wᵀ.
    fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Weight::F32(w) => {
                if x.len() != m * w.cols() {
                    return Err(EngineError::internal(format!(
                        "matmul: input of {} values is not [{m}, {}]",
                        x.len(),
                        w.cols()
                    )));
                }
                w.matmul(x, m, out);
            }
            Weight::Quantized(q) => q.forward_into(x, m, out)?,
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.bytes(),
            Weight::Quantized(q) => q.bytes(),
        }
    }
}

/// A projection `y = x W^T (+ b)`, W stored [out, in] as in HF checkpoints. Fused
/// projections whose quantized parts differ in GGML type keep the parts apart
/// (`parts.len() > 1`) and concatenate their outputs.
pub struct Linear {
    parts: Vec<Weight>,
    bias: Option<Vec<f32>>,
    out_features: usize,
}

impl Linear {
    /// Packs a float32 [out, in] weight for the matmul kernel (the tensor can then go).
    pub fn new(weight: Tensor) -> Result<Self> {
        Self::packed(weight, WeightFormat::F32)
    }

    /// Packs an [out, in] weight, held as `format` (bfloat16: rounded once, here).
    pub fn packed(weight: Tensor, format: WeightFormat) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let data = to_f32_vec(&weight.to_dtype(candle_core::DType::F32)?)?;
        let packed = PackedMatrix::pack(&data, out_features, in_features, format);
        Ok(Linear {
            parts: vec![Weight::F32(Arc::new(packed))],
            bias: None,
            out_features,
        })
    }

    /// A projection over GGML-quantized [out, in] weights (one part per GGML type).
    pub fn quantized(parts: Vec<Arc<QTensor>>) -> Result<Self> {
        let mut out_features = 0;
        let mut weights = Vec::with_capacity(parts.len());
        for q in parts {
            let matrix = QuantMatrix::new(q)?;
            out_features += matrix.rows();
            weights.push(Weight::Quantized(matrix));
        }
        Ok(Linear {
            parts: weights,
            bias: None,
            out_features,
        })
    }

    /// Whether the weights are GGML-quantized.
    pub fn is_quantized(&self) -> bool {
        self.parts.iter().any(|w| matches!(w, Weight::Quantized(_)))
    }

    /// The packed float32 matrix, when this projection is one (a tied embedding reads it).
    pub fn packed_f32(&self) -> Option<Arc<PackedMatrix>> {
        match self.parts.as_slice() {
            [Weight::F32(w)] => Some(w.clone()),
            _ => None,
        }
    }

    /// Adds a bias of `out_features` values to every output row.
    pub fn with_bias(mut self, bias: Tensor) -> Result<Self> {
        if bias.elem_count() != self.out_features {
            return Err(EngineError::internal(format!(
                "bias of {} values for a projection of {} outputs",
                bias.elem_count(),
                self.out_features
            )));
        }
        self.bias = Some(to_f32_vec(&bias)?);
        Ok(self)
    }

    /// x: [rows, in] row-major. Returns [rows, out].
    pub fn forward(&self, x: Vec<f32>, rows: usize) -> Result<Tensor> {
        let mut out = Vec::new();
        self.forward_into(&x, rows, &mut out)?;
        Ok(Tensor::from_vec(
            out,
            (rows, self.out_features),
            &candle_core::Device::Cpu,
        )?)
    }

    /// x: [rows, in] row-major; `out` becomes [rows, out] (its capacity is reused).
    pub fn forward_into(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) -> Result<()> {
        out.resize(rows * self.out_features, 0.0);
        match self.parts.as_slice() {
            [one] => one.forward_into(x, rows, out)?,
            parts => {
                let mut col = 0;
                for p in parts {
                    let width = p.rows();
                    let mut part = vec![0.0f32; rows * width];
                    p.forward_into(x, rows, &mut part)?;
                    for (o, y) in out.chunks_mut(self.out_features).zip(part.chunks(width)) {
                        o[col..col + width].copy_from_slice(y);
                    }
                    col += width;
                }
            }
        }
        if let Some(b) = &self.bias {
            out.chunks_mut(self.out_features).for_each(|row| add_in_place(row, b));
        }
        Ok(())
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Resident bytes of the weights and bias.
    pub fn weight_bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| b.len() * 4);
        self.parts.iter().map(Weight::bytes).sum::<usize>() + bias
    }
}

/// A token embedding table [vocab, dim]: float32 (the tied LM head's packed matrix), or
/// GGML blocks dequantized row by row.
pub enum Embedding {
    F32(Tensor),
    Packed(Arc<PackedMatrix>),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// The rows of `ids`, concatenated ([ids.len(), dim]), into `out` (its capacity is
    /// reused); ids are checked by the caller.
    pub fn gather_into(&self, ids: &[u32], dim: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        match self {
            Embedding::F32(t) => with_f32_slice(t, |table| {
                for &id in ids {
                    out.extend_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
                }
            })?,
            Embedding::Packed(p) => {
                out.resize(ids.len() * dim, 0.0);
                for (&id, row) in ids.iter().zip(out.chunks_mut(dim)) {
                    p.row_into(id as usize, row);
                }
            }
            Embedding::Quantized(q) => {
                let data = q.data()?;
                let row_bytes = data.len() / q.shape().dims()[0];
                for &id in ids {
                    let row = &data[id as usize * row_bytes..(id as usize + 1) * row_bytes];
                    let t = qtensor_from_ggml(q.dtype(), row, vec![dim], &Device::Cpu)?.dequantize(&Device::Cpu)?;
                    out.extend(t.to_vec1::<f32>()?);
                }
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        match self {
            Embedding::F32(t) => t.elem_count() * 4,
            Embedding::Packed(p) => p.bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

/// LayerNorm (with bias) of each `dim`-wide row of `x` into a new buffer.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    let mut out = vec![0.0f32; x.len()];
    let norm_row = |(row, out_row): (&[f32], &mut [f32])| {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &w), &b) in out_row.iter_mut().zip(row).zip(weight).zip(bias) {
            *o = (v - mean) * inv * w + b;
        }
    };
    if x.len() / dim >= PARALLEL_ROWS {
        x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(norm_row);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(norm_row);
    }
    out
}

/// A LayerNorm's weight and bias, loaded as f32 rows.
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    pub fn bytes(&self) -> usize {
        (self.weight.len() + self.bias.len()) * 4
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `out` (resized, capacity reused).
pub fn rms_norm_into(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = weight.len();
    out.resize(x.len(), 0.0);
    let norm_row = |(row, out_row): (&[f32], &mut [f32])| rms_norm_row(row, weight, eps, out_row);
    if x.len() / dim >= PARALLEL_ROWS {
        x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(norm_row);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(norm_row);
    }
}

pub fn rms_norm_row(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMSNorm of one row in place (Qwen3's per-head q/k norm).
pub fn rms_norm_in_place(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, &w) in row.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

/// Rotary position embedding, HF "rotate_half" layout (pairs are i and i + head_dim/2).
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        // float32 as transformers computes it, so angles round the same way.
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rotary { inv_freq }
    }

    /// cos and sin tables, [positions.len(), head_dim/2] each.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

/// Rotates one head vector by its token's cos/sin row.
pub fn apply_rotary(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

/// From fused [rows, 2*inter] gate|up rows, silu(gate) * up as [rows, inter] into `out` (resized, capacity reused).
pub fn silu_mul_into(gate_up: &[f32], inter: usize, out: &mut Vec<f32>) {
    let rows = gate_up.len() / (2 * inter);
    out.resize(rows * inter, 0.0);
    let act = |(gu, o): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(inter);
        vectorized(|| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + simd::exp(-g)) * u;
            }
        })
    };
    if rows >= PARALLEL_ROWS {
        gate_up
            .par_chunks(2 * inter)
            .zip(out.par_chunks_mut(inter))
            .for_each(act);
    } else {
        gate_up.chunks(2 * inter).zip(out.chunks_mut(inter)).for_each(act);
    }
}

/// `acc += x`, elementwise (residual connections).
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// erf to ~2e-7 absolute (Abramowitz & Stegun 7.1.26), in f32.
fn erf(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    sign * (1.0 - poly * (-x * x).exp())
}

/// Exact (erf) GELU in place, as BERT's and OPT's "gelu".
pub fn gelu_erf_in_place(x: &mut [f32]) {
    let gelu = |v: &mut f32| {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    };
    if x.len() >= PARALLEL_ROWS * 1024 {
        x.par_iter_mut().for_each(gelu);
    } else {
        x.iter_mut().for_each(gelu);
    }
}
