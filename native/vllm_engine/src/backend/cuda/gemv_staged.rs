//! Launcher of kernels/gemv_staged.cu: one-row decode products whose blocks bulk-copy their
//! weight rows into shared memory before pdl_wait, one 512-thread block an SM, so the next
//! product's copies run under this one's hop and arithmetic (bench/RESULTS.md, issue 7,
//! session 14). The logits, too many rows to fit, stream through a ring of 16-row buffers
//! (session 15). ops::launch_gemv_fused hands one-row products over to it when `plan` says
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
/// STG_THREADS / 32.
const STG_WARPS: usize = STG_THREADS as usize / 32;
/// Must match STG_MAX_STAGES in gemv_staged.cu.
const MAX_STAGES: usize = 16;
/// Dynamic shared memory the kernels are opted in to. Two blocks of neighbouring products
/// must fit an SM's 228 KB for the next one's copies to start early (W3's gate_up takes
/// 139 KB a block, down 78 KB).
const SHARED_LIMIT: usize = 160 * 1024;
/// The logits' ring: room beside the last layer's down block (78 KB for W3), so its first
/// buffers fill before pdl_wait.
const RING_LIMIT: usize = 144 * 1024;
/// Rows of one ring buffer: fewer make a buffer's bookkeeping cost more than its bytes (the
/// micro-benchmark: 8 rows 3.44 TB/s, 16 rows 4.12, 32 rows 4.01).
const RING_ROWS: usize = 16;

/// The logits with their argmax fused in (`launch_logits_argmax`).
const LOGITS_ARGMAX: &str = "gemv_staged_logits_argmax";

fn kernel_name(epilogue: GemvEpilogue) -> &'static str {
    match epilogue {
        GemvEpilogue::Store => "gemv_staged_store",
        GemvEpilogue::AddTo => "gemv_staged_add",
        GemvEpilogue::SiluMul => "gemv_staged_silu",
        GemvEpilogue::StoreF32 => "gemv_staged_logits",
    }
}

/// A launch's geometry: a block an SM, its rows taken whole (one stage) or, for the
/// logits, streamed `stage_rows` at a time through `stages` buffers (the tests below check
/// the plans of W3's shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    rows_per_block: usize,
    blocks: usize,
    stage_rows: usize,
    stages: usize,
    /// Dynamic shared memory of a block, bytes.
    shared: usize,
}

