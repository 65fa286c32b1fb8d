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

/// Bans (sets to -inf) every logit the mask does not allow.
pub fn apply_mask(logits: &mut [f32], mask: &TokenMask) {
    let len = mask.len();
    for (i, l) in logits.iter_mut().enumerate() {
        if i >= len || !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}
