//! Incremental detokenization: turns a growing list of token ids into text deltas that
//! never end inside a UTF-8 character, and whose concatenation equals decoding all ids.

use super::Tokenizer;
use crate::error::Result;

pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    text: String,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer { ids: Vec::new(), text: String::new(), skip_special_tokens }
    }

    /// Adds one token; returns the text it completes (possibly empty while a multi-byte
    /// character is still incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let full = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        // An incomplete UTF-8 sequence decodes as U+FFFD: wait for the next token.
        if full.ends_with('\u{FFFD}') || !full.starts_with(&self.text) {
            return Ok(String::new());
        }
        let delta = full[self.text.len()..].to_string();
        self.text = full;
        Ok(delta)
    }

    /// At the end of the request: whatever text is still held back.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let full = tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let delta = if full.starts_with(&self.text) { full[self.text.len()..].to_string() } else { String::new() };
        self.text = full;
        Ok(delta)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
