//! ModelConfig from HF config.json and GGUF metadata.

mod common;

use vllm_engine::config::{Architecture, ModelConfig};
use vllm_engine::ErrorCategory;

fn tiny(name: &str) -> ModelConfig {
    let text = std::fs::read_to_string(common::fixtures_dir().join("tiny").join(name).join("config.json")).unwrap();
    ModelConfig::from_hf_json(&text).unwrap()
}

#[test]
fn transformers5_configs_parse() {
    let llama = tiny("tiny_llama");
    assert_eq!(llama.architecture, Architecture::Llama);
    assert_eq!(
        (
            llama.hidden_size,
            llama.num_attention_heads,
            llama.num_key_value_heads,
            llama.head_dim
        ),
        (64, 4, 2, 16)
    );
    assert_eq!(llama.rope_theta, 10000.0);
    assert_eq!(llama.eos_token_ids, vec![2]);
    assert!(!llama.tie_word_embeddings);

    let mistral = tiny("tiny_mistral");
    assert_eq!(mistral.sliding_window, Some(8));

    let qwen2 = tiny("tiny_qwen2");
    assert_eq!(qwen2.architecture, Architecture::Qwen2);
    assert!(qwen2.attention_bias && qwen2.tie_word_embeddings);
    assert_eq!(qwen2.sliding_window, None);
    assert_eq!(qwen2.head_dim, 16, "absent head_dim is hidden / heads");
    assert_eq!(qwen2.rope_theta, 1_000_000.0);

    let qwen3 = tiny("tiny_qwen3");
    assert_eq!((qwen3.architecture, qwen3.head_dim), (Architecture::Qwen3, 32));
}

#[test]
fn transformers4_config_with_top_level_rope_theta_parses() {
    let text = std::fs::read_to_string(common::fixtures_dir().join("smollm2_config.json")).unwrap();
    let c = ModelConfig::from_hf_json(&text).unwrap();
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(
        (c.num_hidden_layers, c.vocab_size, c.intermediate_size),
        (30, 49152, 1536)
    );
    assert!(c.tie_word_embeddings);
}

#[test]
fn eos_list_and_qwen2_sliding_window_switch() {
    let json = r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,"eos_token_id":[2,7],
        "use_sliding_window":true,"sliding_window":32}"#;
    let c = ModelConfig::from_hf_json(json).unwrap();
    assert_eq!(c.eos_token_ids, vec![2, 7]);
    assert_eq!(c.sliding_window, Some(32));
    assert_eq!(c.num_key_value_heads, 4);
}

#[test]
fn bad_configs_are_errors() {
    assert_eq!(
        ModelConfig::from_hf_json("{").unwrap_err().category,
        ErrorCategory::Validation
    );
    let no_hidden = r#"{"architectures":["LlamaForCausalLM"],"num_attention_heads":4}"#;
    assert_eq!(
        ModelConfig::from_hf_json(no_hidden).unwrap_err().category,
        ErrorCategory::Validation
    );
    let llama3_rope = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,
        "rope_scaling":{"rope_type":"llama3","factor":32.0}}"#;
    assert_eq!(
        ModelConfig::from_hf_json(llama3_rope).unwrap_err().category,
        ErrorCategory::Unsupported
    );
    let bert = r#"{"architectures":["BertModel"],"hidden_size":64}"#;
    assert_eq!(
        ModelConfig::from_hf_json(bert).unwrap_err().category,
        ErrorCategory::Unsupported
    );
}

#[test]
fn smollm2_gguf_metadata_gives_the_documented_shape() {
    let mut file = std::fs::File::open(common::smollm2_gguf()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let c = ModelConfig::from_gguf(&content).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (576, 30, 9, 3)
    );
    assert_eq!((c.head_dim, c.intermediate_size, c.vocab_size), (64, 1536, 49152));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5f32 as f64));
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
}

#[test]
fn opt_config_parses() {
    let opt = tiny("tiny_opt");
    assert_eq!(opt.architecture, Architecture::Opt);
    assert_eq!(
        (opt.intermediate_size, opt.head_dim, opt.num_key_value_heads),
        (128, 16, 4)
    );
    assert!(opt.tie_word_embeddings);
    assert_eq!(opt.max_position_embeddings, 256);
}
