//! Incremental detokenization: turns a growing list of token ids into text deltas that
//! never end inside a UTF-8 character, and whose concatenation equals decoding all ids.
//!
//! As in vLLM, each step decodes only a short window of recent ids: the "prefix" ids
//! (already emitted, kept as context because decoders such as SentencePiece's treat the
//! first token differently) and the ids not yet emitted. The new text is the window's
//! text minus the prefix's text. The window only moves forward once its text ends on a
//! whole character, so every window starts on a character boundary of the full text.

use super::Tokenizer;
use crate::error::Result;

/// What the decoder yields for bytes that are not (yet) a whole UTF-8 character.
const REPLACEMENT: char = '\u{FFFD}';

pub struct IncrementalDetokenizer {
    /// The ids of the current window: `window[..prefix_len]` are already emitted.
    window: Vec<u32>,
    prefix_len: usize,
    /// The decoded text of `window[..prefix_len]`.
    prefix_text: String,
    text: String,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer {
            window: Vec::new(),
            prefix_len: 0,
            prefix_text: String::new(),
            text: String::new(),
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty while a multi-byte
    /// character is still incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.window.push(id);
        let window_text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        // An incomplete UTF-8 sequence decodes as U+FFFD: wait for the next token.
        if window_text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let Some(delta) = window_text.strip_prefix(self.prefix_text.as_str()) else {
            // The decoder rewrote earlier text; keep the window until it settles.
            return Ok(String::new());
        };
        if delta.is_empty() {
            // Nothing visible yet (e.g. a skipped special token): keep the context.
            return Ok(String::new());
        }
        let delta = delta.to_string();
        self.text.push_str(&delta);
        // The ids just emitted become the next prefix.
        self.window.drain(..self.prefix_len);
        self.prefix_len = self.window.len();
        self.prefix_text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        Ok(delta)
    }

    /// At the end of the request: whatever text is still held back (an incomplete
    /// character is emitted as U+FFFD, as decoding all ids gives it).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.window.len() == self.prefix_len {
            return Ok(String::new());
        }
        let window_text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        let delta = match window_text.strip_prefix(self.prefix_text.as_str()) {
            Some(delta) => delta.to_string(),
            None => {
                tracing::warn!("decoder rewrote already emitted text; dropping the unmatched tail");
                String::new()
            }
        };
        self.text.push_str(&delta);
        // Everything is emitted: the whole window is now prefix.
        self.prefix_len = self.window.len();
        self.prefix_text = window_text;
        Ok(delta)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
