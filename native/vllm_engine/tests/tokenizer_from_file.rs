//! tokenizer.json plus the tokenizer_config.json beside it.

use std::path::PathBuf;

use vllm_engine::tokenizer::{ChatMessage, Tokenizer};
use vllm_engine::ErrorCategory;

/// shared/fixtures beside the repository; VLLM_FIXTURES_DIR overrides it (worktrees).
fn fixtures() -> String {
    let dir = std::env::var("VLLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures").to_string());
    assert!(
        std::path::Path::new(&dir).is_dir(),
        "fixtures directory {dir} missing; set VLLM_FIXTURES_DIR"
    );
    dir
}

/// A fresh model directory holding the fixture tokenizer.json and the given config.
fn model_dir(name: &str, tokenizer_config: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vllm_tokenizer_{name}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        format!("{}/smollm2_tokenizer.json", fixtures()),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    if let Some(config) = tokenizer_config {
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
    }
    dir
}

#[test]
fn from_file_reads_special_tokens_and_template_from_tokenizer_config() {
    let template = std::fs::read_to_string(format!("{}/smollm2_chat_template.jinja", fixtures())).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "lstrip": false},
        "eos_token": "<|im_end|>",
        "chat_template": template,
    });
    let dir = model_dir("config", Some(&config.to_string()));
    // Both the directory and the tokenizer.json path inside it work.
    for path in [dir.clone(), dir.join("tokenizer.json")] {
        let tokenizer = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tokenizer.bos_token_id(), Some(1));
        assert_eq!(tokenizer.eos_token_id(), Some(2));
        assert_eq!(tokenizer.chat_template(), Some(template.as_str()));
        let prompt = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "Hi")], true, None)
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(tokenizer.is_special(2) && !tokenizer.is_special(19556));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn from_file_takes_the_default_of_named_templates() {
    let config =
        r#"{"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]}"#;
    let dir = model_dir("named", Some(config));
    let tokenizer = Tokenizer::from_file(&dir).unwrap();
    assert_eq!(tokenizer.chat_template(), Some("DEFAULT"));
    assert_eq!(tokenizer.bos_token_id(), None);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn from_file_without_config_has_no_template() {
    let dir = model_dir("bare", None);
    let tokenizer = Tokenizer::from_file(&dir).unwrap();
    assert_eq!(tokenizer.chat_template(), None);
    assert_eq!(tokenizer.encode("Hello", true).unwrap(), vec![19556]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn from_file_errors_are_clear() {
    let missing = Tokenizer::from_file(std::path::Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert_eq!(missing.category, ErrorCategory::NotFound);

    let dir = model_dir("broken", Some("{not json"));
    let broken = Tokenizer::from_file(&dir).unwrap_err();
    assert_eq!(broken.category, ErrorCategory::Validation);
    assert!(broken.message.contains("tokenizer_config.json"), "{}", broken.message);
    std::fs::remove_dir_all(&dir).ok();
}
