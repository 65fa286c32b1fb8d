//! Launcher of kernels/gemv_staged.cu: one-row decode products whose blocks bulk-copy their
//! weight rows into shared memory before pdl_wait, one 512-thread block an SM, so the next
//! product's copies run under this one's hop and arithmetic (bench/RESULTS.md, issue 7,
//! session 14). ops::launch_gemv_fused hands one-row products over to it when `plan` says
//! they fit; `VLLM_GEMV_STAGED=0` keeps gemv_fused for them.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use candle_core::DType;

use super::ops::GemvEpilogue;
use super::{embedded, Kernels};
use crate::error::Result;

/// Must match STG_THREADS in gemv_staged.cu.
const STG_THREADS: u32 = 512;
/// Dynamic shared memory the kernels are opted in to. Two blocks of neighbouring products
/// must fit an SM's 228 KB for the next one's copies to start early (W3's gate_up takes
/// 134 KB a block, down 78 KB).
const SHARED_LIMIT: usize = 160 * 1024;

/// The kernel for an epilogue (StoreF32, the logits, stays with gemv_fused).
fn kernel_name(epilogue: GemvEpilogue) -> Option<&'static str> {
    match epilogue {
        GemvEpilogue::Store => Some("gemv_staged_store"),
        GemvEpilogue::AddTo => Some("gemv_staged_add"),
        GemvEpilogue::SiluMul => Some("gemv_staged_silu"),
        GemvEpilogue::StoreF32 => None,
    }
}

/// Loads the module, opts its functions in to SHARED_LIMIT bytes of dynamic shared memory
/// and the largest shared-memory carveout (kernels share an SM only under one split), and
/// adds them to `functions`; None (gemv_fused stays) when any step fails.
pub(super) fn load_into(
    context: &Arc<CudaContext>,
    functions: &mut HashMap<String, CudaFunction>,
) -> Option<Arc<CudaModule>> {
    let module = super::load_embedded(context, embedded::GEMV_STAGED_CUBIN, embedded::GEMV_STAGED_PTX).ok()?;
    for epilogue in [GemvEpilogue::Store, GemvEpilogue::AddTo, GemvEpilogue::SiluMul] {
        for suffix in ["f32", "bf16", "f16"] {
            let name = format!("{}_{suffix}", kernel_name(epilogue)?);
            let f = module.load_function(&name).ok()?;
            for (attribute, value) in [
                (
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    SHARED_LIMIT as i32,
                ),
                (
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                ),
            ] {
                // SAFETY: a valid function of a loaded module; the attributes are plain integers.
                if unsafe { sys::cuFuncSetAttribute(f.cu_function(), attribute, value) } != sys::CUresult::CUDA_SUCCESS
                {
                    return None;
                }
            }
            functions.insert(name, f);
        }
    }
    Some(module)
}

/// The launch of a one-row product: (rows per block, blocks, shared bytes), a block an SM;
/// None where gemv_fused serves it (the logits, rows too long for the norm prologue or too
/// many for the shared memory).
pub fn plan(
    dtype: DType,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
    sms: usize,
    norm: bool,
) -> Option<(usize, usize, usize)> {
    kernel_name(epilogue)?;
    let size = dtype.size_in_bytes();
    if sms == 0 || !inner.is_multiple_of(16 / size) || (norm && inner > 4 * STG_THREADS as usize) {
        return None;
    }
    let halves = if epilogue == GemvEpilogue::SiluMul { 2 } else { 1 };
    let rows_per_block = out.div_ceil(sms);
    let shared = (halves * rows_per_block + 1) * inner * size;
    (shared <= SHARED_LIMIT).then_some((rows_per_block, out.div_ceil(rows_per_block), shared))
}

/// y = epilogue(x' · wᵀ) for one input row (as ops::launch_gemv_fused), with `plan`'s
/// geometry.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    (y, x, w, norm): (u64, u64, u64, u64),
    eps: f32,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
    (rows_per_block, blocks, shared): (usize, usize, usize),
) -> Result<()> {
    let f = k.function(kernel_name(epilogue).expect("plan checked the epilogue"), dtype)?;
    let ints = [out as i32, inner as i32, rows_per_block as i32];
    let cfg = super::ops::grid(blocks, STG_THREADS, shared);
    let ptrs = [y, x, w, norm];
    let mut params = super::ops::gemv_params(&ptrs, &ints, &eps, &[]);
    // SAFETY: the parameters are gemv_staged's, in order; it waits (pdl_wait) before reading
    // x or writing y.
    unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, "gemv_staged", k.pdl) }
}
