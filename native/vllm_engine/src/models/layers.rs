//! Shared building blocks of decoder models: linear projections over candle tensors and the
//! small elementwise ops (RMSNorm, rotary, SiLU-and-mul) done in place on f32 rows.

use candle_core::{CpuStorage, Storage, Tensor};
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

/// A bias-free projection, `y = x W^T`, W stored [out, in] as in HF checkpoints.
pub struct Linear {
    weight: Tensor,
    out_features: usize,
}

impl Linear {
    pub fn new(weight: Tensor) -> Result<Self> {
        let (out_features, _) = weight.dims2()?;
        Ok(Linear {
            weight: weight.contiguous()?,
            out_features,
        })
    }

    /// x: [rows, in] row-major. Returns [rows, out].
    pub fn forward(&self, x: Vec<f32>, rows: usize) -> Result<Tensor> {
        let inner = x.len().checked_div(rows).unwrap_or(0);
        let x = Tensor::from_vec(x, (rows, inner), self.weight.device())?;
        // The transposed view goes to gemm as strides: no copy of the weight.
        Ok(x.matmul(&self.weight.t()?)?)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }
}

/// RMSNorm of each `dim`-wide row of `x` into a new buffer.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    let mut out = vec![0.0f32; x.len()];
    let norm_row = |(row, out_row): (&[f32], &mut [f32])| rms_norm_row(row, weight, eps, out_row);
    if x.len() / dim >= PARALLEL_ROWS {
        x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(norm_row);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(norm_row);
    }
    out
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

/// From fused [rows, 2*inter] gate|up rows, silu(gate) * up as [rows, inter].
pub fn silu_mul(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * inter);
    let mut out = vec![0.0f32; rows * inter];
    let act = |(gu, o): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    };
    if rows >= PARALLEL_ROWS {
        gate_up
            .par_chunks(2 * inter)
            .zip(out.par_chunks_mut(inter))
            .for_each(act);
    } else {
        gate_up.chunks(2 * inter).zip(out.chunks_mut(inter)).for_each(act);
    }
    out
}

/// `acc += x`, elementwise (residual connections).
pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
