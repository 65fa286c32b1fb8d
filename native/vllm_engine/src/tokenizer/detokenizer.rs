//! Incremental detokenization: turns a growing list of token ids into text deltas that
//! never end inside a UTF-8 character, and whose concatenation equals decoding all ids.
//!
//! As in vLLM, each step decodes only a short window of recent ids: the "prefix" ids
//! (already emitted, kept as context because decoders such as SentencePiece's treat the
//! first token differently) and the ids not yet emitted. The new text is the window's
//! text minus the prefix's text. The window only moves forward once its text ends on a
//! whole character and not inside a run of byte-fallback tokens (SentencePiece decodes a
//! run as one UTF-8 sequence, all U+FFFD if any byte is bad), so every window starts
//! where decoding the whole sequence would also start afresh.

use super::Tokenizer;
use crate::error::Result;

/// How many prompt tokens `with_prompt` keeps as decoding context (vLLM keeps 5).
const PROMPT_CONTEXT_TOKENS: usize = 5;

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

    /// Like `new`, but decodes the output in the context of the prompt's last tokens, as
    /// vLLM does: a SentencePiece model's first output token then keeps its leading space
    /// (decoding the output ids alone drops it). The deltas concatenate to
    /// `decode(context + output)` minus `decode(context)`.
    pub fn with_prompt(tokenizer: &Tokenizer, prompt_ids: &[u32], skip_special_tokens: bool) -> Result<Self> {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Ok(IncrementalDetokenizer {
            window: context.to_vec(),
            prefix_len: context.len(),
            prefix_text: tokenizer.decode(context, skip_special_tokens)?,
            text: String::new(),
            skip_special_tokens,
        })
    }

    /// Adds one token; returns the text it completes (possibly empty while a multi-byte
    /// character is still incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.window.push(id);
        // A byte run's text may still change with the next byte: wait for it to end
        // (a skipped special token is invisible to the decoder, so it ends nothing).
        if tokenizer.is_byte_fallback_token(id) || (self.skip_special_tokens && tokenizer.is_special(id)) {
            return Ok(String::new());
        }
        let window_text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        // An incomplete UTF-8 sequence decodes as U+FFFD: wait for the next token.
        if window_text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let delta = new_text(&self.prefix_text, &window_text);
        if delta.is_empty() {
            // Nothing visible yet (e.g. a skipped special token): keep the context.
            return Ok(String::new());
        }
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
        let delta = new_text(&self.prefix_text, &window_text);
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

/// The window's text after the part already emitted. Should a decoder ever rewrite
/// emitted text (none of the supported ones do once the window rules hold), what was
/// emitted cannot be taken back: go on from where the two texts part.
fn new_text(prefix_text: &str, window_text: &str) -> String {
    if let Some(delta) = window_text.strip_prefix(prefix_text) {
        return delta.to_string();
    }
    let common = prefix_text
        .char_indices()
        .zip(window_text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix_text.len().min(window_text.len()), |((at, _), _)| at);
    tracing::debug!("decoder rewrote already emitted text after byte {common}");
    window_text.get(common..).unwrap_or_default().to_string()
}
