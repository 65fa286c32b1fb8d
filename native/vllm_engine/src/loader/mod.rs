//! Turns a model path into a runnable model and its tokenizer: GGUF files and Hugging
//! Face directories (config.json + safetensors + tokenizer.json).

mod dummy;
pub mod fan_out;
mod gguf;
mod gguf_header;
mod hf_dir;

use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::config::{Architecture, Device as EngineDevice, EngineArgs, LoadFormat, ModelConfig};
use crate::error::{EngineError, Result};
use crate::models::opt::OptOptions;
use crate::models::{BertModel, CausalLM, DecoderLM, EncoderConfig, EncoderModel, OptLM, Runner};
use crate::tokenizer::Tokenizer;

pub use dummy::DummyWeights;
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
    /// The tensor kept in its quantized GGML blocks, in HF layout, when the source holds it
    /// quantized and was asked to keep it so; Ok(None): use `tensor` (float32) instead.
    fn quantized(&mut self, _name: &str, _shape: &[usize]) -> Result<Option<QTensor>> {
        Ok(None)
    }
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
    // Also when called without Engine::new's full validation (a model split over GPUs
    // must never quietly load whole on the CPU).
    args.validate_tensor_parallel()?;
    let explicit_tokenizer = || args.tokenizer.as_deref().map(Tokenizer::from_file).transpose();
    if args.load_format == LoadFormat::Dummy {
        return load_dummy(args, with_tokenizer);
    }
    match model_format(args)? {
        ModelFormat::Gguf => {
            // One read of the header serves the config, the tokenizer and the tensors.
            let mut weights = GgufWeights::open(&args.model)?;
            weights.keep_quantized(keep_gguf_quantized(args)?);
            let config = ModelConfig::from_gguf(weights.content()).map_err(|e| in_file(e, &args.model))?;
            let tokenizer = match (with_tokenizer, explicit_tokenizer()?) {
                (false, _) => None,
                (true, Some(t)) => Some(t),
                (true, None) => Some(Tokenizer::from_gguf_metadata(&weights.content().metadata)?),
            };
            if config.architecture == Architecture::Opt {
                return Err(EngineError::unsupported(
                    "OPT from GGUF is not supported (use the HF directory)",
                ));
            }
            let model = load_decoder(config.clone(), &mut weights, args, &open_device(args)?)?;
            Ok((model, config, tokenizer))
        }
        ModelFormat::HfDir => {
            if keep_gguf_quantized(args)? {
                return Err(EngineError::validation(format!(
                    "quantization \"gguf\" needs a .gguf model file, {} is a directory",
                    args.model.display()
                )));
            }
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
            let model: Box<dyn CausalLM> = match config.architecture {
                Architecture::Opt if args.device.is_cuda() => {
                    return Err(EngineError::unsupported("OPT on cuda is not supported yet"));
                }
                Architecture::Opt => {
                    let options =
                        OptOptions::from_hf_json(&json, config.hidden_size).map_err(|e| in_file(e, &config_path))?;
                    Box::new(OptLM::load(config.clone(), options, &mut weights)?)
                }
                _ => load_decoder(config.clone(), &mut weights, args, &open_device(args)?)?,
            };
            Ok((model, config, tokenizer))
        }
    }
}

