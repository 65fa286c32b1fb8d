//! The eager path's bf16/f16 products y[n, out] = x[n, inner] · w[out, inner]ᵀ through
//! cuBLASLt, with the algorithm measured once per (dtype, shape, rows bucket): GemmEx (the
//! call candle makes, cuBLAS's own pick) against every algorithm cuBLASLt's heuristic lists
//! for the bucket's top row count, each timed on the engine's stream; the choice
//! (backend/gemm_tuning.rs) is cached for the process (per device), so every later product
//! of that key takes it, in every engine of the process (data-parallel ranks, tests that
//! compare two engines). The
//! model tunes its shapes up to the step's token limit at start-up (`tune`), so no timed
//! step pays for it; a key first met later is tuned then, outside any graph capture (only
//! the eager forward calls this). `VLLM_GEMM_LT=0` keeps GemmEx everywhere.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::DType;

use super::blas::Blas;
use crate::backend::gemm_tuning::{self, rows_bucket};
use crate::error::{EngineError, Result};

/// The workspace cuBLASLt may use (what cuBLAS takes on Hopper), allocated once.
const WORKSPACE_BYTES: usize = 32 << 20;
/// Heuristic candidates timed per key.
const CANDIDATES: usize = 12;
/// Timed launches per candidate (after one untimed launch), in each of two rounds.
const TIMED_LAUNCHES: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// The device's ordinal: an algorithm is measured on, and kept for, one card.
    device: usize,
    dtype: DType,
    out: usize,
    inner: usize,
    bucket: usize,
}

#[derive(Debug, Clone, Copy)]
enum Choice {
    GemmEx,
    Lt(sys::cublasLtMatmulAlgo_t),
}

/// One product's operands (device addresses, row-major, contiguous).
#[derive(Debug, Clone, Copy)]
pub struct Operands {
    pub y: u64,
    pub x: u64,
    pub w: u64,
    pub n: usize,
    pub out: usize,
    pub inner: usize,
}

pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    /// GemmEx, timed against the candidates on the same stream.
    blas: Blas,
    device: usize,
    /// One line per tuned key on stderr (VLLM_STEP_TIMING or VLLM_GEMM_LT_LOG set).
    log: bool,
}

/// The choices of the process, shared by its engines (one tuning per device and key).
fn choices() -> &'static Mutex<HashMap<Key, Choice>> {
    static CHOICES: OnceLock<Mutex<HashMap<Key, Choice>>> = OnceLock::new();
    CHOICES.get_or_init(|| Mutex::new(HashMap::new()))
}

// SAFETY: the handle and the workspace are used on the engine's one stream, by the thread
// that owns the model at the time (the model is behind the engine's lock); the choices
// have their own lock.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; the stream's work is done or is the
        // driver's to finish (the handle holds no device memory of its own).
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn lt_type(dtype: DType) -> Option<sys::cudaDataType_t> {
    match dtype {
        DType::BF16 => Some(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Some(sys::cudaDataType_t::CUDA_R_16F),
        _ => None,
    }
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> EngineError + '_ {
    move |e| EngineError::internal(format!("cuBLASLt {what}: {e:?}"))
}

/// Descriptors of one product shape (destroyed on drop).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    w: sys::cublasLtMatrixLayout_t,
    x: sys::cublasLtMatrixLayout_t,
    y: sys::cublasLtMatrixLayout_t,
}

