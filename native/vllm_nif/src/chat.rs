//! Chat prompts: renders a conversation with the model's chat template.

use rustler::{Atom, Env, ResourceArc, Term};
use vllm_engine::tokenizer::ChatMessage;
use vllm_engine::{EngineError, Result};

use crate::engine_ref::EngineRef;
use crate::error;

/// A message map with `role` and `content`, as atom or string keys.
fn message(term: Term) -> Result<ChatMessage> {
    let get = |key: &str| -> Option<String> {
        let env = term.get_env();
        let by_atom = Atom::from_str(env, key).ok().and_then(|k| term.map_get(k).ok());
        let by_string = || {
            let mut owned = rustler::NewBinary::new(env, key.len());
            owned.as_mut_slice().copy_from_slice(key.as_bytes());
            let key_term: Term = rustler::Binary::from(owned).into();
            term.map_get(key_term).ok()
        };
        by_atom.or_else(by_string).and_then(|v| v.decode::<String>().ok())
    };
    match (get("role"), get("content")) {
        (Some(role), Some(content)) => Ok(ChatMessage::new(role, content)),
        _ => Err(EngineError::validation(format!(
            "each chat message must be a map with string \"role\" and \"content\", got {}",
            crate::decode::show(term)
        ))),
    }
}

/// `{:ok, prompt_text}` for a list of `%{"role" => _, "content" => _}` messages.
/// `template` overrides the model's chat template when it is a string (nil: the model's).
#[rustler::nif(schedule = "DirtyCpu")]
fn apply_chat_template<'a>(
    env: Env<'a>,
    resource: ResourceArc<EngineRef>,
    messages: Term<'a>,
    add_generation_prompt: bool,
    template: Option<String>,
) -> Term<'a> {
    let result = crate::decode::proper::<Vec<Term>>(messages)
        .map_err(|_| EngineError::validation("messages must be a list of maps"))
        .and_then(|terms| terms.into_iter().map(message).collect::<Result<Vec<_>>>())
        .and_then(|msgs| {
            resource
                .engine()?
                .tokenizer()
                .apply_chat_template(&msgs, add_generation_prompt, template.as_deref())
        });
    error::reply(env, result)
}
