//! Launcher of kernels/attention_batch.cu: paged attention for batches of more than 8 query
//! rows (W1's decode steps, prefill chunks), a warp per (token, KV head, split of
//! `partition` positions) with its own online softmax; the last split combines the others.
//! Batches of at most 8 rows keep ops.rs's paged_attention_v2 (the small-batch path).
//!
//! Knobs (read once): `VLLM_ATT_BATCH=0` turns this kernel off (every batch through
//! paged_attention_v2, to compare); `VLLM_ATT_BATCH_ROWS=n` uses it from n rows on (default
//! 9; tests set 1 to run the batched graph tests through it); `VLLM_ATT_PARTITION=n`
//! positions per split (default 128). Groups of 4 (Llama-3 8B, W2) take the staged form by
//! default (rows copied into shared memory by cp.async, several passes in flight; session
//! 8); `VLLM_ATT_G4=u4` gives the session-7 form (4 rows per pass in registers, capped at
//! 128), `VLLM_ATT_G4=u2` the session-6 form (2 rows per pass, 135 registers), to compare.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::DType;

use super::ops::{AttentionArgs, AttentionDims, AttentionPtrs, MetaPtrs};
use super::Kernels;
use crate::error::{EngineError, Result};

/// Must match AB_MAX_WARPS in attention_batch.cu.
const MAX_WARPS: usize = 4;
/// Group sizes (query heads per KV head) instantiated in attention_batch.cu.
pub const GROUPS: [usize; 3] = [1, 2, 4];
/// Kernel names to load, one per group size (each with the dtype suffixes), and the
/// session-7 and session-6 forms of group 4 (`VLLM_ATT_G4=u4` / `u2`, to compare).
pub const KERNEL_NAMES: [&str; 5] = [
    "attention_batch_g1",
    "attention_batch_g2",
    "attention_batch_g4",
    "attention_batch_g4_u4",
    "attention_batch_g4_u2",
];

/// Shared memory of the staged group-4 form per warp: AB_G4_S stages of AB_G4_U key and
/// value rows of a 16-byte slot per lane (S * U KiB; attention_batch.cu, S 5, U 2).
const G4_STAGED_BYTES_PER_WARP: usize = 5 * 2 * 1024;
/// Dynamic shared memory a launch may take without the function opting in to more.
const SHARED_DEFAULT_LIMIT: usize = 48 * 1024;

/// Positions per split: measured best of 64..2048 on an H200 (bench/RESULTS.md, change 8).
const DEFAULT_PARTITION: usize = 128;

struct Config {
    enabled: bool,
    min_rows: usize,
    partition: usize,
    /// Group 4's form: "" (staged, the default), "_u4" or "_u2".
    g4_form: &'static str,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        Config {
            enabled: std::env::var_os("VLLM_ATT_BATCH").is_none_or(|v| v != "0"),
            min_rows: num("VLLM_ATT_BATCH_ROWS").unwrap_or(9).max(1),
            partition: num("VLLM_ATT_PARTITION").unwrap_or(DEFAULT_PARTITION).max(16),
            g4_form: match std::env::var("VLLM_ATT_G4").as_deref() {
                Ok("u4") => "_u4",
                Ok("u2") => "_u2",
                _ => "",
            },
        }
    })
}

/// The positions per split when a batch of `n` query rows goes through attention_batch,
/// None when it does not (too few rows, a group size or head size it has no form for).
pub fn partition_for(n: usize, dims: &AttentionDims, dtype: DType) -> Option<usize> {
    let c = config();
    if !c.enabled || n < c.min_rows || dims.num_kv_heads == 0 {
        return None;
    }
    let group = dims.num_heads / dims.num_kv_heads;
    let vec = 16 / dtype.size_in_bytes();
    let lanes = dims.head_dim / vec;
    let fits = dims.num_heads.is_multiple_of(dims.num_kv_heads)
        && GROUPS.contains(&group)
        && dims.head_dim.is_multiple_of(vec)
        && lanes.is_power_of_two()
        && lanes <= 32;
    fits.then_some(c.partition)
}

/// (splits, partition) covering contexts up to `max_context`.
pub fn splits_for(max_context: usize, partition: usize) -> (usize, usize) {
    (max_context.div_ceil(partition).max(1), partition)
}

/// attention_batch on raw device addresses. Needs `p.done_counts` (zeroed, the kernel
/// leaves it so) when `splits` > 1, and splits * partition covering every context.
#[allow(clippy::too_many_arguments)]
pub fn launch(
    k: &Kernels,
    dtype: DType,
    p: &AttentionPtrs,
    meta: &MetaPtrs,
    n: usize,
    dims: &AttentionDims,
    splits: usize,
    partition: usize,
) -> Result<()> {
    let group = dims.num_heads / dims.num_kv_heads;
    let warps = dims.num_kv_heads.min(MAX_WARPS);
    // The split's block-table entries (an unaligned start adds one); the staged form's
    // rings come before them. A launch takes at most 48 KiB without opting in: a table
    // too large beside the rings (a partition of thousands of blocks) takes the u4 form.
    let table = (partition.div_ceil(meta.block_size) + 2) * 4;
    let staged_bytes = warps * G4_STAGED_BYTES_PER_WARP + table;
    let form = match config().g4_form {
        "" if group == 4 && staged_bytes > SHARED_DEFAULT_LIMIT => "_u4",
        f if group == 4 => f,
        _ => "",
    };
    let f = k.function(&format!("attention_batch_g{group}{form}"), dtype)?;
    let shared = if group == 4 && form.is_empty() { staged_bytes } else { table };
    let args = AttentionArgs::new(p, meta, dims, partition, splits);
    let mut b = k.stream().launch_builder(f);
    args.push(&mut b);
    b.arg(&p.done_counts);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_kv_heads.div_ceil(warps) as u32, splits as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    unsafe { b.launch(cfg) }
        .map_err(|e| EngineError::internal(format!("CUDA kernel attention_batch failed to launch: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staged_group_4_form_fits_the_default_shared_memory_at_the_default_partition() {
        // 4 warps' rings and the table of a 128-position split of 16-position blocks.
        let table = (DEFAULT_PARTITION.div_ceil(16) + 2) * 4;
        assert!(MAX_WARPS * G4_STAGED_BYTES_PER_WARP + table <= SHARED_DEFAULT_LIMIT);
        // Even with one-position blocks a 128-position split fits.
        assert!(MAX_WARPS * G4_STAGED_BYTES_PER_WARP + (DEFAULT_PARTITION + 2) * 4 <= SHARED_DEFAULT_LIMIT);
    }
}
