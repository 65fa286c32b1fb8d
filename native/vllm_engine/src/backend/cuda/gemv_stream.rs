//! Launcher of `gemv_stream` (kernels/ops.cu): the one-row products of a decode step with
//! the weights brought into shared memory by the SM's copy engine (cp.async.bulk) instead
//! of the warps' 16-byte loads, which were thought to cap `gemv_fused` at ~2.3 TB/s
//! (bench/RESULTS.md, issue 7, session 5); measured in session 6, it streams no faster, so
//! it is off unless `VLLM_GEMV_STREAM=1`. Its lm_head form also takes the greedy argmax
//! into its epilogue (per-block partials, the last block merges them), so a decode graph
//! needs no split argmax after it.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::DType;

use super::ops::{launch_err, GemvEpilogue};
use super::Kernels;
use crate::error::Result;

/// Must match GEMV_THREADS, GEMV_PASS_CHUNKS, GSTREAM_HEAD and GSTREAM_MAX_STAGES in ops.cu.
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;
const PASS_CHUNKS: usize = 128;
const HEAD: usize = 128;
const MAX_STAGES: usize = 8;
/// Dynamic shared memory a launch may use (the kernel's limit is raised to it at load).
pub const MAX_SHARED: usize = 200 * 1024;
/// Blocks a launch may have at most: the fused argmax's scratch holds one partial each.
pub const MAX_BLOCKS: usize = 1024;
/// u32 words of the fused argmax's scratch: a counter, padding, two words per block.
pub const ARGMAX_SCRATCH: usize = 4 + 2 * MAX_BLOCKS;

/// How one-row products launch. Off by default: measured (bench/RESULTS.md, issue 7,
/// session 6, h7c) no faster per product than gemv_fused under ncu, and not yet timed in
/// the graph; `VLLM_GEMV_STREAM=1` turns it on (with the argmax in the lm_head),
/// `VLLM_GS_BLOCKS`, `VLLM_GS_STAGE_KB`, `VLLM_GS_STAGES` change the geometry and
/// `VLLM_GS_ARGMAX=0` keeps the split argmax after the lm_head, to compare.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    pub on: bool,
    /// Blocks a product is spread over (rows per block = out / blocks, rounded up).
    pub blocks: usize,
    /// Bytes of weight rows (of both halves for gate/up) per tile, at least one row.
    pub stage_bytes: usize,
    /// Tiles in flight per block.
    pub stages: usize,
    pub argmax: bool,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            on: false,
            blocks: 264,
            stage_bytes: 16 * 1024,
            stages: 4,
            argmax: true,
        }
    }
}

impl StreamConfig {
    pub fn from_env() -> Self {
        let read = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        let off = |name: &str| std::env::var_os(name).is_some_and(|v| v == "0");
        let d = StreamConfig::default();
        StreamConfig {
            on: std::env::var_os("VLLM_GEMV_STREAM").is_some_and(|v| v == "1"),
            blocks: read("VLLM_GS_BLOCKS", d.blocks).min(MAX_BLOCKS),
            stage_bytes: read("VLLM_GS_STAGE_KB", d.stage_bytes / 1024) * 1024,
            stages: read("VLLM_GS_STAGES", d.stages).min(MAX_STAGES),
            argmax: !off("VLLM_GS_ARGMAX"),
        }
    }
}

/// Raises the kernels' dynamic shared-memory limit; false when the driver refuses (the
/// products then keep gemv_fused).
pub fn prepare(functions: &std::collections::HashMap<String, super::CudaFunction>) -> bool {
    ["f32", "bf16", "f16"].iter().all(|s| {
        functions.get(&format!("gemv_stream_{s}")).is_some_and(|f| {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MAX_SHARED as i32,
            )
            .is_ok()
        })
    })
}

/// (rows per block, rows per tile, stages, blocks, shared bytes), or None when the
/// product does not fit the kernel (the caller keeps gemv_fused).
fn geometry(
    dtype: DType,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
    cfg: StreamConfig,
) -> Option<(usize, usize, usize, usize, usize)> {
    let size = dtype.size_in_bytes();
    if out == 0 || !inner.is_multiple_of(16 / size) || inner == 0 {
        return None;
    }
    let halves = if epilogue == GemvEpilogue::SiluMul { 2 } else { 1 };
    let row_bytes = inner * size;
    let passes = (inner / (16 / size)).div_ceil(PASS_CHUNKS);
    let rows_per_block = out.div_ceil(cfg.blocks.max(1));
    let mut stage_rows = (cfg.stage_bytes / (halves * row_bytes)).clamp(1, rows_per_block);
    // A tile's items (row, half, pass) in whole rounds of the block's 8 warps where it
    // has more than one round: the warps then finish a tile together.
    let per_row = halves * passes;
    if stage_rows * per_row > WARPS && stage_rows < rows_per_block {
        stage_rows = (stage_rows * per_row / WARPS * WARPS / per_row).max(1);
    }
    let stages = cfg.stages.clamp(1, MAX_STAGES).min(rows_per_block.div_ceil(stage_rows));
    let shared = HEAD + stages * stage_rows * halves * row_bytes + row_bytes + rows_per_block * halves * passes * 4;
    let blocks = out.div_ceil(rows_per_block);
    // One tile's bytes must fit an mbarrier's transaction count (2^20 - 1).
    (shared <= MAX_SHARED && blocks <= MAX_BLOCKS && stage_rows * halves * row_bytes < 1 << 20).then_some((
        rows_per_block,
        stage_rows,
        stages,
        blocks,
        shared,
    ))
}

