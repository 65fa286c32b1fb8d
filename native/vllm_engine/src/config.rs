//! Engine options (EngineArgs, vLLM's names and defaults) and the model's shape (ModelConfig).

use std::path::PathBuf;

use candle_core::quantized::gguf_file;

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

/// Where the model runs: `"cpu"`, `"cuda"` (device 0) or `"cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| EngineError::validation(format!("device must be cpu, cuda or cuda:N; got {other:?}"))),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The device of data-parallel replica `rank` when the engine was asked for `self`:
    /// one GPU per replica, counting from the one named (`cuda` = `cuda:0` gives
    /// `cuda:rank`); CPU replicas all run on the CPU.
    pub fn for_data_parallel_rank(self, rank: usize) -> Device {
        self.for_data_parallel_rank_of(rank, 1)
    }

    /// The first device of data-parallel replica `rank` when each replica is split over
    /// `tensor_parallel_size` GPUs: replica i takes `[i * tp, (i + 1) * tp)` from the first.
    pub fn for_data_parallel_rank_of(self, rank: usize, tensor_parallel_size: usize) -> Device {
        match self {
            Device::Cpu => Device::Cpu,
            Device::Cuda(first) => Device::Cuda(first + rank * tensor_parallel_size.max(1)),
        }
    }
}

/// How weights are obtained (vLLM's `load_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// From the model files (GGUF or safetensors).
    #[default]
    Auto,
    /// Random weights of the shapes a config.json implies: for performance work.
    Dummy,
}

impl LoadFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" | "safetensors" | "gguf" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(EngineError::validation(format!(
                "load_format must be auto or dummy; got {other:?}"
            ))),
        }
    }
}

/// How waiting requests are ordered (vLLM's `scheduling_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// By arrival; `priority` is ignored.
    #[default]
    Fcfs,
    /// By `priority` (lower first), then arrival; may preempt lower-priority requests.
    Priority,
}

