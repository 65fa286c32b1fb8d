//! The engine's tokenizer, exposed for `Vllm.Tokenizer` and chat prompts. DirtyCpu: long
//! texts take milliseconds.

use rustler::{Env, ResourceArc, Term};
use vllm_engine::EngineError;

use crate::engine_ref::EngineRef;
use crate::error;

/// `{:ok, [token_id]}` for `text`.
#[rustler::nif(schedule = "DirtyCpu")]
fn encode<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, text: Term<'a>, add_special_tokens: bool) -> Term<'a> {
    let result = text
        .decode::<String>()
        .map_err(|_| EngineError::validation(format!("text must be a string, got {}", crate::decode::show(text))))
        .and_then(|text| resource.engine()?.tokenizer().encode(&text, add_special_tokens));
    error::reply(env, result)
}

/// `{:ok, text}` for a list of token ids.
#[rustler::nif(schedule = "DirtyCpu")]
fn decode<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, ids: Term<'a>, skip_special_tokens: bool) -> Term<'a> {
    let result = crate::decode::proper::<Vec<u32>>(ids)
        .map_err(|_| {
            EngineError::validation(format!(
                "token ids must be a list of non-negative integers, got {}",
                crate::decode::show(ids)
            ))
        })
        .and_then(|ids| {
            let engine = resource.engine()?;
            let vocab = engine.limits().vocab_size;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(EngineError::validation(format!(
                    "token id {bad} is out of vocabulary (size {vocab})"
                )));
            }
            engine.tokenizer().decode(&ids, skip_special_tokens)
        });
    error::reply(env, result)
}
