//! A persistent team of compute threads for the short parallel loops of a forward pass.
//!
//! A batch-1 decode step of a small model runs ~150 parallel loops of 20–300 µs each (every
//! matmul and attention call). Through rayon, a loop started from the engine thread (not a
//! pool worker) is injected into the pool and the caller blocks on a latch: two futex
//! wake-ups per loop and a caller that does none of the work. Here the caller takes tasks
//! itself and the helpers spin on an atomic for a short while after each loop before they
//! sleep, so the loops of one step meet no kernel wake-up at all.
//!
//! On by default while the calling thread gets its core (contention.rs; `VLLM_CPU_TEAM=0`
//! always rayon, `=1` always the team, see `mode`). One team per process with
//! `available_parallelism - 1` helpers. A loop uses as many
//! threads as `rayon::current_num_threads()` allows (an engine started with `num_threads`
//! keeps its limit); while another caller holds the team, a loop falls back to rayon.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper keeps spinning before it sleeps: longer than the gaps between
/// the loops of one forward pass (norms, rotary), shorter than most gaps between steps.
/// Short on purpose: on a loaded machine a thread that sleeps gets its core back promptly
/// when woken, while one that spins competes for it with everything else.
const SPIN: Duration = Duration::from_micros(100);
/// Spins (a few ns each) of a caller waiting for a helper's last task before it sleeps.
const WAIT_SPINS: u32 = 4_000;

/// A published loop: the task count and a pointer to the caller's `&dyn Fn(usize)`.
/// Two slots, picked by epoch parity, so a helper that reads a slot late reads either the
/// loop it is about to claim from or a stale one whose claim then fails.
#[derive(Default)]
struct Slot {
    func: AtomicUsize,
    tasks: AtomicUsize,
    /// Threads allowed to take part (the caller counts as one).
    width: AtomicUsize,
}

struct Team {
    /// Serialises callers; a loop that finds it taken runs on rayon instead.
    owner: Mutex<()>,
    /// (epoch << 32) | next task index. A claim is a compare-exchange that checks the epoch.
    state: AtomicU64,
    slots: [Slot; 2],
    done: AtomicUsize,
    helpers: usize,
    sleeping: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    /// The caller sleeps on `finished` once it has waited WAIT_SPINS for a helper.
    caller_waiting: AtomicBool,
    finished: Condvar,
    started: AtomicBool,
}

type TaskFn<'a> = &'a (dyn Fn(usize) + Sync);

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    let t = TEAM.get_or_init(|| Team {
        owner: Mutex::new(()),
        state: AtomicU64::new(0),
        slots: Default::default(),
        done: AtomicUsize::new(0),
        helpers: std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1),
        sleeping: AtomicUsize::new(0),
        sleep_lock: Mutex::new(()),
        wake: Condvar::new(),
        caller_waiting: AtomicBool::new(false),
        finished: Condvar::new(),
        started: AtomicBool::new(false),
    });
    if !t.started.swap(true, SeqCst) {
        for id in 0..t.helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("vllm-team-{id}"))
                .spawn(move || t.helper_loop(id));
            if spawned.is_err() {
                // Without helpers the caller runs every task itself: slower, still correct.
                break;
            }
        }
    }
    t
}

/// Loops of at most this many input rows (decode steps) go to the team; longer ones
/// (prompts: few loops of milliseconds each) to rayon, whose sleeping workers hold up
/// better when other processes want the cores.
pub const MAX_ROWS: usize = 32;

/// `for_each` for a loop over `rows` input rows: the team for short loops, rayon else.
pub fn for_each_rows(rows: usize, tasks: usize, f: impl Fn(usize) + Sync) {
    if rows <= MAX_ROWS {
        for_each(tasks, f);
    } else {
        (0..tasks).into_par_iter().for_each(&f);
    }
}

/// Runs `f(0) .. f(tasks - 1)`, each exactly once, spread over the team (or rayon's pool
/// when the team is busy); returns when all have finished.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    let team = match mode() {
        Mode::Rayon => false,
        Mode::Team => true,
        Mode::Auto => tasks > 1 && super::contention::team_allowed(),
    };
    if team {
        on_team(tasks, f);
    } else if tasks <= 1 || rayon::current_num_threads() <= 1 {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(&f);
    }
}

/// `for_each` on the team whatever `VLLM_CPU_TEAM` says.
fn on_team(tasks: usize, f: impl Fn(usize) + Sync) {
    let width = rayon::current_num_threads();
    if tasks <= 1 || width <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    let t = team();
    let Ok(_owner) = t.owner.try_lock() else {
        (0..tasks).into_par_iter().for_each(&f);
        return;
    };
    if t.helpers == 0 {
        (0..tasks).for_each(f);
        return;
    }
    let func: TaskFn = &f;
    t.run(tasks, width.min(t.helpers + 1), &func);
}

