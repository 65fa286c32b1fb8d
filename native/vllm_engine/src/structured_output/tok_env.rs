//! llguidance's view of our tokenizer: every token id as the bytes it stands for (a
//! TokTrie), special tokens marked with 0xFF as llguidance expects, and tokenization of
//! forced text through our own tokenizer.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

struct EngineTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for EngineTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        // A tokenizer failure leaves llguidance its greedy fallback (the trie).
        self.tokenizer
            .encode(&text, false)
            .unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
}

/// Builds the environment once per engine: `vocab_size` is the model's (its logits rows),
/// which may exceed the tokenizer's; ids without a token get no bytes (never allowed).
pub fn build_tok_env(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_token_id: u32) -> TokEnv {
    let words = token_bytes(&tokenizer, vocab_size);
    let info = TokRxInfo {
        vocab_size: vocab_size as u32,
        tok_eos: eos_token_id,
        tok_bos: tokenizer.bos_token_id(),
        tok_pad: None,
        tok_unk: None,
        tok_end_of_turn: None,
    };
    let trie = TokTrie::from(&info, &words);
    Arc::new(EngineTokEnv { trie, tokenizer })
}

/// The bytes of every token id below `vocab_size`.
fn token_bytes(tokenizer: &Tokenizer, vocab_size: usize) -> Vec<Vec<u8>> {
    let inner = tokenizer.inner();
    let added: HashMap<u32, tokenizers::AddedToken> = inner.get_added_tokens_decoder().into_iter().collect();
    let byte_level = is_byte_level(inner);
    let unicode_to_byte: HashMap<char, u8> = byte_to_unicode().into_iter().map(|(b, c)| (c, b)).collect();
    (0..vocab_size as u32)
        .map(|id| {
            if let Some(token) = added.get(&id) {
                return if token.special {
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], token.content.as_bytes()].concat()
                } else {
                    token.content.as_bytes().to_vec()
                };
            }
            let Some(piece) = inner.id_to_token(id) else {
                return Vec::new();
            };
            if byte_level {
                piece
                    .chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| piece.as_bytes().to_vec())
            } else if let Some(byte) = sentencepiece_byte(&piece) {
                vec![byte]
            } else {
                piece.replace('\u{2581}', " ").into_bytes()
            }
        })
        .collect()
}

/// GPT-2 style byte-level BPE (the decoder says so), as opposed to SentencePiece.
fn is_byte_level(inner: &tokenizers::Tokenizer) -> bool {
    inner
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .is_some_and(|json| json.contains("ByteLevel"))
}

/// `<0x0A>` → 0x0A.
fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, char::from(b))
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                (b, c)
            }
        })
        .collect()
}
