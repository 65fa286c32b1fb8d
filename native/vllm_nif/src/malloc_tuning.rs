//! glibc malloc settings for the engine inside the BEAM.
//!
//! A decode step allocates and frees a few large buffers (the logits of every sequence,
//! 49k floats a row; the sampler's per-row copies). In a plain Rust program glibc raises
//! its mmap threshold after the first such free and serves them from the heap. Inside the
//! BEAM that adaptation is off (tuning malloc with `mallopt` disables it), so each of these
//! buffers was a fresh mmap, page-faulted in and unmapped again: 5–10 ms of the engine
//! thread per 32-sequence step (measured with `VLLM_STEP_TIMING=1`, RESULTS.md C2). Fixed
//! thresholds high enough for those buffers bring the heap reuse back.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_large_buffers_on_the_heap() {
    use std::os::raw::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // glibc's malloc.h.
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    // 32 MiB: glibc's largest mmap threshold; 256 MiB of free heap top before trimming.
    // SAFETY: mallopt only changes allocator parameters; glibc serialises it internally.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_large_buffers_on_the_heap() {}
