//! EngineError -> `{:error, {category_atom, message}}`, the shape `Vllm.Error.from_native/1`
//! turns into a `%Vllm.Error{}`.

use rustler::{Atom, Encoder, Env, Term};
use vllm_engine::EngineError;

use crate::atoms;

/// `{category_atom, message}`, the reason part of an error tuple (also used in
/// `{:vllm_error, request_id, reason}` messages).
pub fn reason_term<'a>(env: Env<'a>, err: &EngineError) -> Term<'a> {
    let category = Atom::from_str(env, err.category.as_str())
        .map(|a| a.encode(env))
        .unwrap_or_else(|_| atoms::error().encode(env));
    (category, err.message.as_str()).encode(env)
}

/// `{:ok, value}` or `{:error, {category, message}}`.
pub fn reply<'a, T: Encoder>(env: Env<'a>, result: Result<T, EngineError>) -> Term<'a> {
    match result {
        Ok(value) => (atoms::ok(), value).encode(env),
        Err(err) => (atoms::error(), reason_term(env, &err)).encode(env),
    }
}

/// Turns a caught panic payload into an `:internal` error, so that a bug surfaces as an
/// error tuple instead of taking a reply with it.
pub fn panic_error(context: &str, payload: Box<dyn std::any::Any + Send>) -> EngineError {
    let detail = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    EngineError::internal(format!("{context} panicked: {detail}"))
}
