//! Tokenizers: Hugging Face tokenizer.json or rebuilt from GGUF metadata; incremental
//! detokenization; chat templates.

mod chat_template;
mod detokenizer;
mod gguf;
mod gguf_spm;
mod hf_config;
mod py_json;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{EngineError, Result};

pub use chat_template::ChatMessage;
pub use detokenizer::IncrementalDetokenizer;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    chat_template: Option<String>,
    /// Ids of special added tokens (dropped by `skip_special_tokens`), cached for `is_special`.
    special_ids: HashSet<u32>,
    /// Ids of SentencePiece byte tokens (`<0x0A>`...), whose text depends on their neighbours.
    byte_fallback_ids: HashSet<u32>,
}

/// Short: the vocabulary itself is too large to print.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a tokenizer.json (a directory holding one is accepted), plus
    /// tokenizer_config.json beside it when present (special tokens, chat template).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(EngineError::not_found(format!(
                "tokenizer file {} does not exist",
                file.display()
            )));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| EngineError::validation(format!("cannot read tokenizer {}: {e}", file.display())))?;
        // sentence-transformers' tokenizer.json pads every input (MiniLM: to 128); we never pad.
        inner.with_padding(None);
        let config_path = file.with_file_name("tokenizer_config.json");
        let config = hf_config::TokenizerConfig::read(&config_path)?;
        let id_of = |token: Option<&String>| token.and_then(|t| inner.token_to_id(t));
        let bos_token_id = id_of(config.bos_token.as_ref());
        let eos_token_id = id_of(config.eos_token.as_ref());
        Ok(Self::from_inner(
            inner,
            bos_token_id,
            eos_token_id,
            config.chat_template,
        ))
    }

    /// Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata:
    /// `tokenizer.ggml.model` "gpt2" (byte-level BPE, pre-tokenizer from `tokenizer.ggml.pre`)
    /// or "llama" (SentencePiece with byte fallback). Control tokens become special tokens.
    pub fn from_gguf_metadata(metadata: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let built = gguf::build(metadata)?;
        Ok(Self::from_inner(
            built.inner,
            built.bos_token_id,
            built.eos_token_id,
            built.chat_template,
        ))
    }

    fn from_inner(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        chat_template: Option<String>,
    ) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let byte_fallback_ids = (0..=255u8)
            .filter_map(|b| inner.token_to_id(&format!("<0x{b:02X}>")))
            .collect();
        Tokenizer {
            inner,
            bos_token_id,
            eos_token_id,
            chat_template,
            special_ids,
            byte_fallback_ids,
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| EngineError::validation(format!("cannot tokenize prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Cuts encodings to `max_length` tokens (special tokens included); None: never.
    pub fn set_truncation(&mut self, max_length: Option<usize>) -> Result<()> {
        let params = max_length.map(|max_length| tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        });
        self.inner
            .with_truncation(params)
            .map_err(|e| EngineError::validation(format!("cannot set truncation: {e}")))?;
        Ok(())
    }

    /// A text pair as one sequence ([CLS] a [SEP] b [SEP] for BERT) with its segment ids.
    pub fn encode_pair(&self, text_a: &str, text_b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .inner
            .encode((text_a, text_b), true)
            .map_err(|e| EngineError::validation(format!("cannot tokenize text pair: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::validation(format!("cannot decode token ids: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
    /// The BOS token's text, as chat templates see it.
    pub fn bos_token(&self) -> Option<String> {
        self.bos_token_id.and_then(|id| self.id_to_token(id))
    }
    /// The EOS token's text, as chat templates see it.
    pub fn eos_token(&self) -> Option<String> {
        self.eos_token_id.and_then(|id| self.id_to_token(id))
    }
    /// Whether `id` is a special token (dropped when decoding with `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }
    /// Whether `id` is a byte token (`<0xXX>`) of a byte-fallback vocabulary: a run of
    /// them decodes as one UTF-8 sequence, so its text is only known when the run ends.
    pub fn is_byte_fallback_token(&self, id: u32) -> bool {
        self.byte_fallback_ids.contains(&id)
    }
    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
    /// The chat template from tokenizer_config.json or `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
