//! Copies of a decode graph's argmax output into page-locked host memory, each followed by
//! an event the host waits on. A copy into pageable memory would block the host until the
//! stream reached it; into pinned memory it is queued like a kernel, so the host can launch
//! the next step's graph behind it (the decode lookahead) and wait for this copy alone.
//! Two slots, taken in turn: a slot is written again two copies later, after its reader
//! (the step before) has read it.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result as driver, sys, CudaContext, CudaStream};

use crate::error::{EngineError, Result};

struct Slot {
    host: *mut u32,
    len: usize,
    done: sys::CUevent,
}

pub struct ArgmaxFetch {
    context: Arc<CudaContext>,
    slots: Vec<Slot>,
    next: usize,
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA argmax fetch {what}: {e}"))
}

impl ArgmaxFetch {
    /// Two slots of `len` u32 each, on the stream's context (bound by the caller's use).
    pub fn new(stream: &CudaStream, len: usize) -> Result<Self> {
        stream.context().bind_to_thread().map_err(|e| cuda_err("bind", e))?;
        let mut slots = Vec::with_capacity(2);
        for _ in 0..2 {
            // SAFETY: plain page-locked memory (no write-combining: the host reads it).
            let host = unsafe { driver::malloc_host(len.max(1) * 4, 0) }.map_err(|e| cuda_err("alloc", e))? as *mut u32;
            let done = driver::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
            let done = match done {
                Ok(done) => done,
                Err(e) => {
                    // SAFETY: allocated just above, never handed out.
                    unsafe { driver::free_host(host.cast()) }.ok();
                    return Err(cuda_err("event", e));
                }
            };
            slots.push(Slot { host, len, done });
        }
        Ok(ArgmaxFetch {
            context: stream.context().clone(),
            slots,
            next: 0,
        })
    }

    /// Queues a copy of `len` u32 from `src` on `stream`: the slot to `wait` on.
    pub fn start(&mut self, stream: &CudaStream, src: u64, len: usize) -> Result<usize> {
        let slot = self.next;
        self.next ^= 1;
        let s = &self.slots[slot];
        if len > s.len {
            return Err(cuda_err("copy", format!("{len} values do not fit {}", s.len)));
        }
        // SAFETY: `host` holds `s.len >= len` u32 for the life of self; the copy is waited on
        // (`wait`) before the slot is read, and Drop synchronizes before freeing it.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(s.host, len);
            driver::memcpy_dtoh_async(dst, src, stream.cu_stream()).map_err(|e| cuda_err("copy", e))?;
            driver::event::record(s.done, stream.cu_stream()).map_err(|e| cuda_err("record", e))?;
        }
        Ok(slot)
    }

    /// Waits for `slot`'s copy: its first `len` values.
    pub fn wait(&self, slot: usize, len: usize) -> Result<&[u32]> {
        let s = &self.slots[slot];
        // SAFETY: a recorded event of this context; then the copy has landed.
        unsafe { driver::event::synchronize(s.done) }.map_err(|e| cuda_err("wait", e))?;
        // SAFETY: `host` holds `s.len` u32, written by the completed copy.
        Ok(unsafe { std::slice::from_raw_parts(s.host, len.min(s.len)) })
    }
}

impl Drop for ArgmaxFetch {
    fn drop(&mut self) {
        self.context.bind_to_thread().ok();
        for s in &self.slots {
            // SAFETY: wait for any copy still in flight, then free what `new` made.
            unsafe {
                driver::event::synchronize(s.done).ok();
                driver::event::destroy(s.done).ok();
                driver::free_host(s.host.cast()).ok();
            }
        }
    }
}

// SAFETY: used only by whoever holds the decode graphs' lock, one thread at a time.
unsafe impl Send for ArgmaxFetch {}
