//! Launcher of kernels/attention_batch.cu: paged attention for batches of more than 8 query
//! rows (W1's decode steps, prefill chunks), a warp per (token, KV head, split of
//! `partition` positions) with its own online softmax; the last split combines the others.
//! Batches of at most 8 rows keep ops.rs's paged_attention_v2 (the small-batch path).
//!
//! Knobs (read once): `VLLM_ATT_BATCH=0` turns this kernel off (every batch through
//! paged_attention_v2, to compare); `VLLM_ATT_BATCH_ROWS=n` uses it from n rows on (default
//! 9; tests set 1 to run the batched graph tests through it); `VLLM_ATT_PARTITION=n`
//! positions per split (default 128; 256 for the tensor-core form). Groups of 4 (Llama-3 8B, Mistral 7B: W2) in bf16 /
//! f16 with head_dim 64 or 128 take the tensor-core form (a warp per block, the group's
//! heads as rows of mma tiles; session 8: 1.83 → 3.3 TB/s on W2's decode cache);
//! `VLLM_ATT_G4=u4` gives the session-7 form (4 rows per pass, capped at 128 registers,
//! still f32's), `VLLM_ATT_G4=u2` the session-6 form (2 rows per pass, 135 registers).

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
/// session-6 form of group 4 (`VLLM_ATT_G4=u2`, to compare).
pub const KERNEL_NAMES: [&str; 4] = [
    "attention_batch_g1",
    "attention_batch_g2",
    "attention_batch_g4",
    "attention_batch_g4_u2",
];

/// The tensor-core form of group 4, per head_dim (bf16 and f16 only: no f32 mma; see
/// `tc_serves`).
pub const TC_KERNEL_NAMES: [&str; 2] = ["attention_batch_g4_tc_d64", "attention_batch_g4_tc_d128"];
/// Its slices in flight (TC_STAGES in attention_batch.cu), each 16 positions of keys and values.
const TC_STAGES: usize = 2;

/// Positions per split: measured best of 64..2048 on an H200 (bench/RESULTS.md, change 8).
const DEFAULT_PARTITION: usize = 128;
/// The tensor-core form's: W2's contexts (129..256) in one split (session 8: +3.7% on W2
/// against 128 in the same call).
const TC_PARTITION: usize = 256;

struct Config {
    enabled: bool,
    min_rows: usize,
    /// `VLLM_ATT_PARTITION`, else each form's default.
    partition: Option<usize>,
    g4_form: G4Form,
}

/// Which kernel runs groups of 4.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum G4Form {
    /// attention_batch_g4_tc_d{64,128} where `tc_serves`, else U4.
    TensorCores,
    /// attention_batch_g4: 4 rows per pass in registers (session 7).
    U4,
    /// attention_batch_g4_u2: 2 rows per pass (session 6).
    U2,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        Config {
            enabled: std::env::var_os("VLLM_ATT_BATCH").is_none_or(|v| v != "0"),
            min_rows: num("VLLM_ATT_BATCH_ROWS").unwrap_or(9).max(1),
            partition: num("VLLM_ATT_PARTITION").map(|p| p.max(16)),
            g4_form: match std::env::var("VLLM_ATT_G4").as_deref() {
                Ok("u4") => G4Form::U4,
                Ok("u2") => G4Form::U2,
                _ => G4Form::TensorCores,
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
    let default = if takes_tc(group, dtype, dims.head_dim) {
        TC_PARTITION
    } else {
        DEFAULT_PARTITION
    };
    fits.then_some(c.partition.unwrap_or(default))
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
    // The split's block-table entries (an unaligned start adds one).
    let table = (partition.div_ceil(meta.block_size) + 2) * 4;
    let (name, warps, shared) = if takes_tc(group, dtype, dims.head_dim) {
        // A warp per (token, KV head, split); before the table, TC_STAGES slices of 16 key
        // and 16 value rows (2-byte elements).
        let stages = TC_STAGES * 2 * 16 * dims.head_dim * 2;
        (format!("attention_batch_g4_tc_d{}", dims.head_dim), 1, stages + table)
    } else {
        let form = if group == 4 && config().g4_form == G4Form::U2 {
            "_u2"
        } else {
            ""
        };
        (
            format!("attention_batch_g{group}{form}"),
            dims.num_kv_heads.min(MAX_WARPS),
            table,
        )
    };
    let f = k.function(&name, dtype)?;
    let args = AttentionArgs::new(p, meta, dims, partition, splits);
    let mut b = k.stream().launch_builder(f);
    args.push(&mut b);
    b.arg(&p.done_counts);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, dims.num_kv_heads.div_ceil(warps) as u32, splits as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    unsafe { b.launch(cfg) }.map_err(|e| EngineError::internal(format!("CUDA kernel {name} failed to launch: {e}")))?;
    Ok(())
}

/// Whether this group runs through the tensor-core form.
fn takes_tc(group: usize, dtype: DType, head_dim: usize) -> bool {
    group == 4 && config().g4_form == G4Form::TensorCores && tc_serves(dtype, head_dim)
}

/// Whether the tensor-core form has an instantiation for this storage type and head size.
fn tc_serves(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tensor_core_form_serves_bf16_and_f16_at_head_dim_64_and_128_only() {
        for dtype in [DType::BF16, DType::F16] {
            assert!(tc_serves(dtype, 128));
            assert!(tc_serves(dtype, 64));
            assert!(!tc_serves(dtype, 96));
            assert!(!tc_serves(dtype, 256));
        }
        assert!(!tc_serves(DType::F32, 128));
    }

    #[test]
    fn its_stages_and_a_default_split_table_fit_the_default_shared_memory() {
        // Launches take at most 48 KiB of dynamic shared memory without opting in.
        let table = (TC_PARTITION + 2) * 4; // one-position blocks: the largest table
        assert!(TC_STAGES * 2 * 16 * 128 * 2 + table <= 48 * 1024);
    }
}
