//! One constrained sequence's grammar state: the allowed-token mask before each step,
//! advanced by each sampled token. State follows the output tokens, which preemption by
//! recompute keeps, so a token is consumed exactly once.

use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, TokenParser};

pub struct GrammarMatcher {
    inner: Matcher,
}

/// The tokens a constrained sequence may sample next.
pub type TokenMask = SimpleVob;

/// What consuming a sampled token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// More tokens may follow.
    Continue,
    /// The grammar is complete and admits nothing more: the next mask holds only EOS.
    Finished,
    /// The token broke the grammar (it should have been masked): finish the request.
    Rejected(String),
}

impl GrammarMatcher {
    pub(super) fn new(parser: TokenParser) -> std::result::Result<Self, String> {
        let inner = Matcher::new(Ok(parser));
        match inner.get_error() {
            Some(e) => Err(e),
            None => Ok(GrammarMatcher { inner }),
        }
    }

    /// An independent copy (a child of an n > 1 request).
    pub fn fork(&self) -> Self {
        GrammarMatcher {
            inner: self.inner.deep_clone(),
        }
    }

    /// The allowed tokens now (only EOS once the grammar is complete). None on an
    /// internal matcher error: the step then samples unconstrained and `advance` ends it.
    pub fn mask(&mut self) -> Option<TokenMask> {
        self.inner.compute_mask_or_eos().ok()
    }

    pub fn advance(&mut self, token: u32) -> Advance {
        if self.inner.is_error() {
            return Advance::Rejected(self.inner.get_error().unwrap_or_default());
        }
        // Complete already: only EOS was allowed (sampled again under ignore_eos).
        if self.inner.is_stopped() {
            return Advance::Finished;
        }
        if let Err(e) = self.inner.consume_token(token) {
            return Advance::Rejected(e.to_string());
        }
        if self.inner.is_stopped() {
            Advance::Finished
        } else {
            Advance::Continue
        }
    }

    pub fn is_finished(&self) -> bool {
        self.inner.is_stopped()
    }
}

/// Bans (sets to -inf) every logit the mask does not allow, 32 tokens per mask word: a
/// word of all ones (inside a free string, most of the vocabulary) costs one compare, a
/// zero word one fill; ids past the mask are never allowed.
pub fn apply_mask(logits: &mut [f32], mask: &TokenMask) {
    let words = mask.as_slice();
    let covered = (words.len() * 32).min(logits.len());
    let (inside, beyond) = logits.split_at_mut(covered);
    beyond.fill(f32::NEG_INFINITY);
    for (chunk, &word) in inside.chunks_mut(32).zip(words) {
        match word {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            _ => {
                for (bit, l) in chunk.iter_mut().enumerate() {
                    if word >> bit & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    // Bits at or past mask.len() in the last word are never set by llguidance; ban them
    // anyway so the contract does not depend on it.
    if mask.len() < covered {
        inside[mask.len()..].fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-wise mask equals the definition (allowed keeps its logit, all else -inf)
    /// for full, empty and mixed words, a vocabulary that is not a multiple of 32, and
    /// logits rows longer than the mask.
    #[test]
    fn apply_mask_bans_exactly_the_tokens_the_mask_does_not_allow() {
        for (vocab, row_len) in [(100usize, 100usize), (96, 96), (70, 100), (1, 40)] {
            let mut mask = TokenMask::alloc(vocab);
            // Word 0 all allowed, word 1 none, the rest every third token.
            for t in 0..vocab {
                if t < 32 || (t >= 64 && t % 3 == 0) {
                    mask.allow_token(t as u32);
                }
            }
            let logits: Vec<f32> = (0..row_len).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut got = logits.clone();
            apply_mask(&mut got, &mask);
            let want: Vec<f32> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    if i < vocab && mask.is_allowed(i as u32) {
                        l
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            assert_eq!(got, want, "vocab {vocab}, row {row_len}");
        }
    }
}
