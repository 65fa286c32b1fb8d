//! The CUDA path of the hot ops: our kernels (kernels/ops.cu, embedded by build.rs as a
//! sm_90 cubin plus PTX) launched through cudarc on candle's stream, over candle tensors.
//! Matrix products stay candle's (cuBLAS).

pub mod attention_batch;
pub mod attention_prefill;
pub mod blas;
pub mod decode_heads;
pub mod decode_small;
pub mod gemv_staged;
pub mod graph_events;
pub mod graphs;
pub mod kv_cache;
pub mod lora;
pub mod nccl;
pub mod op_timing;
pub mod ops;
pub mod pdl;
pub mod replay_slots;
pub mod sampling;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DriverError,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{EngineError, Result};

pub use kv_cache::DeviceKvCache;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Loads one of our kernel modules: its cubin (built for sm_90), or where that does not
/// load (any other GPU) its PTX, which the driver JIT-compiles.
fn load_embedded(
    context: &Arc<CudaContext>,
    cubin: &[u8],
    ptx: &str,
) -> std::result::Result<Arc<CudaModule>, DriverError> {
    context
        .load_module(Ptx::from_binary(cubin.to_vec()))
        .or_else(|_| context.load_module(Ptx::from_src(ptx)))
}

/// Opens CUDA device `ordinal` for candle, on a stream of its own: the legacy default
/// stream (candle's `Device::new_cuda`) cannot be captured into a CUDA graph. Every tensor
/// of the engine lives on that one stream, so cudarc's per-use event tracking is only
/// overhead: it is turned off before any tensor exists.
pub fn open_device(ordinal: usize) -> Result<Device> {
    let cuda = candle_core::CudaDevice::new_with_stream(ordinal)
        .map_err(|e| EngineError::unsupported(format!("cannot open CUDA device {ordinal}: {e}")))?;
    let device = Device::Cuda(cuda);
    let cuda = device.as_cuda_device()?;
    // SAFETY: the engine issues all its work on this device's single stream.
    unsafe { cuda.disable_event_tracking() };
    Ok(device)
}

/// (free, total) bytes of device memory.
pub fn memory_info(device: &Device) -> Result<(usize, usize)> {
    let stream = device.as_cuda_device()?.cuda_stream();
    stream
        .context()
        .mem_get_info()
        .map_err(|e| EngineError::internal(format!("cuMemGetInfo: {e}")))
}

/// The card's name, as the driver reports it ("NVIDIA H200").
pub fn device_name(device: &Device) -> Result<String> {
    let stream = device.as_cuda_device()?.cuda_stream();
    stream
        .context()
        .name()
        .map_err(|e| EngineError::internal(format!("cuDeviceGetName: {e}")))
}

/// Our kernels loaded on one device, functions looked up once by name.
pub struct Kernels {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    /// kernels/attention_batch.cu (its own module; functions in `functions` too).
    _batch_module: Arc<CudaModule>,
    /// kernels/decode_small.cu (small-batch decode attention), when it loads.
    _small_module: Option<Arc<CudaModule>>,
    /// kernels/attention_prefill.cu (prefill chunks on the tensor cores), when it loads.
    prefill_module: Option<Arc<CudaModule>>,
    functions: HashMap<String, CudaFunction>,
    /// `VLLM_ATTENTION_V1=1`: the first attention kernel (thread per key), to compare.
    pub attention_v1: bool,
    /// Batches of at most this many rows multiply through our GEMV kernel instead of
    /// cuBLAS (and the captured decode fuses norms, residual adds and SiLU into it):
    /// 1 by default (measured faster than cuBLAS only there), `VLLM_GEMV_ROWS=n` (up to
    /// 8) to compare, `VLLM_GEMV=0` for cuBLAS everywhere.
    pub gemv_max_rows: usize,
    /// Captured decode steps of up to decode_small::MAX_ROWS rows fuse qkv_prepare into
    /// one attention block per (sequence, KV head); `VLLM_DECODE_SMALL=0` turns it off.
    pub decode_small: bool,
    /// kernels/decode_heads.cu (one block per query head), when it loads.
    _heads_module: Option<Arc<CudaModule>>,
    pub ds_heads_loaded: bool,
    /// Which small-batch decode attention serves a geometry (`VLLM_DS_KIND`, decode_heads).
    pub ds_kind: decode_heads::Kind,
    /// `VLLM_DS_ROWS=n`: decode_attention_heads stages at most n context rows at a time
    /// (to compare, and to test its chunked path).
    pub ds_rows: Option<usize>,
    /// decode_attention_small requests the qkv bias and the rotary rows before pdl_wait
    /// (`VLLM_DS_EARLY=0`: after it, to compare).
    pub ds_early: bool,
    /// gemv_fused and decode_attention_small launch with programmatic stream
    /// serialization (pdl.rs): each may start while the previous kernel finishes.
    /// `VLLM_PDL=0` launches them normally.
    pub pdl: bool,
    /// Weight items each GEMV warp keeps in flight (1 to ops::GEMV_DEPTH, default the
    /// most; `VLLM_GEMV_DEPTH=n` to compare).
    pub gemv_depth: usize,
    /// The GEMV launch geometry's limits (ops::GemvLimits; env overrides to compare).
    pub gemv_limits: ops::GemvLimits,
    /// kernels/gemv_staged.cu, when it loads.
    _staged_module: Option<Arc<CudaModule>>,
    /// One-row products through gemv_staged.rs where it serves them (`VLLM_GEMV_STAGED=0`:
    /// gemv_fused for all).
    pub gemv_staged: bool,
    /// A one-row decode graph's argmax inside its staged logits launch
    /// (gemv_staged::launch_logits_argmax; `VLLM_LOGITS_ARGMAX=0`: the split argmax after).
    pub logits_argmax: bool,
    /// The device's SMs (a staged product launches a block on each).
    pub sms: usize,
}

