//! The two slots of page-locked host memory decode graph replays work through, taken in
//! turn by the launches (each graph is captured once a slot): the graph's first kernel
//! reads the step's inputs from its slot (ops::launch_graph_embedding) and its last writes
//! the argmax there, so nothing is copied on the stream between replays (the two copies
//! cost ~10 µs a W3 step, bench/RESULTS.md, issue 7, session 18). An event after each
//! launch tells the host when that launch, and so its slot, is done: a slot's inputs are
//! written again only after the launch before that used it has ended, and its argmax read
//! only then.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result as driver, sys, CudaContext, CudaStream};

use crate::error::{EngineError, Result};

/// u32 of a slot's inputs ahead of the graph buffers' `meta` layout: [0] the block-table
/// entries to copy a row (ops::launch_graph_embedding), the rest unused. Must match the
/// `staged + 4` of graph_embedding in kernels/ops.cu.
pub const INPUTS_HEADER: usize = 4;

/// Page-locked host memory the device reads and writes through its own address.
struct Mapped {
    host: *mut u32,
    device: u64,
    len: usize,
}

impl Mapped {
    fn new(len: usize) -> Result<Self> {
        let bytes = len.max(1) * 4;
        // SAFETY: page-locked memory mapped into the device's address space (the host
        // reads it back, so no write-combining); freed in Drop.
        let host = unsafe { driver::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(|e| cuda_err("alloc", e))? as *mut u32;
        let mut device = 0;
        // SAFETY: `host` was allocated above with CU_MEMHOSTALLOC_DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: allocated just above, never handed out.
            unsafe { driver::free_host(host.cast()) }.ok();
            return Err(cuda_err("device address", format!("{r:?}")));
        }
        Ok(Mapped { host, device, len })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`; the owner waited for the device to be done with it.
        unsafe { driver::free_host(self.host.cast()) }.ok();
    }
}

struct Slot {
    inputs: Mapped,
    argmax: Mapped,
    /// Recorded after the slot's last launch (an event never recorded is complete).
    done: sys::CUevent,
}

pub struct ReplaySlots {
    context: Arc<CudaContext>,
    slots: Vec<Slot>,
    next: usize,
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::internal(format!("CUDA replay slot {what}: {e}"))
}

impl ReplaySlots {
    /// Two slots of `inputs_len` u32 of inputs (INPUTS_HEADER and the meta layout) and
    /// `argmax_len` u32 of output, on the stream's context.
    pub fn new(stream: &CudaStream, inputs_len: usize, argmax_len: usize) -> Result<Self> {
        stream.context().bind_to_thread().map_err(|e| cuda_err("bind", e))?;
        let mut slots = Vec::with_capacity(2);
        for _ in 0..2 {
            let (inputs, argmax) = (Mapped::new(inputs_len)?, Mapped::new(argmax_len)?);
            let done =
                driver::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| cuda_err("event", e))?;
            slots.push(Slot { inputs, argmax, done });
        }
        Ok(ReplaySlots {
            context: stream.context().clone(),
            slots,
            next: 0,
        })
    }

    /// The device addresses of `slot`'s inputs and argmax output (a graph's kernels').
    pub fn device_ptrs(&self, slot: usize) -> (u64, u64) {
        let s = &self.slots[slot];
        (s.inputs.device, s.argmax.device)
    }

    /// The next launch's slot and its inputs to fill, once the launch that used the slot
    /// last has ended.
    pub fn take(&mut self) -> Result<(usize, &mut [u32])> {
        let slot = self.next;
        self.next ^= 1;
        self.wait_done(slot)?;
        let s = &mut self.slots[slot];
        // SAFETY: `host` holds `len` u32 for the life of self, and no launch reads it now.
        Ok((slot, unsafe {
            std::slice::from_raw_parts_mut(s.inputs.host, s.inputs.len)
        }))
    }

    /// `slot`'s launch was queued on `stream`: its end is what `wait` and `take` wait for.
    pub fn launched(&self, stream: &CudaStream, slot: usize) -> Result<()> {
        // SAFETY: a live event of this context and a live stream.
        unsafe { driver::event::record(self.slots[slot].done, stream.cu_stream()) }.map_err(|e| cuda_err("record", e))
    }

    fn wait_done(&self, slot: usize) -> Result<()> {
        // SAFETY: a live event of this context.
        unsafe { driver::event::synchronize(self.slots[slot].done) }.map_err(|e| cuda_err("wait", e))
    }

    /// Waits for `slot`'s launch: the first `len` values of its argmax output.
    pub fn wait(&self, slot: usize, len: usize) -> Result<&[u32]> {
        self.wait_done(slot)?;
        let s = &self.slots[slot];
        // SAFETY: `host` holds `s.argmax.len` u32, written by the completed launch.
        Ok(unsafe { std::slice::from_raw_parts(s.argmax.host, len.min(s.argmax.len)) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: wait for a launch still using the slot (the context is bound: ReplaySlots'
        // drop, or `new` on the caller's thread); then `Mapped` frees its memory.
        unsafe {
            driver::event::synchronize(self.done).ok();
            driver::event::destroy(self.done).ok();
        }
    }
}

impl Drop for ReplaySlots {
    fn drop(&mut self) {
        // The slots drop after this, on this context.
        self.context.bind_to_thread().ok();
    }
}

// SAFETY: used only by whoever holds the decode graphs' lock, one thread at a time.
unsafe impl Send for ReplaySlots {}
