//! `load_format: "dummy"`: random weights of the shapes the config implies, made on the
//! device the model runs on (as vLLM's dummy loader), for performance work without the
//! model's files. Norm weights are 1 so activations keep a realistic scale.

use candle_core::{DType, Device, Tensor};

use super::WeightSource;
use crate::error::Result;

/// Half-width of the uniform distribution of every matrix and bias.
const DUMMY_RANGE: f32 = 0.02;

pub struct DummyWeights {
    device: Device,
}

impl DummyWeights {
    pub fn new(device: Device, seed: u64) -> Result<Self> {
        // candle seeds only GPU generators; CPU dummy weights differ run to run.
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        Ok(DummyWeights { device })
    }
}

impl WeightSource for DummyWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, DType::F32, &self.device)?);
        }
        Ok(Tensor::rand(-DUMMY_RANGE, DUMMY_RANGE, shape, &self.device)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
