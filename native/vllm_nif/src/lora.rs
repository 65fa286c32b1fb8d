//! LoRA adapters: add, remove, pin and list them on a running engine. A LoRA request is a
//! map (or `%Vllm.LoRARequest{}`) with `lora_name`, `lora_int_id` and `lora_path`.

use rustler::{Encoder, Env, ResourceArc, Term};
use vllm_engine::lora::{LoRARequest, LoraInfo};
use vllm_engine::{EngineError, Result};

use crate::decode;
use crate::engine_ref::EngineRef;
use crate::error;

/// Loads and registers an adapter: `{:ok, true}` when added, `{:ok, false}` when that id
/// already names that path. DirtyIo: it reads the adapter's files.
#[rustler::nif(schedule = "DirtyIo")]
fn add_lora<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, request: Term<'a>) -> Term<'a> {
    let result = decode::lora_request_term(request).and_then(|req| resource.engine()?.add_lora(req));
    error::reply(env, result)
}

/// `{:ok, removed?}`.
#[rustler::nif]
fn remove_lora<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, id: Term<'a>) -> Term<'a> {
    let result = lora_id(id).and_then(|id| resource.engine()?.remove_lora(id));
    error::reply(env, result)
}

/// `{:ok, true}` once the adapter holds a slot it keeps until removed.
#[rustler::nif(schedule = "DirtyIo")]
fn pin_lora<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, id: Term<'a>) -> Term<'a> {
    let result = lora_id(id).and_then(|id| resource.engine()?.pin_lora(id));
    error::reply(env, result)
}

/// `{:ok, [%{lora_name, lora_int_id, lora_path, pinned}]}`, by id.
#[rustler::nif]
fn list_loras<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    let result = resource.engine().map(|e| e.list_loras());
    match result {
        Ok(list) => {
            let maps: Vec<Term> = list.iter().map(|info| info_map(env, info)).collect();
            error::reply(env, Ok(maps))
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

fn info_map<'a>(env: Env<'a>, info: &LoraInfo) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    let path = info.lora_path.to_string_lossy().into_owned();
    for (key, value) in [
        ("lora_name", info.lora_name.encode(env)),
        ("lora_int_id", info.lora_int_id.encode(env)),
        ("lora_path", path.encode(env)),
        ("pinned", info.pinned.encode(env)),
    ] {
        if let Ok(k) = rustler::Atom::from_str(env, key) {
            map = map.map_put(k, value).unwrap_or(map);
        }
    }
    map
}

fn lora_id(term: Term) -> Result<u32> {
    match term.decode::<i64>() {
        Ok(id) if (1..=u32::MAX as i64).contains(&id) => Ok(id as u32),
        _ => Err(EngineError::validation(format!(
            "lora_int_id must be a positive integer, got {}",
            decode::show(term)
        ))),
    }
}

/// Used by `decode`: a LoRA request term to the engine's type.
pub fn lora_request(term: Term, name: Option<String>, path: Option<String>) -> Result<LoRARequest> {
    let id = lora_id(term)?;
    let path = path.ok_or_else(|| EngineError::validation("LoRA request `lora_path` is required"))?;
    Ok(LoRARequest::new(name.unwrap_or_else(|| format!("lora-{id}")), id, path))
}
