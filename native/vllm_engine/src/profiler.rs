//! A step profiler: while active, the engine threads record how long each phase of a step
//! took (schedule, forward, sample on the core thread; detokenize on the output thread)
//! with the batch sizes; `stop` writes them as a Chrome trace (JSON, opens in Perfetto).
//! Inactive, a phase costs one atomic load.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{EngineError, Result};

/// The trace's thread ids: one lane per engine thread.
pub const CORE_THREAD: u32 = 1;
pub const OUTPUT_THREAD: u32 = 2;

/// One complete event ("ph": "X"): a phase of one step.
#[derive(Debug, Clone)]
pub struct TraceEvent {
    pub name: &'static str,
    pub tid: u32,
    /// Microseconds since the profile started.
    pub ts_us: f64,
    pub dur_us: f64,
    pub args: Vec<(&'static str, u64)>,
}

#[derive(Default)]
pub struct Profiler {
    active: AtomicBool,
    trace: Mutex<Option<Trace>>,
}

struct Trace {
    origin: Instant,
    events: Vec<TraceEvent>,
}

/// What `stop` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSummary {
    pub num_events: usize,
    pub num_steps: usize,
}

impl Profiler {
    /// Starts recording (from an empty trace). Starting twice is a `:validation` error.
    pub fn start(&self) -> Result<()> {
        let mut trace = self.lock()?;
        if trace.is_some() {
            return Err(EngineError::validation("the profiler is already running"));
        }
        *trace = Some(Trace {
            origin: Instant::now(),
            events: Vec::new(),
        });
        self.active.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The start of a phase, or None when not profiling (then `record` does nothing).
    pub fn begin(&self) -> Option<Instant> {
        self.is_active().then(Instant::now)
    }

    /// Records a phase that began at `started` and ends now.
    pub fn record(&self, name: &'static str, tid: u32, started: Option<Instant>, args: &[(&'static str, u64)]) {
        let Some(started) = started else { return };
        let end = Instant::now();
        if let Ok(mut trace) = self.trace.lock() {
            if let Some(trace) = trace.as_mut() {
                let ts = started.saturating_duration_since(trace.origin);
                trace.events.push(TraceEvent {
                    name,
                    tid,
                    ts_us: ts.as_secs_f64() * 1e6,
                    dur_us: end.saturating_duration_since(started).as_secs_f64() * 1e6,
                    args: args.to_vec(),
                });
            }
        }
    }

    /// Stops recording and writes the trace to `path` (its directory is created).
    /// Stopping a profiler that is not running is a `:validation` error.
    pub fn stop(&self, path: &Path) -> Result<ProfileSummary> {
        let trace = {
            let mut trace = self.lock()?;
            self.active.store(false, Ordering::SeqCst);
            trace
                .take()
                .ok_or_else(|| EngineError::validation("the profiler is not running: call start_profile first"))?
        };
        let summary = ProfileSummary {
            num_events: trace.events.len(),
            num_steps: trace.events.iter().filter(|e| e.name == "forward").count(),
        };
        let json = chrome_trace(&trace.events);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::validation(format!("cannot create {}: {e}", dir.display())))?;
        }
        let text = serde_json::to_string(&json).map_err(|e| EngineError::internal(format!("trace encoding: {e}")))?;
        std::fs::write(path, text)
            .map_err(|e| EngineError::validation(format!("cannot write the trace {}: {e}", path.display())))?;
        Ok(summary)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Trace>>> {
        self.trace
            .lock()
            .map_err(|_| EngineError::internal("profiler state poisoned"))
    }
}

/// The Chrome trace event format: thread-name metadata, then one "X" event per phase.
pub fn chrome_trace(events: &[TraceEvent]) -> Value {
    let pid = std::process::id();
    let mut out = vec![
        json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": CORE_THREAD, "args": {"name": "engine-core"}}),
        json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": OUTPUT_THREAD, "args": {"name": "output"}}),
    ];
    out.extend(events.iter().map(|e| {
        let args: serde_json::Map<String, Value> = e.args.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        json!({
            "name": e.name,
            "cat": "engine",
            "ph": "X",
            "pid": pid,
            "tid": e.tid,
            "ts": e.ts_us,
            "dur": e.dur_us,
            "args": args,
        })
    }));
    json!({ "traceEvents": out, "displayTimeUnit": "ms" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_active_and_writes_a_chrome_trace() {
        let p = Profiler::default();
        p.record("forward", CORE_THREAD, p.begin(), &[("num_seqs", 1)]);
        p.start().unwrap();
        assert!(p.start().is_err());
        let t = p.begin();
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.record("forward", CORE_THREAD, t, &[("num_seqs", 3), ("num_tokens", 7)]);
        p.record("detokenize", OUTPUT_THREAD, p.begin(), &[("num_tokens", 3)]);
        let path = std::env::temp_dir().join(format!("vllm-profiler-test-{}/trace.json", std::process::id()));
        let summary = p.stop(&path).unwrap();
        assert_eq!(
            summary,
            ProfileSummary {
                num_events: 2,
                num_steps: 1
            }
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let forward = events.iter().find(|e| e["name"] == "forward").unwrap();
        assert_eq!(forward["ph"], "X");
        assert!(forward["dur"].as_f64().unwrap() >= 2000.0);
        assert_eq!(forward["args"]["num_seqs"], 3);
        assert!(p.stop(&path).is_err());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
