//! Programmatic dependent launch (Hopper): a kernel launched this way may start while the
//! previous kernel on the stream is still running; it issues what does not depend on that
//! kernel (weight loads, cache rows of earlier steps) and then waits in
//! `griddepcontrol.wait` (pdl_wait in common.cuh) for the previous grid's completion and
//! memory. Works inside captured graphs (programmatic edges). Every kernel launched
//! through here must call pdl_wait before it reads what earlier kernels wrote or writes
//! what they read (gemv_fused and decode_attention_small do), and before it completes, so
//! completion stays transitive along the stream.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};

use crate::error::{EngineError, Result};

/// Launches `f` with `params` (pointers to each argument, in order), with programmatic
/// stream serialization allowed when `programmatic` (`Kernels::pdl`), else as a plain
/// launch.
///
/// # Safety
/// `params` must match the kernel's parameter list exactly (types and count), as with
/// cuLaunchKernel, and the kernel must follow the rules of the module comment.
pub unsafe fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
    name: &str,
    programmatic: bool,
) -> Result<()> {
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(programmatic),
    };
    let r = sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut());
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(EngineError::internal(format!(
            "CUDA kernel {name} failed to launch (programmatic: {programmatic}): {r:?}"
        )));
    }
    Ok(())
}

/// A pointer to one kernel argument, for `launch`'s params.
pub fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}
