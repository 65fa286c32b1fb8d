//! The device sampler (kernels/sampling.cu): penalties, then greedy or temperature, min-p,
//! top-k, top-p and a draw, per row of float32 logits on the GPU. One upload of the rows'
//! parameters and penalty lists, one copy back of 2 u32 per row.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Tensor};

use super::{device_ptr, embedded};
use crate::device_sampling::{any_penalties, pack, DeviceSampleRow};
use crate::error::{EngineError, Result};

/// Must match SAMPLE_THREADS in sampling.cu.
const SAMPLE_THREADS: u32 = 1024;
const PENALTY_THREADS: u32 = 256;

pub struct DeviceSampler {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    penalties: CudaFunction,
    sample: CudaFunction,
}

impl DeviceSampler {
    pub fn load(device: &Device) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let context = stream.context().clone();
        let module = super::load_embedded(&context, embedded::SAMPLING_CUBIN, embedded::SAMPLING_PTX)
            .map_err(|e| EngineError::internal(format!("cannot load the sampling kernels: {e}")))?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| EngineError::internal(format!("sampling kernel {name} is missing: {e}")))
        };
        Ok(DeviceSampler {
            penalties: get("apply_penalties")?,
            sample: get("sample_rows")?,
            stream,
            _module: module,
        })
    }

    /// Samples row i of `logits` [rows.len(), vocab] with `rows[i]`: (picked ids, each
    /// pick's logit before penalties).
    pub fn sample(&self, logits: &Tensor, rows: &[DeviceSampleRow]) -> Result<(Vec<u32>, Vec<f32>)> {
        let (n, vocab) = logits.dims2()?;
        if n != rows.len() {
            return Err(EngineError::internal(format!(
                "device sampler: {n} rows of logits for {} requests",
                rows.len()
            )));
        }
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let raw = logits.to_dtype(DType::F32)?.contiguous()?;
        let words = pack(rows);
        let meta = Tensor::from_vec(words.clone(), words.len(), logits.device())?;
        let vocab_i = vocab as i32;
        // Penalties change a copy: the raw logits stay for the picks' reported logit.
        let work = if any_penalties(rows) {
            let work = raw.copy()?;
            let (w, m, r) = (device_ptr(&work)?, device_ptr(&meta)?, n as i32);
            let mut b = self.stream.launch_builder(&self.penalties);
            b.arg(&w).arg(&m).arg(&r).arg(&vocab_i);
            unsafe { b.launch(config(n, PENALTY_THREADS)) }.map_err(|e| launch_err("apply_penalties", e))?;
            work
        } else {
            raw.clone()
        };
        // SAFETY: sample_rows writes all 2 * n values.
        let out = unsafe { Tensor::empty(2 * n, DType::U32, logits.device())? };
        let (o, w, r, m) = (
            device_ptr(&out)?,
            device_ptr(&work)?,
            device_ptr(&raw)?,
            device_ptr(&meta)?,
        );
        let mut b = self.stream.launch_builder(&self.sample);
        b.arg(&o).arg(&w).arg(&r).arg(&m).arg(&vocab_i);
        unsafe { b.launch(config(n, SAMPLE_THREADS)) }.map_err(|e| launch_err("sample_rows", e))?;
        let all = out.to_vec1::<u32>()?;
        Ok(super::ops::split_argmax(&all, n))
    }
}

fn config(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch_err(name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA kernel {name} failed to launch: {e}"))
}
