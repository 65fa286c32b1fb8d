//! `--lora-adapters N [--lora-rank R]`: issue 8's measurement. N random PEFT adapters of
//! rank R (default 16) on all seven projections are written for the model's shape and
//! added to every engine; each run of the workload then goes once on the base model and
//! once with every request on one of the N adapters (round robin), in the same engine,
//! and the ratio of the two throughputs is reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vllm_engine::lora::LoRARequest;
use vllm_engine::ModelConfig;

const MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// (in, out) features of a projection of a Llama-family decoder.
fn dims(c: &ModelConfig, module: &str) -> (usize, usize) {
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h),
    }
}

fn random(rng: &mut ChaCha8Rng, shape: (usize, usize), amplitude: f32) -> Result<Tensor, String> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-amplitude..amplitude))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Writes adapter `k` (seeded by k) under `root` and returns its request.
fn write_adapter(root: &Path, c: &ModelConfig, k: u32, rank: usize) -> Result<LoRARequest, String> {
    let dir = root.join(format!("adapter-{k}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + k as u64);
    let mut tensors = HashMap::new();
    for layer in 0..c.num_hidden_layers {
        for (parent, module) in MODULES {
            let (inf, outf) = dims(c, module);
            let base = format!("base_model.model.model.layers.{layer}.{parent}.{module}");
            // Small values: the deltas perturb, they do not swamp, the base outputs.
            tensors.insert(format!("{base}.lora_A.weight"), random(&mut rng, (rank, inf), 0.02)?);
            tensors.insert(format!("{base}.lora_B.weight"), random(&mut rng, (outf, rank), 0.02)?);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": MODULES.iter().map(|m| m.1).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).map_err(|e| e.to_string())?;
    Ok(LoRARequest::new(format!("bench-{k}"), k + 1, dir))
}

/// `n` random adapters of rank `rank` for the model of `c`, in a fresh temp directory.
pub fn random_adapters(c: &ModelConfig, n: usize, rank: usize) -> Result<(PathBuf, Vec<LoRARequest>), String> {
    let root = std::env::temp_dir().join(format!("vllm-bench-lora-{}", std::process::id()));
    let adapters = (0..n as u32)
        .map(|k| write_adapter(&root, c, k, rank))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((root, adapters))
}
