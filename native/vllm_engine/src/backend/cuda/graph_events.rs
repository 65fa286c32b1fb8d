//! `VLLM_GRAPH_EVENTS=1` (measurement, issue 7): CUDA events around each decode graph
//! replay, to split a step's wall time into the graph itself and the device's idle time
//! between one replay's end and the next one's start (the host's turnaround: fetching the
//! sampled ids, scheduling, preparing the next inputs, launching).
//! Printed when the graphs drop.

use candle_core::cuda_backend::cudarc::driver::{result as driver, sys};

/// Idle gaps longer than this are a prompt step or the end of a run, not a decode turnaround.
const MAX_TURNAROUND_MS: f32 = 0.2;

pub struct GraphEvents {
    /// Before the graph launch, after it.
    start: sys::CUevent,
    end: sys::CUevent,
    /// The previous replay's end (swapped with `end` after each collect).
    prev_end: sys::CUevent,
    has_prev: bool,
    pending: bool,
    steps: u64,
    graph_ms: f64,
    turnarounds: u64,
    turnaround_ms: f64,
    /// Turnaround samples, for the median.
    samples: Vec<f32>,
}

fn event() -> Option<sys::CUevent> {
    let mut e: sys::CUevent = std::ptr::null_mut();
    // SAFETY: a plain event on the current context (the graphs' stream's, bound by the caller).
    let r = unsafe { sys::cuEventCreate(&mut e, 0) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(e)
}

fn elapsed(a: sys::CUevent, b: sys::CUevent) -> Option<f32> {
    // SAFETY: both events were recorded and have completed (the caller synchronized).
    unsafe { driver::event::elapsed(a, b) }.ok()
}

impl GraphEvents {
    /// Some when VLLM_GRAPH_EVENTS is set and the events could be made.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("VLLM_GRAPH_EVENTS")?;
        Some(GraphEvents {
            start: event()?,
            end: event()?,
            prev_end: event()?,
            has_prev: false,
            pending: false,
            steps: 0,
            graph_ms: 0.0,
            turnarounds: 0,
            turnaround_ms: 0.0,
            samples: Vec::new(),
        })
    }

    fn record(e: sys::CUevent, stream: sys::CUstream) {
        // SAFETY: a live event and the graphs' stream; a failure only loses a sample.
        let _ = unsafe { sys::cuEventRecord(e, stream) };
    }

    pub fn before_launch(&mut self, stream: sys::CUstream) {
        Self::record(self.start, stream);
    }

    pub fn after_launch(&mut self, stream: sys::CUstream) {
        Self::record(self.end, stream);
        self.pending = true;
    }

    /// After the stream was synchronized: adds this replay's times.
    pub fn collect(&mut self) {
        if !self.pending {
            return;
        }
        self.pending = false;
        let Some(graph) = elapsed(self.start, self.end) else {
            return;
        };
        self.steps += 1;
        self.graph_ms += graph as f64;
        if self.has_prev {
            if let Some(gap) = elapsed(self.prev_end, self.start).filter(|&g| g < MAX_TURNAROUND_MS) {
                self.turnarounds += 1;
                self.turnaround_ms += gap as f64;
                self.samples.push(gap);
            }
        }
        std::mem::swap(&mut self.prev_end, &mut self.end);
        self.has_prev = true;
    }
}

impl Drop for GraphEvents {
    fn drop(&mut self) {
        let per = |ms: f64, n: u64| ms * 1e3 / n.max(1) as f64;
        self.samples.sort_by(f32::total_cmp);
        let median = self.samples.get(self.samples.len() / 2).copied().unwrap_or(0.0) * 1e3;
        eprintln!(
            "graph events: {} replays; per replay: launch + graph {:.1} us; device idle between replays {:.1} us mean, {:.1} us median ({} gaps)",
            self.steps,
            per(self.graph_ms, self.steps),
            per(self.turnaround_ms, self.turnarounds),
            median,
            self.turnarounds
        );
        for e in [self.start, self.end, self.prev_end] {
            // SAFETY: events this struct created; nothing records them any more.
            let _ = unsafe { sys::cuEventDestroy_v2(e) };
        }
    }
}
