//! Structured outputs (vLLM's `structured_outputs` / guided decoding): a request's output
//! is constrained to a JSON schema, any JSON object, a regex, one of a list of choices or
//! a Lark grammar. llguidance compiles the constraint against our vocabulary and gives,
//! before every sampled token, the set of tokens that keep the output valid.

mod matcher;
mod spec;
mod tok_env;

use std::sync::{Arc, OnceLock};

use llguidance::ParserFactory;

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

pub use matcher::{apply_mask, Advance, GrammarMatcher, TokenMask};
pub use spec::StructuredOutputs;

/// Compiles constraints for one engine. The token trie and llguidance's factory are
/// built on the first constrained request (they take a moment over a large vocabulary)
/// and shared by every later one.
pub struct StructuredOutputCompiler {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_id: Option<u32>,
    /// Read-only once built (llguidance keeps its shared caches behind locks), so a panic
    /// elsewhere cannot leave it half-updated: hence AssertUnwindSafe.
    factory: std::panic::AssertUnwindSafe<OnceLock<std::result::Result<ParserFactory, String>>>,
}

impl StructuredOutputCompiler {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_token_id: Option<u32>) -> Self {
        StructuredOutputCompiler {
            tokenizer,
            vocab_size,
            eos_token_id,
            factory: std::panic::AssertUnwindSafe(OnceLock::new()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        let built = self.factory.get_or_init(|| {
            let eos = self
                .eos_token_id
                .ok_or("the model has no EOS token to end a constrained output")?;
            let env = tok_env::build_tok_env(self.tokenizer.clone(), self.vocab_size, eos);
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        built
            .as_ref()
            .map_err(|e| EngineError::internal(format!("structured outputs unavailable: {e}")))
    }

    /// A fresh matcher for `spec`; an invalid schema, regex or grammar is a validation error.
    pub fn compile(&self, spec: &StructuredOutputs) -> Result<GrammarMatcher> {
        let grammar = spec.to_grammar()?;
        let parser = self
            .factory()?
            .create_parser(grammar)
            .map_err(|e| EngineError::validation(format!("invalid structured_outputs {}: {e}", spec.kind())))?;
        GrammarMatcher::new(parser)
            .map_err(|e| EngineError::validation(format!("invalid structured_outputs {}: {e}", spec.kind())))
    }
}

/// The next-token masks of several constrained sequences, in parallel. A sequence whose
/// matcher fails (or panics) gets no mask: it samples unconstrained this step and its
/// `advance` then ends it, so one broken matcher never takes the engine down.
pub fn compute_masks<K: Copy + Send + Sync>(grammars: &mut [(K, Box<GrammarMatcher>)]) -> Vec<(K, TokenMask)> {
    use rayon::prelude::*;
    grammars
        .par_iter_mut()
        .filter_map(|(key, g)| {
            let mask = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.mask())).ok()??;
            Some((*key, mask))
        })
        .collect()
}