impl SchedulingPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fcfs" => Ok(SchedulingPolicy::Fcfs),
            "priority" => Ok(SchedulingPolicy::Priority),
            other => Err(EngineError::validation(format!(
                "scheduling_policy must be \"fcfs\" or \"priority\", got {other:?}"
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
    /// None: the device's default (`CausalLM::batch_defaults`).
    pub max_num_seqs: Option<usize>,
    /// None: the device's default with chunked prefill; without it, at least max_model_len.
    pub max_num_batched_tokens: Option<usize>,
    pub block_size: usize,
    /// Bytes for the KV cache; None: sized from `gpu_memory_utilization`.
    pub kv_cache_memory_bytes: Option<usize>,
    /// On a GPU (vLLM's meaning): the fraction of the card's memory the engine may take
    /// (weights, activations, KV cache). On the CPU: the fraction of the memory available
    /// after loading the weights that the KV cache may take (capped at 1 GiB and at what
    /// max_num_seqs full-length requests need).
    pub gpu_memory_utilization: f64,
    pub scheduling_policy: SchedulingPolicy,
    pub enable_prefix_caching: bool,
    pub enable_chunked_prefill: bool,
    /// Threads for CPU matmuls and attention; None: all cores.
    pub num_threads: Option<usize>,
    /// "gguf": keep a GGUF file's quantized matrices quantized (quantized matmuls);
    /// None: dequantize everything to float32.
    pub quantization: Option<String>,
    pub device: Device,
    /// true: no CUDA graphs, every decode step launched op by op.
    pub enforce_eager: bool,
    /// GPUs one model is split over (vLLM's tensor_parallel_size): `device` and the next
    /// ones, `cuda:first .. cuda:first + N`.
    pub tensor_parallel_size: usize,
    pub load_format: LoadFormat,
    /// Serve LoRA adapters (vLLM's enable_lora).
    pub enable_lora: bool,
    /// Adapters resident at once (slots a step's requests may use together).
    pub max_loras: usize,
    /// Highest adapter rank accepted.
    pub max_lora_rank: usize,
    /// Adapters kept in host memory; None: max_loras.
    pub max_cpu_loras: Option<usize>,
    /// "auto" (from the model: loader::detect_runner), "generate" or "pooling".
    pub runner: String,
    /// Requests allowed to wait beyond the max_num_seqs that run: one more is refused
    /// with `:resource_exhausted`. None: no limit.
    pub max_waiting_requests: Option<usize>,
}

impl EngineArgs {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineArgs {
            model: model.into(),
            tokenizer: None,
            dtype: DType::Auto,
            seed: 0,
            max_model_len: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            block_size: 16,
            kv_cache_memory_bytes: None,
            gpu_memory_utilization: 0.9,
            scheduling_policy: SchedulingPolicy::Fcfs,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            num_threads: None,
            quantization: None,
            device: Device::Cpu,
            enforce_eager: false,
            tensor_parallel_size: 1,
            load_format: LoadFormat::Auto,
            enable_lora: false,
            max_loras: 1,
            max_lora_rank: 16,
            max_cpu_loras: None,
            runner: "auto".to_string(),
            max_waiting_requests: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.enable_lora {
            if self.max_loras == 0 {
                return Err(EngineError::validation("max_loras must be at least 1"));
            }
            if self.max_lora_rank == 0 {
                return Err(EngineError::validation("max_lora_rank must be at least 1"));
            }
            if let Some(cpu) = self.max_cpu_loras {
                if cpu < self.max_loras {
                    return Err(EngineError::validation(format!(
                        "max_cpu_loras ({cpu}) must be at least max_loras ({})",
                        self.max_loras
                    )));
                }
            }
        }
        if self.max_num_seqs == Some(0) {
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
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(EngineError::validation(format!(
                "gpu_memory_utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            )));
        }
        if self.kv_cache_memory_bytes == Some(0) {
            return Err(EngineError::validation("kv_cache_memory_bytes must be positive"));
        }
        if let Some(q) = self.quantization.as_deref() {
            if q != "gguf" {
                return Err(EngineError::unsupported(format!(
                    "quantization {q:?} is not supported (supported: \"gguf\")"
                )));
            }
        }
        if self.device.is_cuda() && !cfg!(feature = "cuda") {
            return Err(EngineError::unsupported(
                "device cuda: this build is CPU-only, without CUDA support (build with the cargo feature `cuda`)",
            ));
        }
        if self.device.is_cuda() && self.quantization.is_some() {
            return Err(EngineError::unsupported("quantization on cuda is not supported yet"));
        }
        if self.max_num_batched_tokens == Some(0) {
            return Err(EngineError::validation("max_num_batched_tokens must be at least 1"));
        }
        self.validate_tensor_parallel()
    }

    /// tensor_parallel_size: at least 1; above 1 only on CUDA (the heads' divisibility
    /// and the GPUs present are checked at load, against the model and the machine).
    pub fn validate_tensor_parallel(&self) -> Result<()> {
        let n = self.tensor_parallel_size;
        if n == 0 {
            return Err(EngineError::validation("tensor_parallel_size must be at least 1"));
        }
        if n > 1 && !cfg!(feature = "cuda") {
            return Err(EngineError::unsupported(format!(
                "tensor_parallel_size {n}: tensor parallelism needs a CUDA build and GPUs; this build is CPU-only"
            )));
        }
        if n > 1 && !self.device.is_cuda() {
            return Err(EngineError::unsupported(format!(
                "tensor_parallel_size {n}: tensor parallelism splits a model over GPUs; device is cpu"
            )));
        }
        if n > 1 && self.enable_lora {
            return Err(EngineError::unsupported(format!(
                "tensor_parallel_size {n} with LoRA adapters is not supported yet"
            )));
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
    /// OPT: learned positions, LayerNorm, ReLU, biases (models/opt.rs).
    Opt,
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

impl Architecture {
    /// Maps an HF `architectures` entry or `model_type` (or a GGUF `general.architecture`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            "OPTForCausalLM" | "opt" => Some(Architecture::Opt),
            _ => None,
        }
    }
}

impl ModelConfig {
    /// Parses a Hugging Face config.json (transformers 4 and 5 spellings).
    pub fn from_hf_json(json: &str) -> Result<ModelConfig> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| EngineError::validation(format!("config.json is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| EngineError::validation("config.json must hold a JSON object"))?;
        let architecture = hf_architecture(obj)?;

        let usize_key = |key: &str| -> Result<usize> {
            obj.get(key)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| {
                    EngineError::validation(format!("config.json: {key} is missing or not a non-negative integer"))
                })
        };
        let opt_usize = |key: &str| obj.get(key).and_then(|x| x.as_u64()).map(|x| x as usize);

        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(EngineError::validation(
                "config.json: hidden_size and num_attention_heads must be positive",
            ));
        }
        let num_key_value_heads = opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 moved rope_theta under rope_parameters.
        let rope_theta = obj
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| obj.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or(10_000.0);
        // Scaled rotary variants (llama3, yarn, linear...) would silently give wrong logits.
        let rope_type = ["rope_parameters", "rope_scaling"]
            .iter()
            .filter_map(|k| obj.get(*k))
            .filter_map(|p| p.get("rope_type").or_else(|| p.get("type")))
            .filter_map(|t| t.as_str())
            .find(|t| *t != "default");
        if let Some(t) = rope_type {
            return Err(EngineError::unsupported(format!(
                "rope type {t:?} is not supported yet (only default rotary)"
            )));
        }
        let sliding_window = match architecture {
            Architecture::Mistral => opt_usize("sliding_window"),
            Architecture::Qwen2 | Architecture::Qwen3 => {
                let enabled = obj.get("use_sliding_window").and_then(|x| x.as_bool()).unwrap_or(false);
                if enabled {
                    opt_usize("sliding_window")
                } else {
                    None
                }
            }
            Architecture::Llama | Architecture::Opt => None,
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => ids.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => Vec::new(),
        };
        let config = ModelConfig {
            architecture,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            // OPT calls it ffn_dim.
            intermediate_size: match architecture {
                Architecture::Opt => usize_key("ffn_dim")?,
                _ => usize_key("intermediate_size")?,
            },
            num_hidden_layers: usize_key("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            // OPT's LayerNorm eps is fixed at 1e-5 (no config key).
            rms_norm_eps: match architecture {
                Architecture::Opt => 1e-5,
                _ => obj.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            },
            rope_theta,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(4096),
            sliding_window,
            // transformers' default is tied; Llama-family configs default to untied.
            tie_word_embeddings: obj
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(architecture == Architecture::Opt),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => obj.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            },
            bos_token_id: obj.get("bos_token_id").and_then(|x| x.as_u64()).map(|x| x as u32),
            eos_token_ids,
        };
        config.check()?;
        Ok(config)
    }

    /// Reads the model shape from GGUF metadata (`{arch}.*` keys, `tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<ModelConfig> {
        let md = &content.metadata;
        let arch_name = match md.get("general.architecture") {
            Some(gguf_file::Value::String(s)) => s.clone(),
            _ => return Err(EngineError::validation("GGUF metadata lacks general.architecture")),
        };
        let architecture = Architecture::parse(&arch_name)
            .ok_or_else(|| EngineError::unsupported(format!("GGUF architecture {arch_name:?} is not supported")))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            gguf_usize(md, &key(k))?.ok_or_else(|| EngineError::validation(format!("GGUF metadata lacks {}", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(EngineError::validation("GGUF metadata: attention.head_count is 0"));
        }
        let num_key_value_heads = gguf_usize(md, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        let head_dim = gguf_usize(md, &key("attention.key_length"))?.unwrap_or(hidden_size / num_attention_heads);
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => match content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims()[0],
                None => {
                    return Err(EngineError::validation(
                        "GGUF file has neither tokenizer.ggml.tokens nor token_embd.weight",
                    ))
                }
            },
        };
        let sliding_window = gguf_usize(md, &key("attention.sliding_window"))?.filter(|&w| w > 0);
        let scaling = match md.get(&key("rope.scaling.type")) {
            Some(gguf_file::Value::String(s)) if s != "none" => Some(s.clone()),
            _ => None,
        };
        if let Some(s) = scaling.or_else(|| {
            content
                .tensor_infos
                .contains_key("rope_freqs.weight")
                .then(|| "rope_freqs".into())
        }) {
            return Err(EngineError::unsupported(format!(
                "GGUF rope scaling {s:?} is not supported yet (only default rotary)"
            )));
        }
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: gguf_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: gguf_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: gguf_usize(md, &key("context_length"))?.unwrap_or(4096),
            sliding_window,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: gguf_usize(md, "tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_ids: gguf_usize(md, "tokenizer.ggml.eos_token_id")?
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
        };
        config.check()?;
        Ok(config)
    }

    /// Shape checks that would otherwise surface as panics or nonsense deep in the forward.
    fn check(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(EngineError::validation(format!(
                    "model config: {name} must be positive"
                )));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(EngineError::validation(format!(
                "model config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.architecture != Architecture::Opt && !self.head_dim.is_multiple_of(2) {
            return Err(EngineError::validation(format!(
                "model config: head_dim {} must be even for rotary",
                self.head_dim
            )));
        }
        Ok(())
    }
}

fn hf_architecture(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Architecture> {
    let from_list = obj
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str());
    let model_type = obj.get("model_type").and_then(|m| m.as_str());
    from_list
        .and_then(Architecture::parse)
        .or_else(|| model_type.and_then(Architecture::parse))
        .ok_or_else(|| {
            EngineError::unsupported(format!(
                "model architecture {} is not supported (supported: Llama, Mistral, Qwen2, Qwen3, OPT)",
                from_list.or(model_type).unwrap_or("<none given>")
            ))
        })
}

/// An integer metadata value of any width; Ok(None) when absent.
fn gguf_usize(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    let v = match md.get(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let n: i128 = match v {
        V::U8(x) => *x as i128,
        V::I8(x) => *x as i128,
        V::U16(x) => *x as i128,
        V::I16(x) => *x as i128,
        V::U32(x) => *x as i128,
        V::I32(x) => *x as i128,
        V::U64(x) => *x as i128,
        V::I64(x) => *x as i128,
        _ => {
            return Err(EngineError::validation(format!(
                "GGUF metadata {key} is not an integer"
            )))
        }
    };
    usize::try_from(n)
        .map(Some)
        .map_err(|_| EngineError::validation(format!("GGUF metadata {key} = {n} is out of range")))
}

fn gguf_f64(md: &std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    match md.get(key)? {
        gguf_file::Value::F32(x) => Some(*x as f64),
        gguf_file::Value::F64(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{Device, EngineArgs};
    use crate::error::ErrorCategory;

    #[test]
    fn data_parallel_replicas_take_one_gpu_each_from_the_named_one() {
        let cuda = Device::parse("cuda").ok();
        assert_eq!(cuda.map(|d| d.for_data_parallel_rank(1)), Some(Device::Cuda(1)));
        assert_eq!(Device::Cuda(2).for_data_parallel_rank(0), Device::Cuda(2));
        assert_eq!(Device::Cuda(2).for_data_parallel_rank(3), Device::Cuda(5));
        assert_eq!(Device::Cpu.for_data_parallel_rank(4), Device::Cpu);
    }

    #[test]
    fn data_parallel_replicas_of_tensor_parallel_size_take_consecutive_gpu_ranges() {
        assert_eq!(Device::Cuda(0).for_data_parallel_rank_of(0, 2), Device::Cuda(0));
        assert_eq!(Device::Cuda(0).for_data_parallel_rank_of(1, 2), Device::Cuda(2));
        assert_eq!(Device::Cuda(1).for_data_parallel_rank_of(2, 4), Device::Cuda(9));
        assert_eq!(Device::Cpu.for_data_parallel_rank_of(1, 2), Device::Cpu);
    }

    #[test]
    fn tensor_parallel_size_is_checked_before_loading() {
        let mut args = EngineArgs::new("model.gguf");
        args.tensor_parallel_size = 0;
        let err = args.validate().expect_err("0 ranks");
        assert_eq!(err.category, ErrorCategory::Validation);
        assert!(err.message.contains("tensor_parallel_size"), "{}", err.message);
        // Above 1 on the CPU: refused whatever the build (no GPUs to split over).
        args.tensor_parallel_size = 2;
        let err = args.validate().expect_err("TP on the CPU");
        assert_eq!(err.category, ErrorCategory::Unsupported);
        assert!(err.message.contains("tensor_parallel_size 2"), "{}", err.message);
        args.device = Device::Cuda(0);
        if cfg!(feature = "cuda") {
            assert!(args.validate().is_ok(), "TP on CUDA is accepted before loading");
        } else {
            let err = args.validate().expect_err("TP in a CPU-only build");
            assert_eq!(err.category, ErrorCategory::Unsupported);
        }
    }
}
