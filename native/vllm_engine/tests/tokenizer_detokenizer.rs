//! Incremental detokenization: deltas never end inside a UTF-8 character, and deltas plus
//! flush() always concatenate to decoding all ids at once.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;

use proptest::prelude::*;
use serde_json::Value as Json;
use vllm_engine::tokenizer::{IncrementalDetokenizer, Tokenizer};

const REPLACEMENT: char = '\u{FFFD}';

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

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = format!("{}/smollm2_tokenizer.json", fixtures());
        Tokenizer::from_file(std::path::Path::new(&path)).expect("fixture tokenizer")
    })
}

/// Ids whose bytes are not whole UTF-8 characters on their own (pieces of multi-byte
/// characters), plus the ids of emoji and accented text: the hard cases.
fn multibyte_ids() -> &'static Vec<u32> {
    static IDS: OnceLock<Vec<u32>> = OnceLock::new();
    IDS.get_or_init(|| {
        let t = tokenizer();
        let mut ids: Vec<u32> = (0..t.vocab_size() as u32)
            .filter(|&id| t.decode(&[id], false).map(|s| s.contains('\u{FFFD}')).unwrap_or(false))
            .collect();
        assert!(
            ids.len() > 100,
            "expected many partial-character tokens, found {}",
            ids.len()
        );
        ids.extend(
            t.encode("🦀🚀 👍🏽 café naïve Ærøskøbing Ελληνικά 日本語のテキスト", false)
                .unwrap(),
        );
        ids
    })
}

/// A small SentencePiece vocabulary (as in a "llama" GGUF) with all 256 byte tokens:
/// byte runs decode as one UTF-8 sequence, all U+FFFD when any byte is bad.
fn sentencepiece_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let mut tokens: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<s>".into(), 0.0, 3),
            ("</s>".into(), 0.0, 3),
        ];
        tokens.extend((0..=255u32).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        for (i, piece) in ["\u{2581}", "h", "i", "\u{2581}h", "\u{2581}hi", "é", "\u{2581}é"]
            .iter()
            .enumerate()
        {
            tokens.push((piece.to_string(), -(i as f32), 1));
        }
        let array = |f: &dyn Fn(&(String, f32, i32)) -> Value| Value::Array(tokens.iter().map(f).collect());
        let metadata = HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".to_string(),
                array(&|t| Value::String(t.0.clone())),
            ),
            ("tokenizer.ggml.scores".to_string(), array(&|t| Value::F32(t.1))),
            ("tokenizer.ggml.token_type".to_string(), array(&|t| Value::I32(t.2))),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ]);
        Tokenizer::from_gguf_metadata(&metadata).expect("tiny SentencePiece tokenizer")
    })
}

/// Pushes every id; returns the deltas (flush last).
fn detokenize(ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    detokenize_with(tokenizer(), ids, skip_special_tokens)
}

fn detokenize_with(tokenizer: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let mut detokenizer = IncrementalDetokenizer::new(skip_special_tokens);
    let mut deltas: Vec<String> = ids.iter().map(|&id| detokenizer.push(tokenizer, id).unwrap()).collect();
    deltas.push(detokenizer.flush(tokenizer).unwrap());
    assert_eq!(detokenizer.text(), deltas.concat());
    deltas
}

#[test]
fn detokenizer_streams_the_fixture_generations_exactly() {
    let text = std::fs::read_to_string(format!("{}/smollm2_reference.json", fixtures())).unwrap();
    let reference: Json = serde_json::from_str(&text).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["greedy_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(detokenize(&ids, false).concat(), case["greedy_text"].as_str().unwrap());
        assert_eq!(detokenize(&ids, true).concat(), tokenizer().decode(&ids, true).unwrap());
    }
}

#[test]
fn detokenizer_holds_back_split_characters() {
    let text = "🦀🚀 👍🏽 café naïve Ærøskøbing Ελληνικά 日本語のテキスト";
    let ids = tokenizer().encode(text, false).unwrap();
    assert!(
        ids.len() > text.chars().count() / 2,
        "the text should need byte-piece tokens"
    );
    let deltas = detokenize(&ids, true);
    assert_eq!(deltas.concat(), text);
    for delta in &deltas {
        assert!(
            !delta.contains('\u{FFFD}'),
            "delta {delta:?} holds a replacement character"
        );
    }
    // Some token only completes part of a character, so at least one push is empty.
    assert!(deltas[..ids.len()].iter().any(String::is_empty));
}

#[test]
fn detokenizer_skips_special_tokens_when_asked() {
    let ids = tokenizer()
        .encode("<|im_start|>assistant\nHello there<|im_end|>", false)
        .unwrap();
    assert_eq!(detokenize(&ids, true).concat(), "assistant\nHello there");
    assert_eq!(
        detokenize(&ids, false).concat(),
        "<|im_start|>assistant\nHello there<|im_end|>"
    );
}