const KERNEL_NAMES: [&str; 20] = [
    "embedding",
    "graph_embedding",
    "gather_rows",
    "add_rms_norm",
    "silu_mul",
    "qkv_prepare",
    "paged_attention",
    "paged_attention_v2",
    "paged_attention_v2_g1",
    "paged_attention_v2_g2",
    "paged_attention_v2_g4",
    "paged_attention_v2_g7",
    "paged_attention_v2_g8",
    "attention_reduce",
    "gemv_fused_r1",
    "gemv_fused_r2",
    "gemv_fused_r4",
    "gemv_fused_r8",
    "argmax_rows",
    "argmax_split",
];

/// Kernels with no dtype suffix.
const PLAIN_KERNEL_NAMES: [&str; 1] = ["argmax_split_reduce"];

/// Kernels the launchers can do without (they fall back to another).
const OPTIONAL_KERNELS: [&str; 6] = [
    "paged_attention_v2",
    "paged_attention_v2_g1",
    "paged_attention_v2_g2",
    "paged_attention_v2_g4",
    "paged_attention_v2_g7",
    "paged_attention_v2_g8",
];

impl Kernels {
    pub fn load(device: &Device) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let context = stream.context().clone();
        let module = load_embedded(&context, embedded::OPS_CUBIN, embedded::OPS_PTX)
            .map_err(|e| EngineError::internal(format!("cannot load the CUDA kernels: {e}")))?;
        let mut functions = HashMap::new();
        for name in KERNEL_NAMES {
            for suffix in ["f32", "bf16", "f16"] {
                let full = format!("{name}_{suffix}");
                match module.load_function(&full) {
                    Ok(f) => {
                        functions.insert(full, f);
                    }
                    // An alternative kernel may be absent; the launcher falls back.
                    Err(_) if OPTIONAL_KERNELS.contains(&name) => {}
                    Err(e) => return Err(EngineError::internal(format!("kernel {full} is missing: {e}"))),
                }
            }
        }
        for name in PLAIN_KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| EngineError::internal(format!("kernel {name} is missing: {e}")))?;
            functions.insert(name.to_string(), f);
        }
        let batch_module = load_embedded(&context, embedded::ATTENTION_BATCH_CUBIN, embedded::ATTENTION_BATCH_PTX)
            .map_err(|e| EngineError::internal(format!("cannot load the CUDA kernels: {e}")))?;
        for name in attention_batch::KERNEL_NAMES {
            for suffix in ["f32", "bf16", "f16"] {
                let full = format!("{name}_{suffix}");
                let f = batch_module
                    .load_function(&full)
                    .map_err(|e| EngineError::internal(format!("kernel {full} is missing: {e}")))?;
                functions.insert(full, f);
            }
        }
        for name in attention_batch::TC_KERNEL_NAMES {
            for suffix in ["bf16", "f16"] {
                let full = format!("{name}_{suffix}");
                let f = batch_module
                    .load_function(&full)
                    .map_err(|e| EngineError::internal(format!("kernel {full} is missing: {e}")))?;
                functions.insert(full, f);
            }
        }
        let small_module = decode_small::load_into(&context, &mut functions);
        let prefill_module = attention_prefill::load_into(&context, &mut functions);
        let heads_module = decode_heads::load_into(&context, &mut functions);
        let staged_module = gemv_staged::load_into(&context, &mut functions);
        let sms = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(0, |n| n.max(0) as usize);
        let v2_loaded = ["f32", "bf16", "f16"]
            .iter()
            .all(|s| functions.contains_key(&format!("paged_attention_v2_{s}")));
        Ok(Kernels {
            stream,
            _module: module,
            _batch_module: batch_module,
            decode_small: small_module.is_some() && std::env::var_os("VLLM_DECODE_SMALL").is_none_or(|v| v != "0"),
            _small_module: small_module,
            prefill_module,
            ds_heads_loaded: heads_module.is_some(),
            _heads_module: heads_module,
            ds_kind: decode_heads::Kind::from_env(),
            ds_rows: std::env::var("VLLM_DS_ROWS").ok().and_then(|v| v.parse::<usize>().ok()),
            pdl: std::env::var_os("VLLM_PDL").is_none_or(|v| v != "0"),
            ds_early: std::env::var_os("VLLM_DS_EARLY").is_none_or(|v| v != "0"),
            gemv_depth: std::env::var("VLLM_GEMV_DEPTH")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(ops::GEMV_DEPTH, |d| d.clamp(1, ops::GEMV_DEPTH)),
            gemv_limits: ops::GemvLimits::from_env(),
            functions,
            attention_v1: !v2_loaded || std::env::var_os("VLLM_ATTENTION_V1").is_some_and(|v| v == "1"),
            gemv_max_rows: gemv_max_rows_from_env(),
            gemv_staged: staged_module.is_some() && std::env::var_os("VLLM_GEMV_STAGED").is_none_or(|v| v != "0"),
            _staged_module: staged_module,
            logits_argmax: std::env::var_os("VLLM_LOGITS_ARGMAX").is_none_or(|v| v != "0"),
            sms,
        })
    }

    fn function(&self, name: &str, dtype: DType) -> Result<&CudaFunction> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => return Err(EngineError::internal(format!("no {name} kernel for {other:?}"))),
        };
        self.functions
            .get(&format!("{name}_{suffix}"))
            .ok_or_else(|| EngineError::internal(format!("kernel {name}_{suffix} is not loaded")))
    }

    /// A kernel with no dtype suffix.
    fn plain_function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| EngineError::internal(format!("kernel {name} is not loaded")))
    }

    /// `function` when that kernel is loaded (optional kernels may be absent).
    fn try_function(&self, name: &str, dtype: DType) -> Option<&CudaFunction> {
        self.function(name, dtype).ok()
    }

    /// Query tokens per attention_prefill tile for this geometry; None when steps with
    /// prefill chunks keep the per-token kernels (see attention_prefill::tokens_per_tile).
    pub fn prefill_tile_tokens(&self, dims: &ops::AttentionDims, dtype: DType) -> Option<usize> {
        attention_prefill::tokens_per_tile(self.prefill_module.is_some(), dims, dtype)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// `VLLM_GEMV=0`: no GEMV kernel; `VLLM_GEMV_ROWS=n`: batches of up to n rows (at most
/// ops::GEMV_MAX_ROWS); default 1.
fn gemv_max_rows_from_env() -> usize {
    if std::env::var_os("VLLM_GEMV").is_some_and(|v| v == "0") {
        return 0;
    }
    std::env::var("VLLM_GEMV_ROWS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(1, |n| n.min(ops::GEMV_MAX_ROWS))
}

/// The device address of a contiguous CUDA tensor's first element.
pub fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(EngineError::internal("a CUDA kernel operand is not contiguous"));
    }
    let Storage::Cuda(cuda) = &*storage else {
        return Err(EngineError::internal("a CUDA kernel operand is not on the GPU"));
    };
    let stream = cuda.device.cuda_stream();
    let base = match t.dtype() {
        DType::F32 => cuda.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => cuda.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cuda.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::U32 => cuda.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        other => return Err(EngineError::internal(format!("unexpected {other:?} kernel operand"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// `device_ptr` of an optional operand; 0 (a null pointer) when absent.
pub fn optional_ptr(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), device_ptr)
}
