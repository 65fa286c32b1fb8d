//! Turns a model path into a runnable model and its tokenizer: GGUF files and Hugging
//! Face directories (config.json + safetensors + tokenizer.json).

mod gguf;
mod gguf_header;
mod hf_dir;

use candle_core::Tensor;

use crate::config::{EngineArgs, ModelConfig};
use crate::error::{EngineError, Result};
use crate::models::{CausalLM, DecoderLM};
use crate::tokenizer::Tokenizer;

pub use gguf::GgufWeights;
pub use hf_dir::SafetensorsWeights;

pub struct LoadedModel {
    pub model: Box<dyn CausalLM>,
    pub tokenizer: Tokenizer,
    pub config: ModelConfig,
}

/// Named float32 weights in Hugging Face naming and layout, whatever the file format.
pub trait WeightSource {
    /// The tensor called `name` (e.g. `model.layers.0.self_attn.q_proj.weight`), checked to
    /// have `shape`. Missing or mis-shaped: a `:validation` error naming the file.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

/// Checks a loaded tensor's shape against what the config implies.
pub(crate) fn check_shape(t: Tensor, name: &str, shape: &[usize], file: &std::path::Path) -> Result<Tensor> {
    if t.dims() != shape {
        return Err(EngineError::validation(format!(
            "{}: tensor {name} has shape {:?}, the config implies {:?}",
            file.display(),
            t.dims(),
            shape
        )));
    }
    Ok(t)
}

enum ModelFormat {
    Gguf,
    HfDir,
}

fn model_format(args: &EngineArgs) -> Result<ModelFormat> {
    let path = &args.model;
    if !path.exists() {
        return Err(EngineError::not_found(format!(
            "model path {} does not exist",
            path.display()
        )));
    }
    if path.is_dir() {
        return Ok(ModelFormat::HfDir);
    }
    Ok(ModelFormat::Gguf)
}

/// Loads the model and its tokenizer (missing path: `:not_found`; unreadable or corrupt
/// file: `:validation`; unknown architecture: `:unsupported`).
pub fn load(args: &EngineArgs) -> Result<LoadedModel> {
    let (model, config, tokenizer) = load_parts(args, true)?;
    let tokenizer = tokenizer.ok_or_else(|| EngineError::internal("tokenizer was not built"))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        config,
    })
}

/// Loads only the model (no tokenizer), e.g. for tests over token ids.
pub fn load_causal_lm(args: &EngineArgs) -> Result<(Box<dyn CausalLM>, ModelConfig)> {
    let (model, config, _) = load_parts(args, false)?;
    Ok((model, config))
}

type Parts = (Box<dyn CausalLM>, ModelConfig, Option<Tokenizer>);

fn load_parts(args: &EngineArgs, with_tokenizer: bool) -> Result<Parts> {
    let explicit_tokenizer = || args.tokenizer.as_deref().map(Tokenizer::from_file).transpose();
    match model_format(args)? {
        ModelFormat::Gguf => {
            // One read of the header serves the config, the tokenizer and the tensors.
            let mut weights = GgufWeights::open(&args.model)?;
            let config = ModelConfig::from_gguf(weights.content()).map_err(|e| in_file(e, &args.model))?;
            let tokenizer = match (with_tokenizer, explicit_tokenizer()?) {
                (false, _) => None,
                (true, Some(t)) => Some(t),
                (true, None) => Some(Tokenizer::from_gguf_metadata(&weights.content().metadata)?),
            };
            let model = DecoderLM::load(config.clone(), &mut weights)?;
            Ok((Box::new(model), config, tokenizer))
        }
        ModelFormat::HfDir => {
            let tokenizer = match (with_tokenizer, explicit_tokenizer()?) {
                (false, _) => None,
                (true, Some(t)) => Some(t),
                (true, None) => Some(Tokenizer::from_file(&args.model)?),
            };
            let config_path = args.model.join("config.json");
            let json = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    EngineError::not_found(format!("{} does not exist", config_path.display()))
                }
                _ => EngineError::validation(format!("cannot read {}: {e}", config_path.display())),
            })?;
            let config = ModelConfig::from_hf_json(&json).map_err(|e| in_file(e, &config_path))?;
            let mut weights = SafetensorsWeights::open(&args.model)?;
            let model = DecoderLM::load(config.clone(), &mut weights)?;
            Ok((Box::new(model), config, tokenizer))
        }
    }
}

/// Prefixes an error's message with the file it is about.
fn in_file(e: EngineError, file: &std::path::Path) -> EngineError {
    EngineError::new(e.category, format!("{}: {}", file.display(), e.message))
}
