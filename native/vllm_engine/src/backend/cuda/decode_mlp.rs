//! Launcher of decode_mlp (kernels/ops.cu): a decode layer's whole MLP in one launch for
//! captured steps of at most GEMV_MAX_ROWS rows: RMSNorm, gate_up and SiLU·mul as the fused
//! GEMV does them, a grid-wide barrier, then the down product with the residual add, its
//! weights staged in shared memory while gate_up ran. It saves the down product's launch,
//! ramp and weight round trip. The grid must be resident at once, so `plan` sizes it by the
//! kernel's occupancy at the shared memory the launch needs.

use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction};
use candle_core::DType;

use super::ops::{self, GemvEpilogue};
use super::Kernels;
use crate::error::{EngineError, Result};

/// Must match GEMV_THREADS and MLP_MAX_DOWN_ROWS in ops.cu.
const THREADS: u32 = 256;
const MAX_DOWN_ROWS: usize = 8;
/// Dynamic shared memory the kernels are opted in to (Hopper allows 227 KB a block).
const SHARED_LIMIT: usize = 200 * 1024;
const ROW_FORMS: [usize; 4] = [1, 2, 4, 8];

/// Device addresses decode_mlp reads and writes.
pub struct MlpPtrs {
    /// float32 residual stream [n, hidden], updated in place.
    pub h: u64,
    pub post_norm: u64,
    pub gate_up: u64,
    pub down: u64,
    /// Scratch [n, inter] in the weights' type.
    pub act: u64,
    /// u32 [2], zero before the first launch (the barrier leaves it so).
    pub barrier: u64,
}

/// One launch's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpPlan {
    pub blocks: usize,
    /// gate_up rows (of `inter`) per block and passes over `hidden`.
    pub gate_up_rows: usize,
    pub gate_up_passes: usize,
    /// Rows of `down` per block and where they start in shared memory.
    pub down_rows: usize,
    pub down_offset: usize,
    pub shared: usize,
}

/// The geometry for `blocks` resident blocks, or None when a block would hold more than
/// MAX_DOWN_ROWS rows of `down` or more shared memory than SHARED_LIMIT.
pub fn plan(dtype: DType, n: usize, hidden: usize, inter: usize, blocks: usize) -> Option<MlpPlan> {
    let size = dtype.size_in_bytes();
    let vec = 16 / size;
    if n == 0 || n > ops::GEMV_MAX_ROWS || blocks == 0 || !hidden.is_multiple_of(vec) || !inter.is_multiple_of(vec) {
        return None;
    }
    let down_rows = hidden.div_ceil(blocks);
    let gate_up_rows = inter.div_ceil(blocks);
    let gate_up_passes = ops::gemv_passes(dtype, hidden);
    let gemv_shared = ops::gemv_block_shared(dtype, n, hidden, GemvEpilogue::SiluMul, gate_up_rows);
    let down_offset = gemv_shared.next_multiple_of(16);
    let shared = down_offset + down_rows * inter * size;
    (down_rows <= MAX_DOWN_ROWS && shared <= SHARED_LIMIT).then_some(MlpPlan {
        blocks,
        gate_up_rows,
        gate_up_passes,
        down_rows,
        down_offset,
        shared,
    })
}

/// Opts the decode_mlp functions in `functions` in to SHARED_LIMIT bytes of dynamic shared
/// memory; false (the two-GEMV path stays) when any is missing or refuses.
pub(super) fn opt_in(functions: &HashMap<String, CudaFunction>) -> bool {
    ["f32", "bf16", "f16"].iter().all(|suffix| {
        ROW_FORMS.iter().all(|nr| {
            let Some(f) = functions.get(&format!("decode_mlp_r{nr}_{suffix}")) else {
                return false;
            };
            // SAFETY: a valid function of a loaded module; the attribute is a plain integer.
            let r = unsafe {
                sys::cuFuncSetAttribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    SHARED_LIMIT as i32,
                )
            };
            r == sys::CUresult::CUDA_SUCCESS
        })
    })
}

