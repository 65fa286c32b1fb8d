//! Tiny random models of each supported architecture against HF transformers references.

mod common;

use common::{greedy, read_json, u32s, BlockAllocator};
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::models::CausalLM;
use vllm_engine::EngineArgs;

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 64;

fn check_model(name: &str) {
    let dir = common::fixtures_dir().join("tiny").join(name);
    let reference = read_json(dir.join("reference.json"));
    let prompt = u32s(&reference["prompt_token_ids"]);
    let expected_ids = u32s(&reference["greedy_token_ids"]);
    let expected_logits: Vec<f32> = reference["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (model, config) = load_causal_lm(&EngineArgs::new(&dir)).unwrap_or_else(|e| panic!("{name}: {e}"));

    for chunks in [&[][..], &[10, 9][..], &[1, 16][..]] {
        let mut kv = PagedKvCache::new(
            config.num_hidden_layers,
            NUM_BLOCKS,
            BLOCK_SIZE,
            config.num_key_value_heads,
            config.head_dim,
        );
        let mut alloc = BlockAllocator::new(NUM_BLOCKS);
        let run = greedy(
            model.as_ref() as &dyn CausalLM,
            &mut kv,
            &mut alloc,
            &prompt,
            chunks,
            expected_ids.len(),
        );
        let max_diff = run.logits[0]
            .iter()
            .zip(&expected_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(run.logits[0].len(), expected_logits.len(), "{name}: vocab size");
        assert!(
            max_diff < 1e-4,
            "{name} chunks {chunks:?}: last logits differ by {max_diff}"
        );
        assert_eq!(run.ids, expected_ids, "{name} chunks {chunks:?}: greedy ids");
        eprintln!("{name} chunks {chunks:?}: last logits within {max_diff:.1e}");
    }
}

#[test]
fn tiny_llama_matches_reference() {
    check_model("tiny_llama");
}

#[test]
fn tiny_mistral_sliding_window_matches_reference() {
    check_model("tiny_mistral");
}

#[test]
fn tiny_qwen2_bias_and_tied_embeddings_match_reference() {
    check_model("tiny_qwen2");
}

#[test]
fn tiny_qwen3_qk_norm_matches_reference() {
    check_model("tiny_qwen3");
}

#[test]
fn tiny_opt_learned_positions_layernorm_relu_match_reference() {
    check_model("tiny_opt");
}
