//! Engine control that must run on the core thread, between steps: sleep (release the KV
//! cache memory; at level 2 drop the weights too) and wake up (reallocate; reload the
//! weights from disk), and a ping that proves the core thread is serving. Also the
//! engine's memory report (weights + KV cache bytes), published after every change.

use crossbeam_channel::Sender;

use candle_core::Tensor;

use crate::config::{EngineArgs, ModelConfig};
use crate::engine_core::EngineCore;
use crate::error::{EngineError, Result};
use crate::kv_cache::PagedKvCache;
use crate::models::{CausalLM, ForwardBatch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    /// Answered with `Pong` by the core thread.
    Ping,
    /// Level 1: release the KV cache memory (on the CPU the weights already live in host
    /// memory and stay). Level 2: also drop the weights; waking reloads them from disk.
    /// Requests in flight are aborted first.
    Sleep { level: u8 },
    /// Restores what the flags name (both: fully awake).
    WakeUp { weights: bool, kv_cache: bool },
    /// Test-only fault injection: panics on the core thread. `Engine::inject_fault`
    /// sends it only when FAULT_INJECTION_ENV is "1".
    InjectPanic,
}

/// The environment variable that arms `Engine::inject_fault` (reliability tests set it;
/// nothing else should).
pub const FAULT_INJECTION_ENV: &str = "VLLM_FAULT_INJECTION";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlReply {
    Pong,
    Done,
}

pub struct ControlCommand {
    pub op: ControlOp,
    pub reply: Sender<Result<ControlReply>>,
}

/// Bytes the engine holds for the model and its KV cache (what sleep releases).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// The model's parameters as the engine holds them (float32 on the CPU).
    pub weights_bytes: usize,
    /// The paged KV cache's key and value memory.
    pub kv_cache_bytes: usize,
    /// 0 awake, else the deepest sleep level not yet fully woken from.
    pub sleep_level: u8,
}

/// What the core thread knows about its own sleep.
#[derive(Default)]
pub struct SleepState {
    /// Where to reload the weights from after a level-2 sleep.
    pub reload_args: Option<EngineArgs>,
    pub level: u8,
    kv_released: bool,
    weights_dropped: bool,
}

impl SleepState {
    /// While asleep the core runs no step (requests added meanwhile wait).
    pub fn is_asleep(&self) -> bool {
        self.kv_released || self.weights_dropped
    }
}

/// Parameter bytes of a decoder-only transformer of this shape in float32 (for models
/// that do not report their own `weight_bytes`).
pub fn weight_bytes(c: &ModelConfig) -> usize {
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size;
    let bias = if c.attention_bias { q + 2 * kv } else { 0 };
    let mlp = 3 * c.hidden_size * c.intermediate_size;
    let per_layer = attention + bias + mlp + 2 * c.hidden_size;
    let embeddings = c.vocab_size * c.hidden_size;
    let lm_head = if c.tie_word_embeddings { 0 } else { embeddings };
    let params = embeddings + lm_head + c.num_hidden_layers * per_layer + c.hidden_size;
    params * std::mem::size_of::<f32>()
}

/// Stands in for the model while its weights are dropped (level-2 sleep).
struct DroppedWeights {
    config: ModelConfig,
}

impl CausalLM for DroppedWeights {
    fn forward(&self, _batch: &ForwardBatch, _kv: &mut PagedKvCache) -> Result<Tensor> {
        Err(EngineError::internal(
            "the engine is asleep (weights dropped): call wake_up first",
        ))
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }
}

impl EngineCore {
    /// Runs a control command and answers it. A failed wake-up leaves the engine asleep.
    pub(crate) fn handle_control(&mut self, cmd: ControlCommand) {
        let result = match cmd.op {
            ControlOp::Ping => Ok(ControlReply::Pong),
            ControlOp::Sleep { level } => self.sleep(level).map(|()| ControlReply::Done),
            ControlOp::WakeUp { weights, kv_cache } => self.wake_up(weights, kv_cache).map(|()| ControlReply::Done),
            ControlOp::InjectPanic => panic!("fault injected by a test ({FAULT_INJECTION_ENV}=1)"),
        };
        self.publish_memory();
        let _ = cmd.reply.send(result);
    }

    fn sleep(&mut self, level: u8) -> Result<()> {
        if !(1..=2).contains(&level) {
            return Err(EngineError::validation(format!(
                "sleep level must be 1 or 2, got {level}"
            )));
        }
        // The KV cache's content is about to go: nothing may still attend to it.
        self.release_all();
        // Cached prefixes point into the memory being released.
        self.scheduler.reset_prefix_cache(true);
        if !self.control.kv_released {
            self.runner.release_kv_cache();
            self.control.kv_released = true;
        }
        if level == 2 && !self.control.weights_dropped {
            let config = self.runner.model_config().clone();
            // Dropping the returned model frees the weights now.
            drop(self.runner.replace_model(Box::new(DroppedWeights { config })));
            self.control.weights_dropped = true;
        }
        self.control.level = self.control.level.max(level);
        Ok(())
    }

    fn wake_up(&mut self, weights: bool, kv_cache: bool) -> Result<()> {
        if weights && self.control.weights_dropped {
            let args = self.control.reload_args.as_ref().ok_or_else(|| {
                EngineError::unsupported(
                    "this engine was built from an in-memory model: its weights cannot be reloaded",
                )
            })?;
            let (model, config) = crate::loader::load_causal_lm(args)?;
            if &config != self.runner.model_config() {
                return Err(EngineError::validation(format!(
                    "{} changed on disk while the engine slept: it is no longer the model the engine started with",
                    args.model.display()
                )));
            }
            drop(self.runner.replace_model(model));
            self.control.weights_dropped = false;
            self.runner.reattach_kv_cache()?;
        }
        if kv_cache && self.control.kv_released {
            self.runner.restore_kv_cache()?;
            self.control.kv_released = false;
        }
        if !self.control.is_asleep() {
            self.control.level = 0;
        }
        Ok(())
    }

    pub(crate) fn publish_memory(&self) {
        let usage = MemoryUsage {
            weights_bytes: match (self.control.weights_dropped, self.runner.weight_bytes()) {
                (true, _) => 0,
                // A model that does not count its weights: their float32 size from the shape.
                (false, 0) => weight_bytes(self.runner.model_config()),
                (false, known) => known,
            },
            kv_cache_bytes: self.runner.kv_cache_bytes(),
            sleep_level: self.control.level,
        };
        if let Ok(mut m) = self.shared.memory.lock() {
            *m = usage;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bytes_counts_smollm2_135m() {
        // SmolLM2-135M: 134.5M parameters (tied embeddings).
        let c = ModelConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let params = weight_bytes(&c) / 4;
        assert!((134_000_000..135_000_000).contains(&params), "{params}");
    }
}
