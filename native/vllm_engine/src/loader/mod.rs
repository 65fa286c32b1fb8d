//! Turns a model path into a runnable model and its tokenizer: GGUF files and Hugging
//! Face directories (config.json + safetensors + tokenizer.json).

use crate::config::{EngineArgs, ModelConfig};
use crate::error::Result;
use crate::models::CausalLM;
use crate::tokenizer::Tokenizer;

pub struct LoadedModel {
    pub model: Box<dyn CausalLM>,
    pub tokenizer: Tokenizer,
    pub config: ModelConfig,
}

/// Loads `args.model` (missing path: `:not_found`; unreadable or corrupt file: `:validation`).
pub fn load(_args: &EngineArgs) -> Result<LoadedModel> {
    todo!()
}