/// Holds the team so this thread's loops take the rayon path (timing comparisons).
#[cfg(test)]
pub(crate) fn hold() -> std::sync::MutexGuard<'static, ()> {
    team().owner.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The team while the calling thread gets its core, rayon while another process
    /// competes for it (contention.rs). The default.
    Auto,
    /// `VLLM_CPU_TEAM=1`: always the team (faster on free cores, 25–40% slower than rayon at
    /// load 4–5 on a 2-core VM; bench/RESULTS.md, C2 session 4).
    Team,
    /// `VLLM_CPU_TEAM=0`: always rayon.
    Rayon,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("VLLM_CPU_TEAM").as_deref() {
        Ok("1") => Mode::Team,
        Ok("0") => Mode::Rayon,
        _ => Mode::Auto,
    })
}

impl Team {
    fn run(&self, tasks: usize, width: usize, func: &TaskFn) {
        let epoch = (self.state.load(SeqCst) >> 32) + 1;
        let slot = &self.slots[(epoch & 1) as usize];
        slot.func.store(func as *const TaskFn as usize, SeqCst);
        slot.tasks.store(tasks, SeqCst);
        slot.width.store(width, SeqCst);
        self.done.store(0, SeqCst);
        self.state.store(epoch << 32, SeqCst);
        if self.sleeping.load(SeqCst) > 0 {
            let _g = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
        let mine = self.claim_all(epoch, tasks, func);
        let mut spins = 0u32;
        while self.done.load(SeqCst) + mine < tasks {
            spins += 1;
            if spins < WAIT_SPINS {
                std::hint::spin_loop();
                continue;
            }
            // The helper is off its core (a loaded machine): sleep until it finishes rather
            // than burn the time slice it needs.
            let g = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.caller_waiting.store(true, SeqCst);
            let g = if self.done.load(SeqCst) + mine < tasks {
                self.finished.wait(g).unwrap_or_else(|p| p.into_inner())
            } else {
                g
            };
            self.caller_waiting.store(false, SeqCst);
            drop(g);
        }
    }

    /// Takes tasks of loop `epoch` until none is left; returns how many this thread ran.
    fn claim_all(&self, epoch: u64, tasks: usize, func: &TaskFn) -> usize {
        let mut ran = 0;
        let mut cur = self.state.load(SeqCst);
        loop {
            if cur >> 32 != epoch || (cur & 0xFFFF_FFFF) as usize >= tasks {
                return ran;
            }
            match self.state.compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst) {
                Ok(_) => {
                    func((cur & 0xFFFF_FFFF) as usize);
                    ran += 1;
                    cur += 1;
                }
                Err(now) => cur = now,
            }
        }
    }

    fn helper_loop(&self, id: usize) {
        let mut seen = self.state.load(SeqCst) >> 32;
        loop {
            let mut idle_since = Instant::now();
            let mut spins = 0u32;
            let epoch = loop {
                let e = self.state.load(SeqCst) >> 32;
                if e != seen {
                    break e;
                }
                spins += 1;
                if spins.is_multiple_of(64) && idle_since.elapsed() > SPIN {
                    let g = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
                    self.sleeping.fetch_add(1, SeqCst);
                    let g = if self.state.load(SeqCst) >> 32 == seen {
                        self.wake.wait(g).unwrap_or_else(|p| p.into_inner())
                    } else {
                        g
                    };
                    self.sleeping.fetch_sub(1, SeqCst);
                    drop(g);
                    idle_since = Instant::now();
                }
                std::hint::spin_loop();
            };
            seen = epoch;
            let slot = &self.slots[(epoch & 1) as usize];
            let (func, tasks, width) = (slot.func.load(SeqCst), slot.tasks.load(SeqCst), slot.width.load(SeqCst));
            if id + 1 >= width {
                continue;
            }
            // The slot was read after `epoch` was published; if a newer loop has since been
            // published, every claim below fails on the epoch check and `func` is never used.
            let mut cur = self.state.load(SeqCst);
            loop {
                if cur >> 32 != epoch || (cur & 0xFFFF_FFFF) as usize >= tasks {
                    break;
                }
                match self.state.compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst) {
                    Ok(_) => {
                        // SAFETY: the claim succeeded for `epoch`, so its caller is inside
                        // `run` (it waits for this task's `done`), and `func` points at its
                        // live `&dyn Fn`, published before the epoch.
                        let f = unsafe { *(func as *const TaskFn) };
                        f((cur & 0xFFFF_FFFF) as usize);
                        self.done.fetch_add(1, SeqCst);
                        if self.caller_waiting.load(SeqCst) {
                            let _g = self.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
                            self.finished.notify_all();
                        }
                        cur += 1;
                    }
                    Err(now) => cur = now,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_across_many_loops_and_callers() {
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    for round in 0..2000usize {
                        let tasks = 1 + (round * 7 + c) % 37;
                        let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                        on_team(tasks, |i| {
                            hits[i].fetch_add(1, SeqCst);
                        });
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }
}
