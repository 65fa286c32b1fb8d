//! Engine control and introspection: model limits, memory report, sleep / wake-up, ping,
//! the step profiler, and tying the engine's life to its owning process.

use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};
use vllm_engine::EngineError;

use crate::engine_ref::EngineRef;
use crate::{atoms, error};

/// A map with atom keys.
fn map<'a>(env: Env<'a>, entries: Vec<(&str, Term<'a>)>) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    for (key, value) in entries {
        if let Ok(atom) = rustler::Atom::from_str(env, key) {
            if let Ok(next) = map.map_put(atom, value) {
                map = next;
            }
        }
    }
    map
}

/// `{:ok, %{vocab_size, eos_token_ids, bos_token_id, max_model_len, max_num_seqs,
/// max_num_batched_tokens, block_size, num_blocks, architecture}}`.
#[rustler::nif]
fn engine_info<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    match resource.engine() {
        Ok(engine) => {
            let l = engine.limits();
            let c = engine.model_config();
            let info = map(
                env,
                vec![
                    ("vocab_size", l.vocab_size.encode(env)),
                    ("eos_token_ids", l.eos_token_ids.encode(env)),
                    ("bos_token_id", c.and_then(|c| c.bos_token_id).encode(env)),
                    ("max_model_len", l.max_model_len.encode(env)),
                    ("max_num_seqs", l.max_num_seqs.encode(env)),
                    ("max_num_batched_tokens", l.max_num_batched_tokens.encode(env)),
                    ("block_size", l.block_size.encode(env)),
                    ("num_blocks", l.num_blocks.encode(env)),
                    (
                        "architecture",
                        match (c, engine.encoder_config()) {
                            (Some(c), _) => format!("{:?}", c.architecture),
                            (None, Some(e)) => e.architecture.clone(),
                            (None, None) => String::new(),
                        }
                        .encode(env),
                    ),
                    ("alive", engine.is_alive().encode(env)),
                ],
            );
            (atoms::ok(), info).encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// `{:ok, %{weights_bytes, kv_cache_bytes, sleep_level}}`.
#[rustler::nif]
fn memory_usage<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    match resource.engine() {
        Ok(engine) => {
            let m = engine.memory_usage();
            let usage = map(
                env,
                vec![
                    ("weights_bytes", m.weights_bytes.encode(env)),
                    ("kv_cache_bytes", m.kv_cache_bytes.encode(env)),
                    ("sleep_level", m.sleep_level.encode(env)),
                ],
            );
            (atoms::ok(), usage).encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// `{:ok, %{prompt_tokens, generation_tokens, num_preemptions, prefix_cache_queries,
/// prefix_cache_hits, kv_cache_usage}}`: totals since start-up and the KV usage now.
#[rustler::nif]
fn counters<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    match resource.engine() {
        Ok(engine) => {
            let s = engine.stats();
            let counters = map(
                env,
                vec![
                    ("prompt_tokens", s.prompt_tokens_total.encode(env)),
                    ("generation_tokens", s.generation_tokens_total.encode(env)),
                    ("num_preemptions", s.num_preemptions.encode(env)),
                    ("prefix_cache_queries", s.prefix_cache_queries.encode(env)),
                    ("prefix_cache_hits", s.prefix_cache_hits.encode(env)),
                    ("kv_cache_usage", s.kv_cache_usage.encode(env)),
                ],
            );
            (atoms::ok(), counters).encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// `{:ok, reset?}`: forgets the cached prefixes (see `Engine::reset_prefix_cache`).
/// DirtyIo: waits for the step in progress.
#[rustler::nif(schedule = "DirtyIo")]
fn reset_prefix_cache<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, reset_running_requests: bool) -> Term<'a> {
    error::reply(
        env,
        resource
            .engine()
            .and_then(|e| e.reset_prefix_cache(reset_running_requests)),
    )
}

/// `:ok` once the core thread answered (within `timeout_ms`).
#[rustler::nif(schedule = "DirtyIo")]
fn ping<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, timeout_ms: u64) -> Term<'a> {
    let result = resource
        .engine()
        .and_then(|e| e.ping(std::time::Duration::from_millis(timeout_ms)));
    unit_reply(env, result)
}

/// Level 1 or 2 (see `Engine::sleep`). DirtyIo: waits for the current step to end.
#[rustler::nif(schedule = "DirtyIo")]
fn sleep<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, level: u8) -> Term<'a> {
    unit_reply(env, resource.engine().and_then(|e| e.sleep(level)))
}

/// DirtyIo: after a level-2 sleep this reloads the weights from disk.
#[rustler::nif(schedule = "DirtyIo")]
fn wake_up<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, weights: bool, kv_cache: bool) -> Term<'a> {
    unit_reply(env, resource.engine().and_then(|e| e.wake_up(weights, kv_cache)))
}

#[rustler::nif]
fn start_profile<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    unit_reply(env, resource.engine().and_then(|e| e.start_profile()))
}

/// Writes the trace to `path`: `{:ok, %{num_events, num_steps}}`. DirtyIo: file I/O.
#[rustler::nif(schedule = "DirtyIo")]
fn stop_profile<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, path: String) -> Term<'a> {
    match resource
        .engine()
        .and_then(|e| e.stop_profile(std::path::Path::new(&path)))
    {
        Ok(s) => {
            let summary = map(
                env,
                vec![
                    ("num_events", s.num_events.encode(env)),
                    ("num_steps", s.num_steps.encode(env)),
                ],
            );
            (atoms::ok(), summary).encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// Whether the engine can still serve.
#[rustler::nif]
fn is_alive(resource: ResourceArc<EngineRef>) -> bool {
    resource.engine().map(|e| e.is_alive()).unwrap_or(false)
}

/// Shuts the engine down when `owner` exits, however it exits (even `:kill`, which runs
/// no Elixir code): the engine's threads never outlive the process that owns it.
#[rustler::nif]
fn monitor_owner<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, owner: LocalPid) -> Term<'a> {
    match resource.monitor(Some(env), &owner) {
        Some(_) => atoms::ok().encode(env),
        None => error::reply::<()>(env, Err(EngineError::engine_dead("the owning process is not alive"))),
    }
}

fn unit_reply(env: Env, result: Result<(), EngineError>) -> Term {
    match result {
        Ok(()) => atoms::ok().encode(env),
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}
