//! The engine on the device `VLLM_TEST_DEVICE` names (default `cpu`; the GPU machine runs
//! this binary from a `cuda` build with `cuda`): device sampling against the host
//! sampler's rules, seeded requests, decode graphs across sleep and wake-up, prefix
//! caching, and the SmolLM2 references in float32 and bfloat16 (the GGUF under
//! $VLLM_MODELS_DIR). On the CPU the same invariants check the host sampler.

#[path = "../engine_common/mod.rs"]
mod engine_common;

use engine_common::model_files as common;

mod engine;
mod logits_argmax;
mod sampling;
mod smollm2;

use vllm_engine::config::{DType, Device};
use vllm_engine::EngineArgs;

pub fn device() -> Device {
    let name = std::env::var("VLLM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Device::parse(&name).unwrap_or_else(|e| panic!("VLLM_TEST_DEVICE: {e}"))
}

pub fn on_gpu() -> bool {
    device() != Device::Cpu
}

pub fn args(path: std::path::PathBuf, dtype: DType) -> EngineArgs {
    let mut args = EngineArgs::new(path);
    args.device = device();
    args.dtype = dtype;
    args
}

/// Decode steps replayed through CUDA graphs so far in this process (None on the CPU).
pub fn graph_replays() -> Option<u64> {
    #[cfg(feature = "cuda")]
    if on_gpu() {
        return Some(vllm_engine::backend::cuda::graphs::replays_total());
    }
    None
}

/// Decode steps whose results a lookahead launch gave, so far (None on the CPU).
pub fn lookahead_steps_used() -> Option<u64> {
    #[cfg(feature = "cuda")]
    if on_gpu() {
        return Some(vllm_engine::backend::cuda::graphs::lookahead_used_total());
    }
    None
}
