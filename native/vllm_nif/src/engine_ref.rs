//! The engine as a NIF resource, and its lifecycle: start (off the schedulers), stats,
//! shutdown. Dropping the last reference shuts the engine down.

use std::panic::{self, AssertUnwindSafe};

use rustler::{Encoder, Env, LocalPid, OwnedEnv, Resource, ResourceArc, Term};
use vllm_engine::{Engine, EngineError, EngineStats};

use crate::{atoms, decode, error};

pub struct EngineRef {
    /// Always Some until Drop moves it to a shutdown thread.
    engine: Option<Engine>,
}

// Rustler requires resources to be RefUnwindSafe. A panic inside a NIF call can leave no
// EngineRef state half-updated: EngineRef itself is immutable, and the engine guards its
// shared state with its own locks and threads.
impl panic::RefUnwindSafe for EngineRef {}

#[rustler::resource_impl]
impl Resource for EngineRef {
    /// The owning process (see `monitor_owner`) exited: stop the engine with it.
    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: rustler::Monitor) {
        if let Some(engine) = self.engine.as_ref() {
            engine.shutdown();
        }
    }
}

impl EngineRef {
    pub fn engine(&self) -> Result<&Engine, EngineError> {
        self.engine
            .as_ref()
            .ok_or_else(|| EngineError::engine_dead("the engine has been dropped"))
    }
}

impl Drop for EngineRef {
    fn drop(&mut self) {
        // Shutting down joins engine threads; do it off whatever thread the GC runs us on.
        if let Some(engine) = self.engine.take() {
            std::thread::spawn(move || engine.shutdown());
        }
    }
}

/// Starts an engine on a new thread (loading a model takes seconds) and answers
/// `{:vllm_engine_started, ref, {:ok, resource} | {:error, {category, message}}}` to
/// `reply_to`. Returns `:ok`, or `{:error, reason}` at once for bad options.
#[rustler::nif]
fn engine_start<'a>(
    env: Env<'a>,
    opts: Term<'a>,
    reply_to: LocalPid,
    reference: Term<'a>,
) -> Term<'a> {
    let args = match decode::engine_args(opts) {
        Ok(args) => args,
        Err(err) => return error::reply::<()>(env, Err(err)),
    };
    let mut owned = OwnedEnv::new();
    let saved_ref = owned.save(reference);
    let spawned = std::thread::Builder::new()
        .name("vllm-engine-start".into())
        .spawn(move || {
            let started = panic::catch_unwind(AssertUnwindSafe(|| Engine::new(args)))
                .unwrap_or_else(|payload| Err(error::panic_error("Engine::new", payload)))
                .map(|engine| {
                    ResourceArc::new(EngineRef {
                        engine: Some(engine),
                    })
                });
            let _ = owned.send_and_clear(&reply_to, |env| {
                (
                    atoms::vllm_engine_started(),
                    saved_ref.load(env),
                    error::reply(env, started),
                )
                    .encode(env)
            });
        });
    match spawned {
        Ok(_) => atoms::ok().encode(env),
        Err(e) => error::reply::<()>(
            env,
            Err(EngineError::internal(format!(
                "cannot spawn the start thread: {e}"
            ))),
        ),
    }
}

fn stats_map<'a>(env: Env<'a>, s: &EngineStats) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    for (key, value) in [
        ("total_blocks", s.total_blocks),
        ("free_blocks", s.free_blocks),
        ("num_running", s.num_running),
        ("num_waiting", s.num_waiting),
    ] {
        if let Ok(atom) = rustler::Atom::from_str(env, key) {
            if let Ok(next) = map.map_put(atom, value) {
                map = next;
            }
        }
    }
    map
}

/// `{:ok, %{total_blocks, free_blocks, num_running, num_waiting}}`.
#[rustler::nif]
fn stats<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    match resource.engine() {
        Ok(engine) => {
            let s = engine.stats();
            (atoms::ok(), stats_map(env, &s)).encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// Aborts everything in flight and stops the engine threads. Idempotent. DirtyIo: it joins
/// threads that may be finishing a step.
#[rustler::nif(schedule = "DirtyIo")]
fn shutdown(resource: ResourceArc<EngineRef>) -> rustler::Atom {
    if let Ok(engine) = resource.engine() {
        engine.shutdown();
    }
    atoms::ok()
}