#[test]
fn detokenizer_flush_emits_an_unfinished_character_as_decode_does() {
    // The first byte piece of a 4-byte emoji, alone: decoding gives U+FFFD, so must flush.
    let crab = tokenizer().encode("🦀", false).unwrap();
    let first = &crab[..1];
    let mut detokenizer = IncrementalDetokenizer::new(true);
    assert_eq!(detokenizer.push(tokenizer(), first[0]).unwrap(), "");
    assert_eq!(
        detokenizer.flush(tokenizer()).unwrap(),
        tokenizer().decode(first, true).unwrap()
    );
    assert_eq!(
        detokenizer.flush(tokenizer()).unwrap(),
        "",
        "a second flush has nothing left"
    );
}

#[test]
fn detokenizer_handles_long_sequences() {
    // 20k tokens: each push decodes a short window, so this stays fast.
    let sentence = tokenizer()
        .encode("The crab 🦀 wrote fast code in Rust, naïvement. ", false)
        .unwrap();
    let ids: Vec<u32> = sentence.iter().cycle().take(20_000).copied().collect();
    let started = std::time::Instant::now();
    let text = detokenize(&ids, true).concat();
    assert_eq!(text, tokenizer().decode(&ids, true).unwrap());
    assert!(started.elapsed().as_secs() < 20, "took {:?}", started.elapsed());
}

fn id_strategy() -> impl Strategy<Value = u32> {
    let vocab = tokenizer().vocab_size() as u32;
    prop_oneof![
        3 => 0..vocab,
        4 => proptest::sample::select(multibyte_ids().clone()),
        1 => 0u32..17, // SmolLM2's special tokens
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn detokenizer_deltas_concatenate_to_decode(ids in proptest::collection::vec(id_strategy(), 0..48), skip in any::<bool>()) {
        let deltas = detokenize(&ids, skip);
        prop_assert_eq!(deltas.concat(), tokenizer().decode(&ids, skip).unwrap());
        // Only flush may emit the replacement character of an unfinished tail.
        let whole = tokenizer().decode(&ids, skip).unwrap();
        if !whole.contains('\u{FFFD}') {
            for delta in &deltas {
                prop_assert!(!delta.contains(REPLACEMENT), "delta {:?}", delta);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn detokenizer_deltas_concatenate_to_decode_with_byte_fallback(
        ids in proptest::collection::vec(0u32..(3 + 256 + 7), 0..32),
        skip in any::<bool>(),
    ) {
        let tokenizer = sentencepiece_tokenizer();
        let deltas = detokenize_with(tokenizer, &ids, skip);
        prop_assert_eq!(deltas.concat(), tokenizer.decode(&ids, skip).unwrap());
    }
}

#[test]
fn detokenizer_waits_for_the_end_of_a_byte_run() {
    let tokenizer = sentencepiece_tokenizer();
    let byte = |b: u8| tokenizer.token_to_id(&format!("<0x{b:02X}>")).unwrap();
    let hi = tokenizer.token_to_id("\u{2581}hi").unwrap();
    // ";" then a lone continuation byte: the run is bad, so it all decodes as U+FFFD.
    let ids = [hi, byte(b';'), byte(0x82), hi];
    let deltas = detokenize_with(tokenizer, &ids, true);
    assert_eq!(deltas.concat(), tokenizer.decode(&ids, true).unwrap());
    assert_eq!(deltas.concat(), "hi\u{FFFD}\u{FFFD} hi");
    // "€" spelled as three byte tokens streams whole.
    let euro = [hi, byte(0xE2), byte(0x82), byte(0xAC), hi];
    let deltas = detokenize_with(tokenizer, &euro, true);
    assert_eq!(deltas, vec!["hi", "", "", "", "\u{20AC} hi", ""]);
}

#[test]
fn detokenizer_with_prompt_context_keeps_the_first_leading_space() {
    let tokenizer = sentencepiece_tokenizer();
    let hi = tokenizer.token_to_id("\u{2581}hi").unwrap();
    let prompt = tokenizer.encode("hi hi", true).unwrap();
    // Alone, the first output token loses its dummy-prefix space; after the prompt it keeps it.
    assert_eq!(detokenize_with(tokenizer, &[hi, hi], true).concat(), "hi hi");
    let mut detokenizer = IncrementalDetokenizer::with_prompt(tokenizer, &prompt, true).unwrap();
    let mut streamed: String = [hi, hi]
        .iter()
        .map(|&id| detokenizer.push(tokenizer, id).unwrap())
        .collect();
    streamed.push_str(&detokenizer.flush(tokenizer).unwrap());
    assert_eq!(streamed, " hi hi");
    assert_eq!(detokenizer.text(), " hi hi");
}

#[test]
fn detokenizer_with_prompt_context_streams_the_fixture_generations_exactly() {
    let text = std::fs::read_to_string(format!("{}/smollm2_reference.json", fixtures())).unwrap();
    let reference: Json = serde_json::from_str(&text).unwrap();
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect()
    };
    for case in reference["cases"].as_array().unwrap() {
        let mut detokenizer =
            IncrementalDetokenizer::with_prompt(tokenizer(), &ids(&case["prompt_token_ids"]), false).unwrap();
        let mut streamed = String::new();
        for id in ids(&case["greedy_token_ids"]) {
            streamed.push_str(&detokenizer.push(tokenizer(), id).unwrap());
        }
        streamed.push_str(&detokenizer.flush(tokenizer()).unwrap());
        assert_eq!(streamed, case["greedy_text"].as_str().unwrap());
    }
}
