//! SmolLM2 GGUF kept quantized (`quantization: "gguf"`, quantized matmuls) against the same
//! file dequantized to float32.

mod common;

use std::time::Instant;

use common::{greedy, read_json, step, u32s, BlockAllocator, TestSeq};
use vllm_engine::config::ModelConfig;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::models::CausalLM;
use vllm_engine::EngineArgs;

type Model = (Box<dyn CausalLM>, ModelConfig);

fn load(quantized: bool) -> Model {
    let mut args = EngineArgs::new(common::smollm2_gguf());
    args.quantization = quantized.then(|| "gguf".to_string());
    load_causal_lm(&args).unwrap_or_else(|e| panic!("cannot load SmolLM2 (quantized {quantized}): {e}"))
}

fn prompts() -> Vec<(String, Vec<u32>)> {
    let reference = read_json(common::fixtures_dir().join("smollm2_reference.json"));
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), u32s(&c["prompt_token_ids"])))
        .collect()
}

fn run(model: &Model, prompt: &[u32], chunks: &[usize]) -> Vec<u32> {
    // The model's own cache, as the engine makes it (bfloat16 for the quantized model).
    let mut kv = model.0.new_kv_cache(32, 16).expect("kv cache");
    let mut alloc = BlockAllocator::new(32);
    greedy(model.0.as_ref(), &mut kv, &mut alloc, prompt, chunks, 32).ids
}

#[test]
fn smollm2_quantized_greedy_matches_dequantized_and_uses_less_memory() {
    let f32_model = load(false);
    let q_model = load(true);
    let (f32_bytes, q_bytes) = (f32_model.0.weight_bytes(), q_model.0.weight_bytes());
    eprintln!(
        "resident weights: f32 {:.1} MiB, quantized {:.1} MiB ({:.1}%)",
        f32_bytes as f64 / 1048576.0,
        q_bytes as f64 / 1048576.0,
        100.0 * q_bytes as f64 / f32_bytes as f64
    );
    assert!(
        f32_bytes > 0 && q_bytes * 10 <= f32_bytes * 4,
        "quantized weights must be <= 40% of f32"
    );
    // A quantized model's KV cache is bfloat16, as GGUF's half-precision compute in vLLM.
    assert_eq!(
        q_model.0.kv_bytes_per_block(16) * 2,
        f32_model.0.kv_bytes_per_block(16),
        "a quantized model caches keys and values in bfloat16"
    );

    for (name, prompt) in prompts() {
        let reference = run(&f32_model, &prompt, &[]);
        // Chunked prefill on the quantized side too: the blocks path must not depend on it.
        let quantized = run(&q_model, &prompt, &[prompt.len() / 2]);
        let agree = reference.iter().zip(&quantized).filter(|(a, b)| a == b).count();
        let prefix = reference.iter().zip(&quantized).take_while(|(a, b)| a == b).count();
        eprintln!("case {name}: {agree}/32 greedy ids agree (first {prefix} in a row)");
        assert_eq!(quantized[..8], reference[..8], "case {name}: first 8 greedy ids");
    }
}

#[test]
#[ignore = "timing report, not a check"]
fn smollm2_quantized_vs_f32_decode_timing() {
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 37 % 5000).collect();
    for quantized in [false, true] {
        let t = Instant::now();
        let model = load(quantized);
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut kv = model.0.new_kv_cache(64, 16).expect("kv cache");
        let mut alloc = BlockAllocator::new(64);
        let mut seqs = [TestSeq::new(&prompt)];
        let t = Instant::now();
        step(model.0.as_ref(), &mut kv, &mut alloc, &mut seqs, &[128]);
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        let steps = 32;
        let t = Instant::now();
        for _ in 0..steps {
            seqs[0].tokens.push(42);
            step(model.0.as_ref(), &mut kv, &mut alloc, &mut seqs, &[1]);
        }
        let per_step = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "{}: load {load_ms:.0} ms, weights {:.1} MiB, prefill 128 {prefill_ms:.0} ms, decode batch 1 {:.1} ms/step ({:.1} tok/s)",
            if quantized { "quantized (gguf)" } else { "f32 (dequantized)" },
            model.0.weight_bytes() as f64 / 1048576.0,
            per_step * 1e3,
            1.0 / per_step
        );
    }
}