/// A Llama-family decoder on `device` (opened by `open_device`), from any weight source.
fn load_decoder(
    config: ModelConfig,
    weights: &mut dyn WeightSource,
    args: &EngineArgs,
    device: &candle_core::Device,
) -> Result<Box<dyn CausalLM>> {
    match device {
        candle_core::Device::Cpu => {
            // dtype bfloat16 on the CPU: weights rounded to bf16, compute in float32.
            let format = match args.dtype {
                crate::config::DType::BF16 => crate::backend::cpu::matmul::WeightFormat::Bf16,
                _ => crate::backend::cpu::matmul::WeightFormat::F32,
            };
            Ok(Box::new(DecoderLM::load_as(config, weights, format)?))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) if args.tensor_parallel_size > 1 => {
            Ok(Box::new(crate::models::decoder_cuda_tp::TpDecoderLM::load(
                config,
                weights,
                device,
                args.tensor_parallel_size,
                cuda_dtype(args.dtype),
            )?))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => Ok(Box::new(crate::models::decoder_cuda::CudaDecoderLM::load(
            config,
            weights,
            device,
            cuda_dtype(args.dtype),
        )?)),
        _ => Err(EngineError::unsupported(format!(
            "no model implementation for device {:?} (requested {:?})",
            device.location(),
            args.device
        ))),
    }
}

/// The candle device `args.device` names (CUDA devices are opened here, once per model).
fn open_device(args: &EngineArgs) -> Result<candle_core::Device> {
    match args.device {
        EngineDevice::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        EngineDevice::Cuda(ordinal) => crate::backend::cuda::open_device(ordinal),
        #[cfg(not(feature = "cuda"))]
        EngineDevice::Cuda(_) => Err(EngineError::unsupported(
            "device cuda: this build has no CUDA support (build with the cargo feature `cuda`)",
        )),
    }
}

/// The compute dtype on a GPU: bfloat16 unless asked otherwise.
#[cfg(feature = "cuda")]
fn cuda_dtype(dtype: crate::config::DType) -> candle_core::DType {
    match dtype {
        crate::config::DType::Auto | crate::config::DType::BF16 => candle_core::DType::BF16,
        crate::config::DType::F16 => candle_core::DType::F16,
        crate::config::DType::F32 => candle_core::DType::F32,
    }
}

/// `load_format: "dummy"`: `args.model` is a config.json (or a directory holding one);
/// weights are random, made on the target device.
fn load_dummy(args: &EngineArgs, with_tokenizer: bool) -> Result<Parts> {
    let config_path = if args.model.is_dir() {
        args.model.join("config.json")
    } else {
        args.model.clone()
    };
    let json = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::not_found(format!("{} does not exist", config_path.display())),
        _ => EngineError::validation(format!("cannot read {}: {e}", config_path.display())),
    })?;
    let config = ModelConfig::from_hf_json(&json).map_err(|e| in_file(e, &config_path))?;
    if config.architecture == Architecture::Opt {
        return Err(EngineError::unsupported(
            "load_format dummy is not supported for OPT yet",
        ));
    }
    let tokenizer = match (with_tokenizer, args.tokenizer.as_deref()) {
        (false, _) => None,
        (true, Some(path)) => Some(Tokenizer::from_file(path)?),
        (true, None) if args.model.is_dir() => Some(Tokenizer::from_file(&args.model)?),
        (true, None) => {
            return Err(EngineError::validation(
                "load_format dummy from a config.json file needs an explicit tokenizer",
            ))
        }
    };
    let device = open_device(args)?;
    let mut weights = DummyWeights::new(device.clone(), args.seed)?;
    let model = load_decoder(config.clone(), &mut weights, args, &device)?;
    Ok((model, config, tokenizer))
}

/// Prefixes an error's message with the file it is about.
fn in_file(e: EngineError, file: &std::path::Path) -> EngineError {
    EngineError::new(e.category, format!("{}: {}", file.display(), e.message))
}

/// Whether `args.quantization` asks to keep GGUF blocks quantized.
fn keep_gguf_quantized(args: &EngineArgs) -> Result<bool> {
    match args.quantization.as_deref() {
        None => Ok(false),
        Some("gguf") => Ok(true),
        Some(other) => Err(EngineError::unsupported(format!(
            "quantization {other:?} is not supported (supported: \"gguf\")"
        ))),
    }
}

/// Which runner serves the model at `path`: GGUF files and *ForCausalLM / *LMHeadModel
/// configs generate; BERT encoders and *ForSequenceClassification pool.
pub fn detect_runner(path: &Path) -> Result<Runner> {
    if !path.exists() {
        return Err(EngineError::not_found(format!(
            "model path {} does not exist",
            path.display()
        )));
    }
    if !path.is_dir() {
        return Ok(Runner::Generate);
    }
    let config_path = path.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::not_found(format!("{} does not exist", config_path.display())),
        _ => EngineError::validation(format!("cannot read {}: {e}", config_path.display())),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::validation(format!("{} is not valid JSON: {e}", config_path.display())))?;
    let architecture = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str());
    let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    match architecture {
        Some(a) if a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel") => Ok(Runner::Generate),
        Some(a) if a.ends_with("ForSequenceClassification") || a.starts_with("Bert") => Ok(Runner::Pooling),
        None if model_type == "bert" => Ok(Runner::Pooling),
        None if Architecture::parse(model_type).is_some() => Ok(Runner::Generate),
        other => Err(EngineError::unsupported(format!(
            "{}: cannot tell how to run architecture {}",
            config_path.display(),
            other.unwrap_or(model_type)
        ))),
    }
}

/// Loads a pooling model (BERT) from an HF directory: config.json, model.safetensors and
/// sentence-transformers' 1_Pooling/config.json and modules.json when present.
pub fn load_encoder(args: &EngineArgs) -> Result<(Box<dyn EncoderModel>, EncoderConfig)> {
    if let ModelFormat::Gguf = model_format(args)? {
        return Err(EngineError::unsupported(format!(
            "{}: pooling models load from a Hugging Face directory, not GGUF",
            args.model.display()
        )));
    }
    if keep_gguf_quantized(args)? {
        return Err(EngineError::validation(
            "quantization \"gguf\" needs a .gguf model file",
        ));
    }
    let config = EncoderConfig::from_model_dir(&args.model)?;
    let mut weights = SafetensorsWeights::open(&args.model)?;
    let model = BertModel::load(config.clone(), &mut weights)?;
    Ok((Box::new(model), config))
}