impl Plan {
    /// The kernel's integer parameters, in order.
    fn ints(&self, out: usize, inner: usize) -> [i32; 5] {
        [
            out as i32,
            inner as i32,
            self.rows_per_block as i32,
            self.stage_rows as i32,
            self.stages as i32,
        ]
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
    let epilogues = [
        GemvEpilogue::Store,
        GemvEpilogue::AddTo,
        GemvEpilogue::SiluMul,
        GemvEpilogue::StoreF32,
    ];
    for kernel in epilogues.map(kernel_name).iter().chain([&LOGITS_ARGMAX]) {
        for suffix in ["f32", "bf16", "f16"] {
            let name = format!("{kernel}_{suffix}");
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

/// The launch of a one-row product; None where gemv_fused serves it (rows too long for the
/// norm prologue, too many for the shared memory: all but the logits must fit whole, or a
/// 16-bit gate_up's rows not in whole chunks of 32 columns).
pub fn plan(dtype: DType, out: usize, inner: usize, epilogue: GemvEpilogue, sms: usize, norm: bool) -> Option<Plan> {
    let size = dtype.size_in_bytes();
    if sms == 0 || out == 0 || !inner.is_multiple_of(16 / size) || (norm && inner > 4 * STG_THREADS as usize) {
        return None;
    }
    let halves = if epilogue == GemvEpilogue::SiluMul { 2 } else { 1 };
    let row_bytes = inner * size;
    let rows_per_block = out.div_ceil(sms);
    let blocks = out.div_ceil(rows_per_block);
    // gate_up in a 16-bit type is summed on the tensor cores (tile_sums in the kernel), in
    // chunks of 32 columns, each warp leaving its sums of every 16-row tile in shared memory.
    let tensor = size == 2 && epilogue == GemvEpilogue::SiluMul;
    if tensor && !inner.is_multiple_of(32) {
        return None;
    }
    let partials = if tensor {
        STG_WARPS * 16 * (halves * rows_per_block).div_ceil(16) * 4
    } else {
        0
    };
    let whole = (halves * rows_per_block + 1) * row_bytes + partials;
    if whole <= SHARED_LIMIT {
        return Some(Plan {
            rows_per_block,
            blocks,
            stage_rows: rows_per_block,
            stages: 1,
            shared: whole,
        });
    }
    if epilogue != GemvEpilogue::StoreF32 {
        return None;
    }
    let stages = (RING_LIMIT.saturating_sub(row_bytes) / (RING_ROWS * row_bytes)).min(MAX_STAGES);
    (stages >= 2).then_some(Plan {
        rows_per_block,
        blocks,
        stage_rows: RING_ROWS,
        stages,
        shared: (stages * RING_ROWS + 1) * row_bytes,
    })
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
    plan: Plan,
) -> Result<()> {
    launch_kernel(
        k,
        kernel_name(epilogue),
        dtype,
        [y, x, w, norm],
        eps,
        (out, inner),
        plan,
        &[],
    )
}

/// `name` with `plan`'s geometry: gemv_staged's parameters, then `extra` pointers.
#[allow(clippy::too_many_arguments)]
fn launch_kernel(
    k: &Kernels,
    name: &str,
    dtype: DType,
    ptrs: [u64; 4],
    eps: f32,
    (out, inner): (usize, usize),
    plan: Plan,
    extra: &[u64],
) -> Result<()> {
    let f = k.function(name, dtype)?;
    let ints = plan.ints(out, inner);
    let cfg = super::ops::grid(plan.blocks, STG_THREADS, plan.shared);
    let mut params = super::ops::gemv_params(&ptrs, &ints, &eps, &[]);
    params.extend(extra.iter().map(super::pdl::arg));
    // SAFETY: the parameters are the kernel's, in order (gemv_staged's, and for
    // LOGITS_ARGMAX its argmax, scratch and host pointers); it waits (pdl_wait) before
    // reading x or writing y.
    unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, "gemv_staged", k.pdl) }
}

/// u32 of scratch `launch_logits_argmax` needs on a GPU of `sms` SMs (zeroed once).
pub fn argmax_scratch_len(sms: usize) -> usize {
    2 * sms + 1
}

/// The one-row logits, float32 at `y` (x' = RMSNorm(x) * norm), and their argmax at
/// `argmax` (u32: the id, then the value's bits, as ops::launch_argmax_split writes one
/// row; the same to `host_out` unless 0) in the same launch, the last block to finish
/// reducing the blocks' bests in `scratch` (argmax_scratch_len, zeroed before the first
/// launch; each launch leaves it ready for the next). Ok(false), launching nothing, where
/// `plan` declines the shape.
#[allow(clippy::too_many_arguments)]
pub fn launch_logits_argmax(
    k: &Kernels,
    dtype: DType,
    (y, x, w, norm): (u64, u64, u64, u64),
    eps: f32,
    out: usize,
    inner: usize,
    (argmax, scratch, host_out): (u64, u64, u64),
) -> Result<bool> {
    let Some(plan) =
        plan(dtype, out, inner, GemvEpilogue::StoreF32, k.sms, norm != 0).filter(|_| k.gemv_staged && k.logits_argmax)
    else {
        return Ok(false);
    };
    // The blocks are at most `k.sms`, as argmax_scratch_len assumes.
    let ptrs = [y, x, w, norm];
    launch_kernel(
        k,
        LOGITS_ARGMAX,
        dtype,
        ptrs,
        eps,
        (out, inner),
        plan,
        &[argmax, scratch, host_out],
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    //! The launch plans of W3's shapes (Qwen2.5-0.5B on an H200's 132 SMs): a layer's
    //! products whole, the logits through the ring.
    use super::*;

    const SMS: usize = 132;

    #[test]
    fn a_layers_products_are_taken_whole() {
        // gate_up: 2 × 4864 rows of 896; down: 896 rows of 4864.
        let gate_up = plan(DType::BF16, 4864, 896, GemvEpilogue::SiluMul, SMS, true).unwrap();
        assert_eq!((gate_up.rows_per_block, gate_up.blocks, gate_up.stages), (37, 132, 1));
        // The rows, x' and the tensor-core partials of 5 tiles (74 rows) from 16 warps.
        assert_eq!(gate_up.shared, (2 * 37 + 1) * 896 * 2 + 16 * 16 * 5 * 4);
        let down = plan(DType::BF16, 896, 4864, GemvEpilogue::AddTo, SMS, false).unwrap();
        assert_eq!((down.rows_per_block, down.stage_rows, down.stages), (7, 7, 1));
        // tile_sums takes columns 32 at a time.
        assert_eq!(plan(DType::BF16, 1024, 880, GemvEpilogue::SiluMul, SMS, true), None);
        assert!(plan(DType::F32, 1024, 880, GemvEpilogue::SiluMul, SMS, true).is_some());
        assert!(plan(DType::BF16, 1024, 880, GemvEpilogue::Store, SMS, true).is_some());
        // Too many rows for a block's shared memory: gemv_fused keeps them.
        assert_eq!(plan(DType::BF16, 14336, 4096, GemvEpilogue::SiluMul, SMS, true), None);
    }

    #[test]
    fn the_logits_stream_through_a_ring_beside_the_last_down_block() {
        let logits = plan(DType::BF16, 151936, 896, GemvEpilogue::StoreF32, SMS, true).unwrap();
        assert_eq!((logits.rows_per_block, logits.blocks), (1152, 132));
        assert_eq!((logits.stage_rows, logits.stages), (16, 5));
        let down = plan(DType::BF16, 896, 4864, GemvEpilogue::AddTo, SMS, false).unwrap();
        // Both blocks, and 1 KB the SM reserves for each, within an SM's 228 KB.
        assert!(logits.shared + down.shared + 2 * 1024 <= 228 * 1024);
        // A float32 lm_head gets two buffers; rows of 8 KB (Llama-8B) none worth having.
        assert_eq!(
            plan(DType::F32, 151936, 896, GemvEpilogue::StoreF32, SMS, true)
                .unwrap()
                .stages,
            2
        );
        assert_eq!(
            plan(DType::BF16, 128256, 4096, GemvEpilogue::StoreF32, SMS, false),
            None
        );
    }

    #[test]
    fn rows_the_norm_prologue_cannot_hold_are_declined() {
        assert_eq!(plan(DType::BF16, 1024, 4096, GemvEpilogue::Store, SMS, true), None);
        assert!(plan(DType::BF16, 1024, 2048, GemvEpilogue::Store, SMS, true).is_some());
        // Not a whole number of 16-byte chunks.
        assert_eq!(plan(DType::BF16, 1024, 900, GemvEpilogue::Store, SMS, false), None);
    }
}
