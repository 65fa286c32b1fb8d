//! Rebuilds a Hugging Face tokenizer from a GGUF file's `tokenizer.*` metadata, as
//! llama.cpp's converter wrote it: the vocabulary, BPE merges, token types (which tokens
//! are special) and the pre-tokenizer name that stands for the original splitting rules.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub(super) const TOKEN_TYPE_NORMAL: i64 = 1;
pub(super) const TOKEN_TYPE_UNKNOWN: i64 = 2;
pub(super) const TOKEN_TYPE_CONTROL: i64 = 3;
pub(super) const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The splitting regex of Llama 3 (GPT-4's cl100k): numbers in groups of up to three digits.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: the same, but every digit on its own.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What `from_gguf_metadata` gives back besides the tokenizer itself.
pub(super) struct GgufTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub chat_template: Option<String>,
}

pub(super) fn build(metadata: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    let meta = Metadata(metadata);
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        EngineError::validation("the GGUF file has no tokenizer (no tokenizer.ggml.model in its metadata)")
    })?;
    match model {
        "gpt2" => build_byte_level_bpe(&meta),
        "llama" => super::gguf_spm::build(&meta),
        other => Err(EngineError::unsupported(format!(
            "GGUF tokenizer type {other:?} is not supported (supported: \"gpt2\", \"llama\"); \
             pass a tokenizer.json with the `tokenizer` option"
        ))),
    }
}

fn build_byte_level_bpe(meta: &Metadata) -> Result<GgufTokenizer> {
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::validation("the GGUF tokenizer has no tokenizer.ggml.tokens"))?;
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| EngineError::validation("the GGUF gpt2 tokenizer has no tokenizer.ggml.merges"))?;
    let token_types = meta.integers("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(EngineError::validation(format!(
            "the GGUF tokenizer has {} tokens but {} token types",
            tokens.len(),
            token_types.len()
        )));
    }

    let vocab = vocab_from_tokens(&tokens)?;
    let merges = merges
        .iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(left, right)| (left.to_string(), right.to_string()))
                .ok_or_else(|| EngineError::validation(format!("GGUF merge {merge:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;

    let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| EngineError::validation(format!("the GGUF BPE vocabulary is inconsistent: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    finish(inner, meta, &tokens, &token_types, false)
}

/// The steps every GGUF tokenizer shares once its model, normalizer and decoder are set:
/// special tokens, BOS/EOS ids and their post-processor (`add_bos_default` when the
/// metadata is silent), the chat template.
pub(super) fn finish(
    mut inner: tokenizers::Tokenizer,
    meta: &Metadata,
    tokens: &[String],
    token_types: &[i64],
    add_bos_default: bool,
) -> Result<GgufTokenizer> {
    register_added_tokens(&mut inner, tokens, token_types);
    let bos_token_id = meta.token_id("tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos_token_id = meta.token_id("tokenizer.ggml.eos_token_id", tokens.len())?;
    let add_bos = meta.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
    let add_eos = meta.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    add_special_token_processor(
        &mut inner,
        tokens,
        add_bos.then_some(bos_token_id).flatten(),
        add_eos.then_some(eos_token_id).flatten(),
    )?;
    Ok(GgufTokenizer {
        inner,
        bos_token_id,
        eos_token_id,
        chat_template: meta.string("tokenizer.chat_template")?.map(str::to_string),
    })
}

/// Token strings to ids. A string listed twice keeps its first id, as llama.cpp does.
pub(super) fn vocab_from_tokens(tokens: &[String]) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id =
            u32::try_from(id).map_err(|_| EngineError::validation("the GGUF tokenizer has more than 2^32 tokens"))?;
        vocab.entry(token.clone()).or_insert(id);
    }
    Ok(vocab)
}

/// The splitting rules that llama.cpp's `tokenizer.ggml.pre` names, and whether BPE should
/// take a whole word that is in the vocabulary without merging (Llama 3 does).
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| EngineError::internal(format!("bad pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Split(split))
    };
    let sequence = |parts| PreTokenizerWrapper::Sequence(Sequence::new(parts));
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" => (byte_level(true), false),
        // SmolLM and StarCoder split every digit on its own before GPT-2's byte-level rules.
        "smollm" | "starcoder" | "refact" | "command-r" => {
            (sequence(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)]), false)
        }
        "llama3" | "llama-v3" | "llama-bpe" => (sequence(vec![split(LLAMA3_PATTERN)?, byte_level(false)]), true),
        "qwen2" => (sequence(vec![split(QWEN2_PATTERN)?, byte_level(false)]), false),
        // DeepSeek Coder: lines, letter runs, punctuation runs, CJK runs, single digits.
        "deepseek-coder" => (
            sequence(vec![
                split(r"[\r\n]")?,
                split(r"\s?\p{L}+")?,
                split(r"\s?\p{P}+")?,
                split("[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+")?,
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(false),
            ]),
            false,
        ),
        // Falcon: punctuation runs apart, GPT-2's rules, then numbers in groups of three.
        "falcon" => (
            sequence(vec![
                PreTokenizerWrapper::Punctuation(Punctuation::new(SplitDelimiterBehavior::Contiguous)),
                byte_level(true),
                PreTokenizerWrapper::Digits(Digits::new(false)),
                split("[0-9][0-9][0-9]")?,
            ]),
            false,
        ),
        other => {
            return Err(EngineError::unsupported(format!(
                "GGUF pre-tokenizer {other:?} is not supported (supported: default, gpt2, mpt, falcon, deepseek-coder, smollm, command-r, \
                 starcoder, refact, llama3, llama-bpe, qwen2); pass a tokenizer.json with the `tokenizer` option"
            )))
        }
    })
}

