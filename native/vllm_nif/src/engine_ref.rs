//! The engine as a NIF resource, and its lifecycle: start (off the schedulers), stats,
//! shutdown. Dropping the last reference shuts the engine down.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

use rustler::{Encoder, Env, LocalPid, OwnedEnv, Resource, ResourceArc, Term};
use vllm_engine::{Engine, EngineError, EngineStats};

use crate::{atoms, decode, error};

/// Engine resources created, and released (their destructor ran and the engine's threads
/// were joined): tests prove that a shut-down engine's resource really goes.
static ENGINES_CREATED: AtomicU64 = AtomicU64::new(0);
static ENGINES_RELEASED: AtomicU64 = AtomicU64::new(0);

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
            std::thread::spawn(move || {
                engine.shutdown();
                drop(engine);
                ENGINES_RELEASED.fetch_add(1, Ordering::SeqCst);
            });
        }
    }
}

/// Starts an engine on a new thread (loading a model takes seconds) and answers
/// `{:vllm_engine_started, ref, {:ok, resource} | {:error, {category, message}}}` to
/// `reply_to`. Returns `:ok`, or `{:error, reason}` at once for bad options.
#[rustler::nif]
fn engine_start<'a>(env: Env<'a>, opts: Term<'a>, reply_to: LocalPid, reference: Term<'a>) -> Term<'a> {
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
                    ENGINES_CREATED.fetch_add(1, Ordering::SeqCst);
                    ResourceArc::new(EngineRef { engine: Some(engine) })
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
            Err(EngineError::internal(format!("cannot spawn the start thread: {e}"))),
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

/// `%{created: n, released: m}`: engine resources created and released since the NIF
/// loaded (released: destructor ran, threads joined, memory freed).
#[rustler::nif]
fn resource_counts(env: Env) -> Term {
    let mut map = rustler::types::map::map_new(env);
    for (key, value) in [
        ("created", ENGINES_CREATED.load(Ordering::SeqCst)),
        ("released", ENGINES_RELEASED.load(Ordering::SeqCst)),
    ] {
        if let Ok(atom) = rustler::Atom::from_str(env, key) {
            if let Ok(next) = map.map_put(atom, value) {
                map = next;
            }
        }
    }
    map
}

/// Sends `{:vllm_engine_dead, message}` to `pid` when the engine dies of an internal
/// error (not on shutdown), so the engine process can stop and be restarted.
#[rustler::nif]
fn watch_death<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>, pid: LocalPid) -> Term<'a> {
    match resource.engine() {
        Ok(engine) => {
            engine.on_death(Box::new(move |why: &str| send_death(pid, why.to_string())));
            atoms::ok().encode(env)
        }
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

fn send_death(pid: LocalPid, why: String) {
    // OwnedEnv cannot send from a scheduler thread (on_death may call us at once).
    let send = move || {
        let mut env = OwnedEnv::new();
        let _ = env.send_and_clear(&pid, |env| (atoms::vllm_engine_dead(), why.as_str()).encode(env));
    };
    if rustler::thread::is_scheduler_thread() {
        std::thread::spawn(send);
    } else {
        send();
    }
}

/// Test-only: panics the engine's core thread (see `Engine::inject_fault`; refused with
/// `:unsupported` unless VLLM_FAULT_INJECTION=1). DirtyIo: it waits for the core.
#[rustler::nif(schedule = "DirtyIo")]
fn inject_fault<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    let key = vllm_engine::control::FAULT_INJECTION_ENV;
    if vm_getenv(key).as_deref() != Some("1") {
        return error::reply::<()>(
            env,
            Err(EngineError::unsupported(format!(
                "fault injection is off (it needs {key}=1 in the environment: tests only)"
            ))),
        );
    }
    match resource.engine().and_then(|engine| engine.inject_fault()) {
        Ok(()) => atoms::ok().encode(env),
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// The VM's view of an environment variable (what `System.get_env/1` sees, including
/// `System.put_env/2`; std::env sees only the environment the OS process started with).
fn vm_getenv(key: &str) -> Option<String> {
    let key = std::ffi::CString::new(key).ok()?;
    let mut buf = vec![0u8; 64];
    let mut size: usize = buf.len();
    // SAFETY: key is NUL-terminated; buf has `size` writable bytes.
    let rc = unsafe { rustler::sys::enif_getenv(key.as_ptr(), buf.as_mut_ptr().cast(), &mut size) };
    // 0: found (size = its length); 1: longer than the buffer (not "1"); -1: unset.
    if rc != 0 || size > buf.len() {
        return None;
    }
    buf.truncate(size);
    String::from_utf8(buf).ok()
}
