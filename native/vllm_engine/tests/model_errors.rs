//! Bad model inputs give errors of the right category and never panic.

mod common;

use std::path::PathBuf;

use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::{load, load_causal_lm};
use vllm_engine::models::{ForwardBatch, SeqSlice};
use vllm_engine::{EngineArgs, ErrorCategory};

/// A scratch directory of this test process, removed by the OS's temp cleaning.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vllm_model_errors_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn load_error(path: PathBuf) -> vllm_engine::EngineError {
    match load_causal_lm(&EngineArgs::new(path)) {
        Ok(_) => panic!("loading was expected to fail"),
        Err(e) => e,
    }
}

#[test]
fn missing_path_is_not_found() {
    let e = load_error(PathBuf::from("/nonexistent/model.gguf"));
    assert_eq!(e.category, ErrorCategory::NotFound, "{e}");
    let e = match load(&EngineArgs::new("/nonexistent/dir")) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert_eq!(e.category, ErrorCategory::NotFound, "{e}");
}

#[test]
fn truncated_gguf_is_a_validation_error_naming_the_file() {
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    let path = scratch("truncated.gguf");
    std::fs::write(&path, &bytes[..1 << 20]).unwrap();
    let e = load_error(path.clone());
    assert_eq!(e.category, ErrorCategory::Validation, "{e}");
    assert!(e.message.contains("truncated.gguf"), "{e}");
}

#[test]
fn gguf_with_intact_header_but_missing_tensor_data_is_a_validation_error() {
    // Keep the whole header (metadata and tensor index) but cut the tensor data short.
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    let path = scratch("cut_data.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(path);
    assert_eq!(e.category, ErrorCategory::Validation, "{e}");
    assert!(e.message.contains("cut_data.gguf"), "{e}");
}

#[test]
fn garbage_file_is_a_validation_error() {
    let path = scratch("garbage.gguf");
    let garbage: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, garbage).unwrap();
    let e = load_error(path);
    assert_eq!(e.category, ErrorCategory::Validation, "{e}");
    let path = scratch("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    assert_eq!(load_error(path).category, ErrorCategory::Validation);
}

#[test]
fn gguf_magic_with_absurd_lengths_is_a_validation_error() {
    // Valid magic and version, then a metadata count and a string length far beyond the file.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    bytes.extend_from_slice(b"abc");
    let path = scratch("absurd.gguf");
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(load_error(path).category, ErrorCategory::Validation);
}

#[test]
fn directory_without_config_is_not_found() {
    let dir = scratch("empty_dir");
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(load_error(dir).category, ErrorCategory::NotFound);
}

#[test]
fn unknown_architecture_is_unsupported() {
    let src = common::fixtures_dir().join("tiny/tiny_llama");
    let dir = scratch("unknown_architecture");
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let config = config
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let e = load_error(dir);
    assert_eq!(e.category, ErrorCategory::Unsupported, "{e}");
    assert!(e.message.contains("GPTNeoXForCausalLM"), "{e}");
}

#[test]
fn truncated_safetensors_is_a_validation_error_naming_the_file() {
    let src = common::fixtures_dir().join("tiny/tiny_llama");
    let dir = scratch("truncated_safetensors");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() - 100]).unwrap();
    let e = load_error(dir);
    assert_eq!(e.category, ErrorCategory::Validation, "{e}");
    assert!(e.message.contains("model.safetensors"), "{e}");
}

#[test]
fn out_of_vocabulary_token_and_short_block_table_are_errors() {
    let (model, config) = load_causal_lm(&EngineArgs::new(common::fixtures_dir().join("tiny/tiny_llama"))).unwrap();
    let mut kv = PagedKvCache::new(
        config.num_hidden_layers,
        4,
        4,
        config.num_key_value_heads,
        config.head_dim,
    );
    let seq = SeqSlice {
        query_start: 0,
        query_len: 1,
        context_len: 1,
        block_table: vec![0],
        want_logits: true,
        logits_for_all_tokens: false,
        lora_slot: None,
    };
    let batch = ForwardBatch {
        token_ids: vec![config.vocab_size as u32],
        positions: vec![0],
        seqs: vec![seq.clone()],
        lookahead: false,
    };
    assert_eq!(
        model.forward(&batch, &mut kv).unwrap_err().category,
        ErrorCategory::Validation
    );

    let short = SeqSlice {
        query_len: 6,
        context_len: 6,
        ..seq
    };
    let batch = ForwardBatch {
        token_ids: vec![1; 6],
        positions: (0..6).collect(),
        seqs: vec![short],
        lookahead: false,
    };
    assert!(model.forward(&batch, &mut kv).is_err());
}

#[test]
fn quantization_option_is_checked() {
    let mut args = EngineArgs::new(common::fixtures_dir().join("tiny/tiny_llama"));
    args.quantization = Some("gguf".into());
    let e = load_causal_lm(&args).err().expect("gguf quantization of a directory");
    assert_eq!(e.category, ErrorCategory::Validation, "{e}");
    args.quantization = Some("awq".into());
    assert_eq!(args.validate().unwrap_err().category, ErrorCategory::Unsupported);
    let e = load_causal_lm(&args).err().expect("unknown quantization");
    assert_eq!(e.category, ErrorCategory::Unsupported, "{e}");
}

#[test]
fn pooling_loader_rejects_decoders_and_gguf() {
    use vllm_engine::loader::load_encoder;
    let e = load_encoder(&EngineArgs::new(common::smollm2_gguf()))
        .err()
        .expect("GGUF encoder");
    assert_eq!(e.category, ErrorCategory::Unsupported, "{e}");
    let e = load_encoder(&EngineArgs::new(common::fixtures_dir().join("tiny/tiny_llama")))
        .err()
        .expect("decoder");
    assert_eq!(e.category, ErrorCategory::Unsupported, "{e}");
}
