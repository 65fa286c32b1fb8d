//! Weight formats beyond a single float32 safetensors file: shards with an index, bf16 and
//! f16 weights, and `load` with an explicit tokenizer.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{greedy, read_json, u32s, BlockAllocator};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::{load, load_causal_lm};
use vllm_engine::EngineArgs;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vllm_model_formats_{}_{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Rewrites tiny_llama into `dir` as `shards` files of `dtype` with an index.
fn rewrite_tiny_llama(dir: &Path, shards: usize, dtype: Dtype) {
    let src = common::fixtures_dir().join("tiny/tiny_llama");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut converted: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
    for name in &names {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32);
        let floats = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let data: Vec<u8> = match dtype {
            Dtype::F32 => view.data().to_vec(),
            Dtype::BF16 => floats.flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F16 => floats.flat_map(|x| half::f16::from_f32(x).to_le_bytes()).collect(),
            _ => unreachable!(),
        };
        converted.insert(name.clone(), (view.shape().to_vec(), data));
    }
    let mut weight_map = serde_json::Map::new();
    for (i, group) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = group
            .iter()
            .map(|n| {
                let (shape, data) = &converted[n];
                (n.clone(), TensorView::new(dtype, shape.clone(), data).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in group {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Max |logit - reference| of the prompt's last position, and the greedy ids.
fn run(dir: &Path) -> (f32, Vec<u32>, Vec<u32>) {
    let reference = read_json(common::fixtures_dir().join("tiny/tiny_llama/reference.json"));
    let prompt = u32s(&reference["prompt_token_ids"]);
    let expected_ids = u32s(&reference["greedy_token_ids"]);
    let expected: Vec<f32> = reference["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (model, c) = load_causal_lm(&EngineArgs::new(dir)).unwrap_or_else(|e| panic!("{e}"));
    let mut kv = PagedKvCache::new(c.num_hidden_layers, 16, 4, c.num_key_value_heads, c.head_dim);
    let out = greedy(
        model.as_ref(),
        &mut kv,
        &mut BlockAllocator::new(16),
        &prompt,
        &[],
        expected_ids.len(),
    );
    let diff = out.logits[0]
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    (diff, out.ids, expected_ids)
}

#[test]
fn sharded_f32_safetensors_match_the_single_file() {
    let dir = scratch("sharded");
    rewrite_tiny_llama(&dir, 3, Dtype::F32);
    let (diff, ids, expected) = run(&dir);
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert_eq!(ids, expected);
}

#[test]
fn bf16_and_f16_weights_load_and_stay_close() {
    for (dtype, tolerance) in [(Dtype::BF16, 0.1f32), (Dtype::F16, 0.01)] {
        let dir = scratch(&format!("{dtype:?}"));
        rewrite_tiny_llama(&dir, 1, dtype);
        let (diff, _, _) = run(&dir);
        assert!(diff > 0.0 && diff < tolerance, "{dtype:?}: logits differ by {diff}");
    }
}

#[test]
fn load_with_an_explicit_tokenizer_builds_model_and_tokenizer() {
    let mut args = EngineArgs::new(common::smollm2_gguf());
    args.tokenizer = Some(common::fixtures_dir().join("smollm2_tokenizer.json"));
    let loaded = load(&args).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.vocab_size, 49152);
    assert_eq!(loaded.model.config().num_hidden_layers, 30);
    assert_eq!(
        loaded.tokenizer.encode("Once upon a time", false).unwrap(),
        vec![6403, 1980, 253, 655]
    );
}

#[test]
fn load_gguf_builds_its_tokenizer_from_the_metadata() {
    let loaded = load(&EngineArgs::new(common::smollm2_gguf())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.eos_token_ids, vec![2]);
    assert_eq!(
        loaded.tokenizer.encode("Once upon a time", false).unwrap(),
        vec![6403, 1980, 253, 655]
    );
}