/// Whether `launch` serves this one-row product.
pub fn serves(k: &Kernels, dtype: DType, n: usize, out: usize, inner: usize, epilogue: GemvEpilogue) -> bool {
    k.gemv_stream.on && n == 1 && geometry(dtype, out, inner, epilogue, k.gemv_stream).is_some()
}

/// y = epilogue(x' · wᵀ) for one row (`serves` must hold), x' = RMSNorm(x) * norm (eps)
/// when `norm` is not 0, else x; as `ops::launch_gemv_fused`. With `argmax` = (scratch of
/// ARGMAX_SCRATCH zeroed u32, out of 2 u32), StoreF32 only: also the row's argmax id and
/// largest value into out, as `ops::launch_argmax_split` writes them.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    y: u64,
    x: u64,
    w: u64,
    norm: u64,
    eps: f32,
    out: usize,
    inner: usize,
    epilogue: GemvEpilogue,
    argmax: Option<(u64, u64)>,
) -> Result<()> {
    let (rows_per_block, stage_rows, stages, blocks, shared) = geometry(dtype, out, inner, epilogue, k.gemv_stream)
        .ok_or_else(|| crate::error::EngineError::internal("gemv_stream: the product does not fit"))?;
    let f = k.function("gemv_stream", dtype)?;
    let ints = [
        out as i32,
        inner as i32,
        rows_per_block as i32,
        stage_rows as i32,
        stages as i32,
        epilogue as i32,
    ];
    let (scratch, argmax_out) = argmax.unwrap_or((0, 0));
    let cfg = super::ops::grid(blocks, THREADS, shared);
    if k.pdl {
        use super::pdl::arg;
        let mut params = [arg(&y), arg(&x), arg(&w), arg(&norm)]
            .into_iter()
            .chain(ints.iter().map(arg))
            .chain([arg(&eps), arg(&scratch), arg(&argmax_out)])
            .collect::<Vec<_>>();
        // SAFETY: the parameters are gemv_stream's, in order; it waits (pdl_wait) before
        // reading x or writing y and the argmax.
        return unsafe { super::pdl::launch(k.stream(), f, cfg, &mut params, "gemv_stream") };
    }
    let mut b = k.stream().launch_builder(f);
    b.arg(&y).arg(&x).arg(&w).arg(&norm);
    for i in &ints {
        b.arg(i);
    }
    b.arg(&eps).arg(&scratch).arg(&argmax_out);
    // SAFETY: as above; the launcher checked the shared memory against the raised limit.
    unsafe { b.launch(cfg) }.map_err(|e| launch_err("gemv_stream", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3_products_fit_and_spread_over_the_blocks() {
        let cfg = StreamConfig::default();
        // Qwen2.5-0.5B: gate/up 2 x 4,864 rows of 896, down 896 rows of 4,864, lm_head.
        let (rpb, stage_rows, stages, blocks, shared) =
            geometry(DType::BF16, 4864, 896, GemvEpilogue::SiluMul, cfg).unwrap();
        assert_eq!((rpb, stage_rows, blocks), (19, 4, 256));
        assert_eq!(stages, 4);
        assert!(shared <= MAX_SHARED);
        let (rpb, stage_rows, stages, blocks, _) = geometry(DType::BF16, 896, 4864, GemvEpilogue::AddTo, cfg).unwrap();
        assert_eq!((rpb, stage_rows, stages, blocks), (4, 1, 4, 224));
        let (rpb, stage_rows, _, blocks, shared) =
            geometry(DType::BF16, 151_936, 896, GemvEpilogue::StoreF32, cfg).unwrap();
        // 16 KB holds 9 rows of 1,792 bytes; 8 make one round of the warps.
        assert_eq!((rpb, stage_rows), (576, 8));
        assert!(rpb * blocks >= 151_936);
        assert!(blocks <= cfg.blocks && shared <= MAX_SHARED);
    }

    #[test]
    fn misaligned_rows_are_refused() {
        let cfg = StreamConfig::default();
        assert!(geometry(DType::BF16, 10, 12, GemvEpilogue::Store, cfg).is_none());
        assert!(geometry(DType::BF16, 0, 64, GemvEpilogue::Store, cfg).is_none());
    }
}
