//! Submitting and aborting requests.

use rustler::{Atom, Encoder, Env, LocalPid, ResourceArc, Term};
use vllm_engine::{EngineError, EngineRequest, Result};

use crate::decode::{self, Prompt};
use crate::engine_ref::EngineRef;
use crate::flow::{Credit, Flow};
use crate::sink::PidSink;
use crate::{atoms, error};

/// Queues a request whose outputs go to `to` as `{:vllm, request_id, output}` messages.
/// `request_opts`: `%{priority: int, watcher: pid | nil}` (the watcher hears
/// `{:vllm_request_done, request_id}` when the request ends). DirtyCpu: tokenizing a long
/// prompt takes milliseconds. Returns `:ok` or `{:error, {category, message}}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn add_request<'a>(
    env: Env<'a>,
    resource: ResourceArc<EngineRef>,
    request_id: Term<'a>,
    prompt: Term<'a>,
    params: Term<'a>,
    to: Term<'a>,
    request_opts: Term<'a>,
) -> Term<'a> {
    match submit(&resource, request_id, prompt, params, to, request_opts) {
        Ok(()) => atoms::ok().encode(env),
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

fn pid_arg(term: Term, what: &str) -> Result<LocalPid> {
    term.decode::<LocalPid>()
        .map_err(|_| EngineError::validation(format!("{what} must be a local pid, got {}", decode::show(term))))
}

fn submit(
    resource: &EngineRef,
    request_id: Term,
    prompt: Term,
    params: Term,
    to: Term,
    request_opts: Term,
) -> Result<()> {
    let request_id = decode::request_id(request_id)?;
    let prompt = decode::prompt(prompt)?;
    let sampling = decode::sampling_params(params)?;
    let owner = pid_arg(to, "`to`")?;
    let priority = decode::priority(request_opts)?;
    let lora = decode::lora_request(request_opts)?;
    let watcher = match Atom::from_str(request_opts.get_env(), "watcher")
        .ok()
        .and_then(|k| request_opts.map_get(k).ok())
    {
        Some(term) if term.decode::<Atom>().ok() != Some(atoms::nil()) => Some(pid_arg(term, "`watcher`")?),
        _ => None,
    };
    let flow = flow(request_opts, sampling.output_kind)?;
    let engine = resource.engine()?;

    let (text, ids) = match prompt {
        Prompt::Text(text) => {
            let ids = engine.tokenizer().encode(&text, true)?;
            (Some(text), ids)
        }
        Prompt::TokenIds(ids) => (None, ids),
    };
    if ids.is_empty() {
        return Err(EngineError::validation("prompt must not be empty"));
    }
    // truncate_prompt_tokens is applied by the engine (it knows max_model_len for -1).

    let mut request = EngineRequest::new(request_id.clone(), ids, sampling);
    request.prompt = text;
    request.priority = priority;
    request.lora = lora;
    let sink = PidSink::new(request_id, owner, watcher).with_flow(flow);
    engine.add_request(request, Box::new(sink))
}

/// `credit:` (a `new_credit/0` resource) and `max_unread:` in the request options turn on
/// back-pressure (flow.rs); without a credit every output is sent at once.
fn flow(request_opts: Term, kind: vllm_engine::OutputKind) -> Result<Option<Flow>> {
    let get = |key: &str| {
        Atom::from_str(request_opts.get_env(), key)
            .ok()
            .and_then(|k| request_opts.map_get(k).ok())
            .filter(|t| t.decode::<Atom>().ok() != Some(atoms::nil()))
    };
    let Some(credit) = get("credit") else {
        return Ok(None);
    };
    let credit = credit.decode::<ResourceArc<Credit>>().map_err(|_| {
        EngineError::validation(format!(
            "request option `credit` must be a credit reference, got {}",
            decode::show(credit)
        ))
    })?;
    let max_unread = match get("max_unread") {
        None => DEFAULT_MAX_UNREAD,
        Some(term) => match term.decode::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(EngineError::validation(format!(
                    "request option `max_unread` must be a positive integer, got {}",
                    decode::show(term)
                )))
            }
        },
    };
    Ok(Some(Flow::new(credit, max_unread, kind)))
}

/// Unread outputs a stream may hold before the sink merges new ones.
const DEFAULT_MAX_UNREAD: u64 = 32;

/// Aborts a live request (its owner gets a final output with finish_reason :abort);
/// unknown or finished ids are ignored. Returns `:ok`.
#[rustler::nif]
fn abort<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, request_id: Term<'a>) -> Term<'a> {
    let result = decode::request_id(request_id).and_then(|id| {
        resource.engine()?.abort(&id);
        Ok(())
    });
    match result {
        Ok(()) => atoms::ok().encode(env),
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}