/// Control tokens become special added tokens (matched whole in text, dropped by
/// `skip_special_tokens`); user-defined tokens are matched whole but kept when decoding.
pub(super) fn register_added_tokens(inner: &mut tokenizers::Tokenizer, tokens: &[String], token_types: &[i64]) {
    let added = |wanted: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(token_types)
            .filter(|(token, kind)| **kind == wanted && !token.is_empty())
            .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
            .collect()
    };
    inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
    inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
}

/// Wraps every encoding in BOS/EOS when the model asks for them.
pub(super) fn add_special_token_processor(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<()> {
    let named = |id: Option<u32>| id.map(|id| (tokens[id as usize].clone(), id));
    if bos.is_some() || eos.is_some() {
        inner.with_post_processor(Some(special_token_processor(named(bos), named(eos))?));
    }
    Ok(())
}

fn special_token_processor(bos: Option<(String, u32)>, eos: Option<(String, u32)>) -> Result<TemplateProcessing> {
    let wrap = |sequence: &str| {
        let mut parts = Vec::new();
        if let Some((token, _)) = &bos {
            parts.push(token.clone());
        }
        parts.push(sequence.to_string());
        if let Some((token, _)) = &eos {
            parts.push(token.clone());
        }
        parts
    };
    let single = wrap("$A");
    let pair: Vec<String> = single.iter().cloned().chain(wrap("$B:1")).collect();
    let special_tokens: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
    let bad_template = |e: String| EngineError::internal(format!("bad special-token template: {e}"));
    let mut builder = TemplateProcessing::builder();
    builder.try_single(single).map_err(bad_template)?;
    builder.try_pair(pair).map_err(bad_template)?;
    builder.special_tokens(special_tokens);
    builder.build().map_err(|e| bad_template(e.to_string()))
}

/// Typed, lenient reads of GGUF metadata (integers may be stored in any width).
pub(super) struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    pub(super) fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    pub(super) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => integer(other)
                .map(|v| Some(v != 0))
                .ok_or_else(|| wrong_type(key, "a boolean", other)),
        }
    }

    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let Value::Array(items) = value else {
            return Err(wrong_type(key, "an array of strings", value));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(key, "an array of strings", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(super) fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let Value::Array(items) = value else {
            return Err(wrong_type(key, "an array of integers", value));
        };
        items
            .iter()
            .map(|item| integer(item).ok_or_else(|| wrong_type(key, "an array of integers", item)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(super) fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let Value::Array(items) = value else {
            return Err(wrong_type(key, "an array of floats", value));
        };
        items
            .iter()
            .map(|item| match item {
                Value::F32(v) => Ok(*v),
                Value::F64(v) => Ok(*v as f32),
                other => Err(wrong_type(key, "an array of floats", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A token id that must index the vocabulary.
    pub(super) fn token_id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let id = integer(value).ok_or_else(|| wrong_type(key, "an integer", value))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
            _ => Err(EngineError::validation(format!(
                "GGUF metadata {key} = {id} is not a token id (the vocabulary has {vocab_size} tokens)"
            ))),
        }
    }
}

fn integer(value: &Value) -> Option<i64> {
    Some(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::U64(v) => i64::try_from(*v).ok()?,
        Value::I64(v) => *v,
        _ => return None,
    })
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> EngineError {
    let found = match found {
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Bool(_) => "a boolean",
        Value::F32(_) | Value::F64(_) => "a float",
        _ => "an integer",
    };
    EngineError::validation(format!("GGUF metadata {key} should be {expected}, found {found}"))
}
