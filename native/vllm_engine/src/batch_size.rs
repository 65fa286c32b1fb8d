//! How wide one engine step may be (sequences and tokens) when the engine args leave it
//! open: the device decides, as in vLLM.

/// The most sequences and tokens one step schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// Cards with at least this much memory take the wide defaults (vLLM's threshold).
const LARGE_GPU_BYTES: usize = 70 << 30;

impl BatchSize {
    /// CPUs and smaller GPUs: vLLM's 256 sequences; 2,048 tokens keep a CPU step short.
    pub const DEFAULT: BatchSize = BatchSize {
        max_num_seqs: 256,
        max_num_batched_tokens: 2048,
    };

    /// H100- and H200-class cards: vLLM's offline defaults there. Decode steps of up to
    /// 1,024 rows keep the tensor cores busy where 256 rows leave the products
    /// bandwidth-bound, and the memory holds the KV cache of that many sequences.
    pub const LARGE_GPU: BatchSize = BatchSize {
        max_num_seqs: 1024,
        max_num_batched_tokens: 16384,
    };

    /// The defaults for a GPU of `total_bytes` named `name`. The A100 stays at the
    /// smaller ones: vLLM measured the wide defaults slower there.
    pub fn for_gpu(total_bytes: usize, name: &str) -> BatchSize {
        if total_bytes >= LARGE_GPU_BYTES && !name.to_ascii_lowercase().contains("a100") {
            BatchSize::LARGE_GPU
        } else {
            BatchSize::DEFAULT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_cards_other_than_the_a100_take_the_wide_defaults() {
        let gib = 1usize << 30;
        assert_eq!(BatchSize::for_gpu(141 * gib, "NVIDIA H200"), BatchSize::LARGE_GPU);
        assert_eq!(
            BatchSize::for_gpu(80 * gib, "NVIDIA H100 80GB HBM3"),
            BatchSize::LARGE_GPU
        );
        assert_eq!(
            BatchSize::for_gpu(80 * gib, "NVIDIA A100-SXM4-80GB"),
            BatchSize::DEFAULT
        );
        assert_eq!(BatchSize::for_gpu(24 * gib, "NVIDIA L4"), BatchSize::DEFAULT);
    }
}
