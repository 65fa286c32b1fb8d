//! SentencePiece-style tokenizers in GGUF (`tokenizer.ggml.model` = "llama": Llama 1/2,
//! Mistral v1, TinyLlama...): tokens with scores, `<0xXX>` byte tokens for what the
//! vocabulary lacks, and "▁" for spaces.
//!
//! llama.cpp tokenizes these by repeatedly merging the adjacent pair whose concatenation
//! is the highest-scoring token. BPE merges ranked by that score do the same, so the
//! model becomes a byte-fallback BPE (as transformers converts Llama's tokenizer).

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::{DecoderWrapper, NormalizerWrapper};

use super::gguf::{
    finish, vocab_from_tokens, GgufTokenizer, Metadata, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_USER_DEFINED,
};
use crate::error::{EngineError, Result};

const SPACE: &str = "\u{2581}"; // "▁"

pub(super) fn build(meta: &Metadata) -> Result<GgufTokenizer> {
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::validation("the GGUF tokenizer has no tokenizer.ggml.tokens"))?;
    let scores = meta
        .floats("tokenizer.ggml.scores")?
        .ok_or_else(|| EngineError::validation("the GGUF llama tokenizer has no tokenizer.ggml.scores"))?;
    let token_types = meta
        .integers("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_TYPE_NORMAL; tokens.len()]);
    if scores.len() != tokens.len() || token_types.len() != tokens.len() {
        return Err(EngineError::validation(format!(
            "the GGUF tokenizer has {} tokens, {} scores and {} token types",
            tokens.len(),
            scores.len(),
            token_types.len()
        )));
    }

    let vocab = vocab_from_tokens(&tokens)?;
    let merges = merges_from_scores(&tokens, &scores, &token_types, &vocab);
    let unk_id = meta
        .token_id("tokenizer.ggml.unknown_token_id", tokens.len())?
        .or_else(|| {
            token_types
                .iter()
                .position(|&t| t == TOKEN_TYPE_UNKNOWN)
                .map(|id| id as u32)
        });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk_id {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| EngineError::validation(format!("the GGUF SentencePiece vocabulary is inconsistent: {e}")))?;

    let add_space_prefix = meta.boolean("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(normalizer(add_space_prefix)?));
    inner.with_decoder(Some(decoder(add_space_prefix)?));
    // llama.cpp adds BOS to SentencePiece prompts unless told otherwise.
    finish(inner, meta, &tokens, &token_types, true)
}

/// Every split of a normal token into two vocabulary tokens is a merge; merges that make
/// higher-scoring tokens come first (ties: lower id first).
fn merges_from_scores(tokens: &[String], scores: &[f32], token_types: &[i64], vocab: &Vocab) -> Merges {
    let mut ranked: Vec<(f32, usize, String, String)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if token_types[id] != TOKEN_TYPE_NORMAL && token_types[id] != TOKEN_TYPE_USER_DEFINED {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id, left.to_string(), right.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, _, left, right)| (left, right)).collect()
}

/// Spaces become "▁"; the text gets a leading "▁" as SentencePiece's add_dummy_prefix.
fn normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper> {
    let replace = Replace::new(" ", SPACE).map_err(|e| EngineError::internal(format!("bad normalizer: {e}")))?;
    Ok(if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPACE.to_string())),
            NormalizerWrapper::Replace(replace),
        ]))
    } else {
        NormalizerWrapper::Replace(replace)
    })
}

/// "▁" back to spaces, `<0xXX>` tokens back to bytes, and the dummy prefix dropped.
fn decoder(add_space_prefix: bool) -> Result<DecoderWrapper> {
    let replace = Replace::new(SPACE, " ").map_err(|e| EngineError::internal(format!("bad decoder: {e}")))?;
    let mut steps = vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        steps.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    Ok(DecoderWrapper::Sequence(DecoderSequence::new(steps)))
}
