//! Chat templates rendered as transformers renders them.

use std::sync::OnceLock;

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

/// The fixture tokenizer.json alone: it has no chat template of its own.
fn bare_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = format!("{}/smollm2_tokenizer.json", fixtures());
        Tokenizer::from_file(std::path::Path::new(&path)).expect("fixture tokenizer")
    })
}

fn smollm2_template() -> String {
    std::fs::read_to_string(format!("{}/smollm2_chat_template.jinja", fixtures())).expect("template fixture")
}

const SMOLLM2_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn smollm2_template_renders_a_user_turn_with_generation_prompt() {
    let prompt = bare_tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true, Some(&smollm2_template()))
        .unwrap();
    assert_eq!(
        prompt,
        format!("{SMOLLM2_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn smollm2_template_matches_the_fixture_chat_prompt_ids() {
    // The chat_math reference case is this conversation rendered by transformers.
    let prompt = bare_tokenizer()
        .apply_chat_template(
            &[ChatMessage::new("user", "What is 2+2?")],
            true,
            Some(&smollm2_template()),
        )
        .unwrap();
    let text = std::fs::read_to_string(format!("{}/smollm2_reference.json", fixtures())).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chat_math")
        .unwrap();
    assert_eq!(prompt, case["text"].as_str().unwrap());
    let expected: Vec<u32> = case["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(bare_tokenizer().encode(&prompt, true).unwrap(), expected);
}

#[test]
fn smollm2_template_keeps_a_given_system_prompt_and_omits_generation_prompt() {
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
    ];
    let prompt = bare_tokenizer()
        .apply_chat_template(&messages, false, Some(&smollm2_template()))
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

#[test]
fn missing_template_is_a_validation_error() {
    let error = bare_tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true, None)
        .unwrap_err();
    assert_eq!(error.category, ErrorCategory::Validation);
    assert!(error.message.contains("has no chat template"), "{}", error.message);
}

#[test]
fn missing_special_tokens_render_as_nothing() {
    // The bare fixture tokenizer has no tokenizer_config.json, so no BOS/EOS names.
    let template = "{{ bos_token }}{% if eos_token is defined %}EOS{% endif %}{{ messages[0]['content'] }}";
    let prompt = bare_tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], false, Some(template))
        .unwrap();
    assert_eq!(prompt, "Hi");
}

#[test]
fn template_errors_are_validation_errors_with_the_message() {
    let raising =
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
    let error = bare_tokenizer()
        .apply_chat_template(&[ChatMessage::new("assistant", "x")], false, Some(raising))
        .unwrap_err();
    assert_eq!(error.category, ErrorCategory::Validation);
    assert!(
        error.message.contains("Conversation must start with user"),
        "{}",
        error.message
    );

    let broken = bare_tokenizer()
        .apply_chat_template(&[], false, Some("{% for %}"))
        .unwrap_err();
    assert_eq!(broken.category, ErrorCategory::Validation);
    assert!(
        broken.message.contains("chat template is invalid"),
        "{}",
        broken.message
    );
}

#[test]
fn templates_get_python_string_methods_and_hf_features() {
    // What real HF templates use: trim_blocks/lstrip_blocks, loop variables, .strip(),
    // .startswith(), bos/eos tokens, namespace(), and Python-style tojson.
    let template = "{{ bos_token }}{% for m in messages %}
    {% if m.content.startswith('  ') %}[{{ loop.index }}:{{ m.content.strip() }}]{% else %}({{ m.role.upper() }}){% endif %}
{% endfor %}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ eos_token }}";
    let messages = [
        ChatMessage::new("user", "  padded  "),
        ChatMessage::new("assistant", "x"),
    ];
    let dir = std::env::temp_dir().join(format!("vllm_tokenizer_chat_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        format!("{}/smollm2_tokenizer.json", fixtures()),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    )
    .unwrap();
    let tokenizer = Tokenizer::from_file(&dir).unwrap();
    let prompt = tokenizer.apply_chat_template(&messages, false, Some(template)).unwrap();
    assert_eq!(prompt, "<|im_start|>[1:padded](ASSISTANT)2<|im_end|>");

    let json = "{{ {'name': 'get_weather', 'args': [1, 2.5, true, none], 'html': '<b>&\"'} | tojson }}|{{ [] | tojson(indent=2) }}|{{ {'a': [1]} | tojson(indent=2) }}";
    let rendered = tokenizer.apply_chat_template(&messages, false, Some(json)).unwrap();
    assert_eq!(
        rendered,
        "{\"name\": \"get_weather\", \"args\": [1, 2.5, true, null], \"html\": \"<b>&\\\"\"}|[]|{\n  \"a\": [\n    1\n  ]\n}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