impl Plan {
    /// Column-major, as cuBLAS sees the row-major operands: yᵀ[out, n] = op(W)[out, inner] ·
    /// xᵀ[inner, n], W read transposed, float32 sums.
    fn new(dtype: DType, n: usize, out: usize, inner: usize) -> Result<Plan> {
        let data = lt_type(dtype).ok_or_else(|| EngineError::internal(format!("no cuBLASLt product for {dtype:?}")))?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err("descriptor"))?;
        // Owned from here, so an error below frees what exists.
        let mut plan = Plan {
            desc,
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
        };
        let (ta, tb) = (cublasOperation_t::CUBLAS_OP_T, cublasOperation_t::CUBLAS_OP_N);
        // SAFETY: desc is live; the buffers are the operation values, read during the call.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&ta) as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .map_err(lt_err("transpose"))?;
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                (&tb) as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )
            .map_err(lt_err("transpose"))?;
        }
        plan.w = lt::create_matrix_layout(data, inner as u64, out as u64, inner as i64).map_err(lt_err("layout"))?;
        plan.x = lt::create_matrix_layout(data, inner as u64, n as u64, inner as i64).map_err(lt_err("layout"))?;
        plan.y = lt::create_matrix_layout(data, out as u64, n as u64, out as i64).map_err(lt_err("layout"))?;
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by Plan::new (null ones were not).
        unsafe {
            for layout in [self.w, self.x, self.y] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl LtGemm {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle = lt::create_handle().map_err(lt_err("handle"))?;
        let alloc = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| EngineError::internal(format!("cuBLASLt workspace: {e}")));
        let blas = Blas::new(stream);
        let (workspace, blas) = match (alloc, blas) {
            (Ok(w), Ok(b)) => (w, b),
            (Err(e), _) | (_, Err(e)) => {
                // SAFETY: created just above, used by nothing.
                unsafe {
                    let _ = lt::destroy_handle(handle);
                }
                return Err(e);
            }
        };
        Ok(LtGemm {
            handle,
            workspace,
            stream: stream.clone(),
            blas,
            device: stream.context().ordinal(),
            log: std::env::var_os("VLLM_STEP_TIMING").is_some() || std::env::var_os("VLLM_GEMM_LT_LOG").is_some(),
        })
    }

    /// The rows `tune(.., max_rows, ..)`'s scratch buffers must hold.
    pub fn tune_rows(max_rows: usize) -> usize {
        gemm_tuning::buckets_up_to(max_rows).last().copied().unwrap_or(0)
    }

    /// Whether every bucket up to `max_rows` of this product is tuned already.
    pub fn tuned(&self, dtype: DType, out: usize, inner: usize, max_rows: usize) -> Result<bool> {
        let choices = choices().lock().map_err(|_| poisoned())?;
        Ok(gemm_tuning::buckets_up_to(max_rows).into_iter().all(|bucket| {
            choices.contains_key(&Key {
                device: self.device,
                dtype,
                out,
                inner,
                bucket,
            })
        }))
    }

    /// Whether `dtype` products go through here.
    pub fn serves(dtype: DType) -> bool {
        lt_type(dtype).is_some()
    }

    /// y = x · wᵀ with the algorithm of (dtype, shape, bucket of n), tuned now if new (so
    /// never while the stream is being captured).
    pub fn linear(&self, dtype: DType, p: Operands) -> Result<()> {
        let key = Key {
            device: self.device,
            dtype,
            out: p.out,
            inner: p.inner,
            bucket: rows_bucket(p.n),
        };
        let known = choices().lock().map_err(|_| poisoned())?.get(&key).copied();
        let choice = match known {
            Some(c) => c,
            // Timed at this batch's own rows: its buffers hold no more.
            None => self.tune_key(key, p.n, &[p.w], p.y, p.x)?,
        };
        match choice {
            Choice::Lt(algo) => match self.launch(dtype, &algo, p) {
                Ok(()) => Ok(()),
                // An algorithm measured at the bucket's top that refuses this row count:
                // GemmEx for this call (its status comes back before anything runs).
                Err(_) => self.blas.linear(dtype, p.y, p.x, p.w, p.n, p.out, p.inner),
            },
            Choice::GemmEx => self.blas.linear(dtype, p.y, p.x, p.w, p.n, p.out, p.inner),
        }
    }

    /// Tunes every bucket up to `max_rows` for a product of `out` x `inner` whose weights
    /// (one per layer, timed in turn so the L2 holds none) are `weights`; `x` and `y` are
    /// scratch buffers of at least `tune_rows(max_rows)` * inner and * out elements.
    #[allow(clippy::too_many_arguments)]
    pub fn tune(
        &self,
        dtype: DType,
        out: usize,
        inner: usize,
        weights: &[u64],
        max_rows: usize,
        x: u64,
        y: u64,
    ) -> Result<()> {
        for bucket in gemm_tuning::buckets_up_to(max_rows) {
            let key = Key {
                device: self.device,
                dtype,
                out,
                inner,
                bucket,
            };
            if !choices().lock().map_err(|_| poisoned())?.contains_key(&key) {
                self.tune_key(key, bucket, weights, y, x)?;
            }
        }
        Ok(())
    }

    fn launch(&self, dtype: DType, algo: &sys::cublasLtMatmulAlgo_t, p: Operands) -> Result<()> {
        let plan = Plan::new(dtype, p.n, p.out, p.inner)?;
        self.launch_plan(&plan, Some(algo), p)
    }

    fn launch_plan(&self, plan: &Plan, algo: Option<&sys::cublasLtMatmulAlgo_t>, p: Operands) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ws = self.workspace.device_ptr(&self.stream).0;
        // SAFETY: the plan describes buffers of n * inner, out * inner and n * out elements,
        // which the caller guarantees; the workspace holds WORKSPACE_BYTES.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                p.w as *const c_void,
                plan.w,
                p.x as *const c_void,
                plan.x,
                p.y as *const c_void,
                plan.y,
                p.y as *mut c_void,
                plan.y,
                algo.map_or(std::ptr::null(), |a| a as *const _),
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_err("matmul"))
    }

    /// The heuristic's candidates for one bucket (up to CANDIDATES, in its order).
    fn candidates(&self, plan: &Plan) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let pref = lt::create_matmul_pref().map_err(lt_err("preference"))?;
        let bytes = WORKSPACE_BYTES;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(CANDIDATES);
        let mut count = 0i32;
        // SAFETY: pref and the plan's descriptors are live; `results` has room for
        // CANDIDATES entries, of which cuBLASLt fills `count`.
        let status = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            );
            let status = set.and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.w,
                    plan.x,
                    plan.y,
                    plan.y,
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            if status.is_ok() {
                results.set_len((count.max(0) as usize).min(CANDIDATES));
            }
            status
        };
        status.map_err(lt_err("heuristic"))?;
        Ok(results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// Mean µs of `launch(i)` over TIMED_LAUNCHES launches, after one untimed one (whose
    /// error, if any, is returned: that candidate does not run here).
    fn time(&self, mut launch: impl FnMut(usize) -> Result<()>) -> Result<f32> {
        launch(0)?;
        let err = |e: &dyn std::fmt::Display| EngineError::internal(format!("tuning events: {e}"));
        let start = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err(&e))?;
        for i in 1..=TIMED_LAUNCHES {
            launch(i)?;
        }
        let end = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err(&e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| err(&e))?;
        Ok(ms * 1e3 / TIMED_LAUNCHES as f32)
    }

    /// Times GemmEx and every candidate at `n` rows (the bucket's top, or fewer when
    /// tuned on a live batch; two rounds, the faster of each kept), caches and returns the
    /// choice.
    fn tune_key(&self, key: Key, n: usize, weights: &[u64], y: u64, x: u64) -> Result<Choice> {
        let plan = Plan::new(key.dtype, n, key.out, key.inner)?;
        let algos = self.candidates(&plan).unwrap_or_default();
        let ops = |i: usize| Operands {
            y,
            x,
            w: weights[i % weights.len().max(1)],
            n,
            out: key.out,
            inner: key.inner,
        };
        let mut gemm_ex = f32::INFINITY;
        let mut times = vec![f32::INFINITY; algos.len()];
        for _round in 0..2 {
            if let Ok(t) = self.time(|i| self.blas.linear(key.dtype, y, x, ops(i).w, n, key.out, key.inner)) {
                gemm_ex = gemm_ex.min(t);
            }
            for (a, algo) in algos.iter().enumerate() {
                if let Ok(t) = self.time(|i| self.launch_plan(&plan, Some(algo), ops(i))) {
                    times[a] = times[a].min(t);
                }
            }
        }
        let timed: Vec<(usize, f32)> = times.iter().copied().enumerate().collect();
        let picked = gemm_tuning::pick(gemm_ex, &timed);
        let choice = match picked {
            Some(i) => Choice::Lt(algos[i]),
            None => Choice::GemmEx,
        };
        if self.log {
            let flop = 2.0 * n as f64 * key.out as f64 * key.inner as f64;
            let tflops = |us: f32| flop / us as f64 * 1e-6;
            let list: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
            let pick_text = match picked {
                Some(i) => format!("Lt #{i} {:.1} us ({:.0} TFLOP/s)", times[i], tflops(times[i])),
                None => "GemmEx".to_string(),
            };
            eprintln!(
                "gemm_lt {:?} {}x{} rows<={n}: GemmEx {gemm_ex:.1} us ({:.0} TFLOP/s); Lt [{}]; took {pick_text}",
                key.dtype,
                key.out,
                key.inner,
                tflops(gemm_ex),
                list.join(" ")
            );
        }
        // Another engine may have tuned the key meanwhile: the first choice stays.
        Ok(*choices().lock().map_err(|_| poisoned())?.entry(key).or_insert(choice))
    }
}

fn poisoned() -> EngineError {
    EngineError::internal("the cuBLASLt choice cache was poisoned by a panic")
}
