//! llama.cpp's tokenizer test vocabularies (`models/ggml-vocab-*.gguf` with `.inp`/`.out`:
//! inputs and the ids transformers gave for them). They are not shipped with this
//! repository, so the test is ignored unless asked for: point LLAMA_CPP_VOCABS at
//! llama.cpp's models/ directory and run with `--ignored`.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use vllm_engine::tokenizer::{IncrementalDetokenizer, Tokenizer};

const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// (vocabulary, what it covers)
const VOCABS: &[(&str, &str)] = &[
    ("llama-spm", "SentencePiece (Llama 2)"),
    ("phi-3", "SentencePiece (Phi-3)"),
    ("gpt-2", "byte-level BPE, GPT-2 regex"),
    ("starcoder", "digits split one by one"),
    ("refact", "digits split one by one"),
    ("llama-bpe", "Llama 3 regex, ignore_merges"),
    ("qwen2", "Qwen2 regex"),
    ("mpt", "GPT-2 regex"),
    ("command-r", "digits split one by one"),
    ("falcon", "punctuation, GPT-2 regex, numbers in threes"),
    ("deepseek-coder", "letters, punctuation, CJK runs, single digits"),
];

fn check_vocab(dir: &Path, name: &str) -> Vec<String> {
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let mut file = std::fs::File::open(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    let metadata = gguf_file::Content::read(&mut file).expect("GGUF").metadata;
    let tokenizer = Tokenizer::from_gguf_metadata(&metadata).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let outputs = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let mut failures = Vec::new();
    let cases: Vec<(&str, &str)> = inputs.split(SEPARATOR).zip(outputs.split('\n')).collect();
    assert!(cases.len() > 40, "{name}: only {} cases", cases.len());
    let mut non_empty = 0;
    for (text, expected) in cases {
        let expected: Vec<u32> = expected.split_whitespace().map(|id| id.parse().unwrap()).collect();
        let got = tokenizer.encode(text, false).unwrap();
        non_empty += usize::from(!expected.is_empty());
        if got != expected {
            failures.push(format!("{name}: {text:?}\n  expected {expected:?}\n  got      {got:?}"));
        }
        // Decoding gives the text back wherever the vocabulary covers it.
        let decoded = tokenizer.decode(&got, false).unwrap();
        if got == expected && !decoded.contains('\u{FFFD}') && decoded != text && decoded.trim() != text.trim() {
            failures.push(format!("{name}: decode of {text:?} gave {decoded:?}"));
        }
    }
    assert!(non_empty > 30, "{name}: only {non_empty} cases with ids");
    failures.extend(check_detokenizer(&tokenizer, name));
    failures
}

/// Streams pseudo-random id sequences (a fixed LCG, biased to low ids where byte tokens
/// live) and compares with decoding them at once.
fn check_detokenizer(tokenizer: &Tokenizer, name: &str) -> Vec<String> {
    let vocab = tokenizer.vocab_size() as u64;
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |bound: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % bound
    };
    let mut failures = Vec::new();
    for _ in 0..200 {
        let len = next(40);
        let ids: Vec<u32> = (0..len)
            .map(|_| {
                let bound = if next(2) == 0 { 300.min(vocab) } else { vocab };
                next(bound) as u32
            })
            .collect();
        for skip in [true, false] {
            let mut detokenizer = IncrementalDetokenizer::new(skip);
            let mut streamed: String = ids.iter().map(|&id| detokenizer.push(tokenizer, id).unwrap()).collect();
            streamed.push_str(&detokenizer.flush(tokenizer).unwrap());
            let whole = tokenizer.decode(&ids, skip).unwrap();
            if streamed != whole {
                failures.push(format!(
                    "{name}: streaming {ids:?} gave {streamed:?}, decode gives {whole:?}"
                ));
            }
        }
    }
    failures
}

#[test]
#[ignore = "needs llama.cpp's models/ggml-vocab-* files: set LLAMA_CPP_VOCABS and run with --ignored"]
fn gguf_tokenizers_match_llama_cpp_test_vocabularies() {
    let dir = PathBuf::from(std::env::var("LLAMA_CPP_VOCABS").expect("set LLAMA_CPP_VOCABS to llama.cpp's models/"));
    let failures: Vec<String> = VOCABS.iter().flat_map(|(name, _)| check_vocab(&dir, name)).collect();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
