//! Matrix products on raw device buffers for the captured decode path: a cuBLAS handle of
//! our own on the engine's stream, with a workspace allocated once so that nothing inside a
//! captured step allocates. Same call as candle's matmul (strided-batched GemmEx with one
//! batch, float32 accumulation), so the eager and the captured path compute alike.

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::DType;

use crate::error::{EngineError, Result};

/// cuBLAS workspace: what it asks for on Hopper (32 MiB), allocated once.
const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Blas {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used by one thread at a time (the model's owner, under its lock).
unsafe impl Send for Blas {}

impl Blas {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| EngineError::internal(format!("cuBLAS setup: {e}"));
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err(&e))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| err(&e))?;
        let ptr = workspace.device_ptr(stream).0;
        // SAFETY: the workspace outlives the handle (both fields of self; handle first).
        let status = unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, WORKSPACE_BYTES) };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(err(&format!("{status:?}")));
        }
        Ok(Blas {
            blas,
            _workspace: workspace,
        })
    }

    /// y[n, out] = x[n, inner] · w[out, inner]ᵀ, all row-major in `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, dtype: DType, y: u64, x: u64, w: u64, n: usize, out: usize, inner: usize) -> Result<()> {
        self.linear_to(dtype, dtype, y, x, w, n, out, inner)
    }

    /// `linear` with y in `y_dtype` (float32 logits from bf16 weights: the sums are float32
    /// anyway, so this only skips the rounding).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_to(
        &self,
        dtype: DType,
        y_dtype: DType,
        y: u64,
        x: u64,
        w: u64,
        n: usize,
        out: usize,
        inner: usize,
    ) -> Result<()> {
        let data_type = cuda_type(dtype)?;
        let y_type = cuda_type(y_dtype)?;
        let compute = if dtype == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major: yᵀ[out, n] = (wᵀ)ᵀ[out, inner] · xᵀ[inner, n].
        let (m, nn, k) = (out as i32, n as i32, inner as i32);
        // SAFETY: the caller's buffers hold n * inner, out * inner and n * out elements.
        unsafe {
            cublas::gemm_strided_batched_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                nn,
                k,
                (&alpha) as *const f32 as *const c_void,
                w as *const c_void,
                data_type,
                k,
                (out * inner) as i64,
                x as *const c_void,
                data_type,
                k,
                (n * inner) as i64,
                (&beta) as *const f32 as *const c_void,
                y as *mut c_void,
                y_type,
                m,
                (n * out) as i64,
                1,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| EngineError::internal(format!("cuBLAS GemmEx ({n}x{inner} by {out}x{inner}): {e}")))
    }
}

fn cuda_type(dtype: DType) -> Result<sys::cudaDataType_t> {
    match dtype {
        DType::F32 => Ok(sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType_t::CUDA_R_16F),
        other => Err(EngineError::internal(format!("no cuBLAS product for {other:?}"))),
    }
}
