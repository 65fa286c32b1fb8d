//! One PEFT LoRA adapter read from `adapter_config.json` + `adapter_model.safetensors`,
//! checked against the base model's shapes and kept as f32 A [r, in] and (scale·B)ᵀ [r, out].

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, Result};

/// The projections an adapter may target, in the order the model applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.module_name() == name)
    }

    /// (in, out) features of this projection in a Llama-family decoder.
    fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Self::Q => (h, q),
            Self::K | Self::V => (h, kv),
            Self::O => (q, h),
            Self::Gate | Self::Up => (h, i),
            Self::Down => (i, h),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One projection's low-rank pair: A [rank, in] as stored, and B packed for the expand as
/// its transpose with the adapter's scale folded in, `b_t` [rank, out] = (scale · B)ᵀ.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b_t: Vec<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LoraPair {
    /// From PEFT's A [rank, in] and B [out, rank], row-major, and the adapter's scale.
    pub fn new(a: Vec<f32>, b: Vec<f32>, rank: usize, in_features: usize, out_features: usize, scale: f32) -> Self {
        let mut b_t = vec![0.0f32; rank * out_features];
        for (o, b_row) in b.chunks_exact(rank).enumerate() {
            for (j, &v) in b_row.iter().enumerate() {
                b_t[j * out_features + o] = v * scale;
            }
        }
        LoraPair {
            a,
            b_t,
            rank,
            in_features,
            out_features,
        }
    }

    fn bytes(&self) -> usize {
        (self.a.len() + self.b_t.len()) * 4
    }
}

/// A loaded adapter: per layer, one optional pair per target.
#[derive(Debug)]
pub struct LoraAdapter {
    pub rank: usize,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA (already folded into each pair's `b_t`).
    pub scale: f32,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    pub fn pair(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[target.index()].as_ref())
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(LoraPair::bytes).sum()
    }

    /// Bytes of the largest adapter one device slot may have to hold: rank `rank` on all
    /// seven targets of every layer, A and (scale·B)ᵀ in `elem_bytes` storage. The GPU
    /// keeps `max_loras` of these out of the KV cache's share.
    pub fn slot_bytes(c: &ModelConfig, rank: usize, elem_bytes: usize) -> usize {
        let per_rank: usize = LoraTarget::ALL
            .into_iter()
            .map(|t| {
                let (i, o) = t.dims(c);
                i + o
            })
            .sum();
        c.num_hidden_layers * per_rank * rank * elem_bytes
    }

    /// Reads and checks the adapter at `dir` for a model of config `c`. Missing directory
    /// or files: `:not_found`; rank above `max_rank`, a target the model lacks, missing
    /// or mis-shaped tensors: `:validation`.
    pub fn load(dir: &Path, c: &ModelConfig, max_rank: usize) -> Result<LoraAdapter> {
        if !dir.is_dir() {
            return Err(EngineError::not_found(format!(
                "LoRA adapter directory {} does not exist",
                dir.display()
            )));
        }
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::not_found(format!("{} does not exist", config_path.display())),
            _ => EngineError::validation(format!("cannot read {}: {e}", config_path.display())),
        })?;
        let cfg: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::validation(format!("{}: not a PEFT LoRA config: {e}", config_path.display())))?;
        if let Some(kind) = cfg.peft_type.as_deref() {
            if kind != "LORA" {
                return Err(EngineError::validation(format!(
                    "{}: peft_type {kind:?} is not LORA",
                    config_path.display()
                )));
            }
        }
        if cfg.use_dora {
            return Err(EngineError::validation(format!(
                "{}: DoRA adapters are not supported",
                config_path.display()
            )));
        }
        if cfg.r == 0 || cfg.r > max_rank {
            return Err(EngineError::validation(format!(
                "LoRA rank {} of {} is outside 1..={max_rank} (max_lora_rank)",
                cfg.r,
                dir.display()
            )));
        }
        if !matches!(
            c.architecture,
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3
        ) {
            return Err(EngineError::unsupported(format!(
                "LoRA is not supported for {:?} models",
                c.architecture
            )));
        }
        let targets = cfg
            .target_modules
            .iter()
            .map(|name| {
                LoraTarget::parse(name).ok_or_else(|| {
                    EngineError::validation(format!(
                        "LoRA target module {name:?} of {} is not a projection of this model (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                        dir.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(EngineError::not_found(format!(
                "{} does not exist",
                weights_path.display()
            )));
        }
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
            EngineError::validation(format!("{}: cannot read safetensors: {e}", weights_path.display()))
        })?;
        let rank = cfg.r;
        let scale = if cfg.use_rslora {
            cfg.lora_alpha / (rank as f32).sqrt()
        } else {
            cfg.lora_alpha / rank as f32
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut found = 0usize;
        for layer in 0..c.num_hidden_layers {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for &t in &targets {
                let (inf, outf) = t.dims(c);
                let base = format!(
                    "base_model.model.model.layers.{layer}.{}.{}",
                    t.parent(),
                    t.module_name()
                );
                let a = tensors.get(&format!("{base}.lora_A.weight"));
                let b = tensors.get(&format!("{base}.lora_B.weight"));
                let (a, b) = match (a, b) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => continue,
                    _ => {
                        return Err(EngineError::validation(format!(
                            "{}: {base} has only one of lora_A and lora_B",
                            weights_path.display()
                        )))
                    }
                };
                let a = checked(a, &[rank, inf], &format!("{base}.lora_A.weight"), &weights_path)?;
                let b = checked(b, &[outf, rank], &format!("{base}.lora_B.weight"), &weights_path)?;
                pairs[t.index()] = Some(LoraPair::new(a, b, rank, inf, outf, scale));
                found += 1;
            }
            layers.push(pairs);
        }
        if found == 0 {
            return Err(EngineError::validation(format!(
                "{}: no LoRA weights for the target modules of this model",
                weights_path.display()
            )));
        }
        if let Some(name) = tensors
            .keys()
            .find(|k| !k.contains(".lora_A.") && !k.contains(".lora_B."))
        {
            return Err(EngineError::validation(format!(
                "{}: tensor {name} is not a LoRA A/B weight (modules_to_save and embeddings are not supported)",
                weights_path.display()
            )));
        }
        Ok(LoraAdapter { rank, scale, layers })
    }
}

fn checked(t: &Tensor, shape: &[usize], name: &str, file: &Path) -> Result<Vec<f32>> {
    if t.dims() != shape {
        return Err(EngineError::validation(format!(
            "{}: {name} has shape {:?}, the model and rank imply {:?}",
            file.display(),
            t.dims(),
            shape
        )));
    }
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[derive(serde::Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f32,
    #[serde(default, deserialize_with = "one_or_many")]
    target_modules: Vec<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    peft_type: Option<String>,
}

/// PEFT writes target_modules as a list, or as one string (a regex we do not support as such).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
        Null(()),
    }
    use serde::Deserialize;
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
        OneOrMany::Null(()) => Vec::new(),
    })
}
