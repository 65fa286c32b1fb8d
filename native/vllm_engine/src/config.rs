//! Engine options (EngineArgs, vLLM's names and defaults) and the model's shape (ModelConfig).

use std::path::PathBuf;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    /// float32 on the CPU for now.
    #[default]
    Auto,
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DType::Auto),
            "float32" | "float" | "f32" => Ok(DType::F32),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float16" | "half" | "f16" => Ok(DType::F16),
            other => Err(EngineError::validation(format!(
                "dtype must be one of auto, float32, bfloat16, float16; got {other:?}"
            ))),
        }
    }
}

/// Options for starting an engine. Field names follow vLLM's EngineArgs.
#[derive(Debug, Clone)]
pub struct EngineArgs {
    /// A .gguf file or a Hugging Face model directory.
    pub model: PathBuf,
    /// A tokenizer.json (or directory holding one) overriding the model's own.
    pub tokenizer: Option<PathBuf>,
    pub dtype: DType,
    pub seed: u64,
    /// None: the model's max_position_embeddings.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// None: max(2048, max_model_len) as vLLM with chunked prefill.
    pub max_num_batched_tokens: Option<usize>,
    pub block_size: usize,
    /// Bytes for the KV cache; None: a default budget on the CPU.
    pub kv_cache_memory_bytes: Option<usize>,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    /// Threads for CPU matmuls and attention; None: all cores.
    pub num_threads: Option<usize>,
}

impl EngineArgs {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineArgs {
            model: model.into(),
            tokenizer: None,
            dtype: DType::Auto,
            seed: 0,
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            block_size: 16,
            kv_cache_memory_bytes: None,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            num_threads: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_num_seqs == 0 {
            return Err(EngineError::validation("max_num_seqs must be at least 1"));
        }
        if self.block_size == 0 || self.block_size > 256 {
            return Err(EngineError::validation(format!(
                "block_size must be in 1..=256, got {}",
                self.block_size
            )));
        }
        if self.max_model_len == Some(0) {
            return Err(EngineError::validation("max_model_len must be at least 1"));
        }
        if self.max_num_batched_tokens == Some(0) {
            return Err(EngineError::validation("max_num_batched_tokens must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// The shape of a decoder-only transformer, read from config.json or GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Mistral: attend only to the last `sliding_window` positions.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Qwen2: biases on the q, k and v projections.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}