/// The plan this device runs for n rows: as many blocks as are resident at once (two per
/// SM where the registers and shared memory allow, else one), or None.
pub fn plan_on_device(k: &Kernels, dtype: DType, n: usize, hidden: usize, inter: usize) -> Result<Option<MlpPlan>> {
    if !k.decode_mlp || n == 0 || n > ops::GEMV_MAX_ROWS {
        return Ok(None);
    }
    let f = k.function(&format!("decode_mlp_r{}", n.next_power_of_two()), dtype)?;
    let sms = k
        .stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| EngineError::internal(format!("cannot read the SM count: {e}")))? as usize;
    for per_sm in [2, 1] {
        let Some(p) = plan(dtype, n, hidden, inter, per_sm * sms) else {
            continue;
        };
        let resident = f
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, p.shared, None)
            .map_err(|e| EngineError::internal(format!("decode_mlp occupancy: {e}")))? as usize;
        if resident >= per_sm {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Launches decode_mlp with `plan` (from `plan_on_device` for these n, hidden, inter).
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    p: &MlpPtrs,
    plan: &MlpPlan,
    n: usize,
    hidden: usize,
    inter: usize,
    eps: f32,
) -> Result<()> {
    let f = k.function(&format!("decode_mlp_r{}", n.next_power_of_two()), dtype)?;
    let ints = [
        n as i32,
        hidden as i32,
        inter as i32,
        plan.gate_up_rows as i32,
        plan.gate_up_passes as i32,
    ];
    let depth = k.gemv_depth as i32;
    let (down_rows, down_offset) = (plan.down_rows as i32, plan.down_offset as i32);
    let mut params = [
        super::pdl::arg(&p.h),
        super::pdl::arg(&p.post_norm),
        super::pdl::arg(&p.gate_up),
        super::pdl::arg(&p.down),
        super::pdl::arg(&p.act),
    ]
    .into_iter()
    .chain(ints.iter().map(super::pdl::arg))
    .chain([
        super::pdl::arg(&eps),
        super::pdl::arg(&depth),
        super::pdl::arg(&down_rows),
        super::pdl::arg(&down_offset),
        super::pdl::arg(&p.barrier),
    ])
    .collect::<Vec<_>>();
    let cfg = ops::grid(plan.blocks, THREADS, plan.shared);
    // SAFETY: the parameters are decode_mlp's, in order; it waits (pdl_wait, in its gate_up
    // part) before reading h, and every block is resident at once (`plan_on_device`).
    unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, "decode_mlp") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_sizes_fit_two_blocks_per_sm_of_an_h200() {
        // Qwen2.5-0.5B: hidden 896, intermediate 4864, bf16, one row, 264 blocks.
        let p = plan(DType::BF16, 1, 896, 4864, 264).expect("fits");
        assert_eq!(p.down_rows, 4);
        assert_eq!(p.gate_up_rows, 19);
        assert!(p.down_offset.is_multiple_of(16));
        assert_eq!(p.shared, p.down_offset + 4 * 4864 * 2);
        assert!(2 * p.shared <= 228 * 1024);
    }

    #[test]
    fn every_row_of_both_products_has_a_block() {
        for (hidden, inter, blocks) in [(896, 4864, 264), (64, 128, 264), (1024, 3072, 132), (576, 1536, 7)] {
            if let Some(p) = plan(DType::BF16, 1, hidden, inter, blocks) {
                assert!(p.down_rows * blocks >= hidden);
                assert!(p.gate_up_rows * blocks >= inter);
            }
        }
    }

    #[test]
    fn too_many_down_rows_or_bad_widths_are_refused() {
        assert_eq!(plan(DType::BF16, 1, 896, 4864, 100), None, "9 rows of down per block");
        assert_eq!(plan(DType::BF16, 1, 900, 4864, 264), None, "hidden not a multiple of 8");
        assert_eq!(plan(DType::BF16, 0, 896, 4864, 264), None);
        assert_eq!(plan(DType::BF16, 9, 896, 4864, 264), None);
    }
}
