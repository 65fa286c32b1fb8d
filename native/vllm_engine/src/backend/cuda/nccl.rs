//! NCCL through cudarc (its `nccl` feature): one communicator per GPU of this process
//! (ncclCommInitAll), in-place all-reduce of a tensor on its rank's candle stream.
//! NVLink multicast (NVLS) is switched off before NCCL starts: on the shared machines it
//! can take every GPU of the host out of service.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::{DType, Device, Tensor};

use crate::backend::cuda::device_ptr;
use crate::error::{EngineError, Result};

/// `VLLM_TP_SKIP_ALLREDUCE=1`: no collective at all (wrong outputs): the all-reduce's
/// share of a step, as the time this run saves, for measurement only.
fn skip_all_reduce() -> bool {
    std::env::var_os("VLLM_TP_SKIP_ALLREDUCE").is_some_and(|v| v == "1")
}

/// One rank's communicator, bound to that rank's stream.
pub struct RankComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    skip: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; each
// rank's is used only by the thread running that rank's forward pass.
unsafe impl Send for RankComm {}
unsafe impl Sync for RankComm {}

impl RankComm {
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Sums `t` over all ranks, in place, on this rank's stream (enqueued; no wait).
    pub fn all_reduce_in_place(&self, t: &Tensor) -> Result<()> {
        if self.skip {
            return Ok(());
        }
        let dtype = match t.dtype() {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            other => return Err(EngineError::internal(format!("no all-reduce for {other:?}"))),
        };
        let ptr = device_ptr(t)? as *mut std::ffi::c_void;
        // SAFETY: `ptr` is the start of `t`'s contiguous elements on this rank's device, which
        // nothing else reads or writes until the stream reaches this call; the stream is live.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                t.elem_count(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| EngineError::internal(format!("NCCL all-reduce on rank {}: {e:?}", self.rank)))
    }
}

impl Drop for RankComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitAll and is dropped once.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

/// Communicators for `devices` (each one rank, in order), made together in this thread.
pub fn init_group(devices: &[Device]) -> Result<Vec<RankComm>> {
    // Read by NCCL when the first communicator is made: multicast stays off whatever the
    // caller's environment says.
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    let mut streams = Vec::with_capacity(devices.len());
    let mut ordinals = Vec::with_capacity(devices.len());
    for d in devices {
        let stream = d.as_cuda_device()?.cuda_stream();
        ordinals.push(stream.context().ordinal() as i32);
        streams.push(stream);
    }
    let mut comms = vec![std::ptr::null_mut(); devices.len()];
    // SAFETY: `comms` and `ordinals` hold one entry per rank.
    unsafe { result::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, ordinals.as_ptr()) }.map_err(|e| {
        EngineError::unsupported(format!(
            "cannot start NCCL over GPUs {ordinals:?} (is libnccl.so.2 on LD_LIBRARY_PATH?): {e:?}"
        ))
    })?;
    let skip = skip_all_reduce();
    Ok(comms
        .into_iter()
        .zip(streams)
        .enumerate()
        .map(|(rank, (comm, stream))| RankComm {
            comm,
            stream,
            rank,
            skip,
        })
        .collect())
}

/// The NCCL version as a number (e.g. 22703 for 2.27.3).
pub fn version() -> Result<i32> {
    result::get_nccl_version().map_err(|e| EngineError::internal(format!("ncclGetVersion: {e:?}")))
}
