//! Tensor parallelism's shard spec (no GPU code): which slice of each HF-named weight rank
//! `r` of `n` holds, and the per-rank model shape those slices make. Megatron's split:
//! q/k/v and gate/up by output rows (whole heads, whole MLP columns), o_proj and down_proj
//! by input columns, so each rank's o_proj / down output is a partial sum that one
//! all-reduce completes. KV heads fewer than the ranks are replicated: rank r keeps the KV
//! head its query heads read. Embeddings, norms and lm_head stay whole on every rank.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// The part of one weight a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shard {
    /// The whole tensor.
    Whole,
    /// `len` entries from `start` along dimension `dim`.
    Slice { dim: usize, start: usize, len: usize },
}

/// How a model of `config` is split over `size` ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSpec {
    pub size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
}

impl ShardSpec {
    /// Checks that `size` ranks divide the model evenly (`:validation` naming the
    /// dimension that does not).
    pub fn new(config: &ModelConfig, size: usize) -> Result<Self> {
        let bad = |what: String| Err(EngineError::validation(format!("tensor_parallel_size {size}: {what}")));
        if size == 0 {
            return bad("must be at least 1".into());
        }
        let heads = config.num_attention_heads;
        let kv = config.num_key_value_heads;
        if !heads.is_multiple_of(size) {
            return bad(format!("does not divide the {heads} attention heads"));
        }
        if kv == 0 || !(kv.is_multiple_of(size) || size.is_multiple_of(kv)) {
            return bad(format!("{kv} KV heads are neither a multiple nor a divisor of it"));
        }
        if !config.intermediate_size.is_multiple_of(size) {
            return bad(format!("does not divide the MLP width {}", config.intermediate_size));
        }
        Ok(ShardSpec {
            size,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: config.head_dim,
            intermediate_size: config.intermediate_size,
        })
    }

    pub fn heads_per_rank(&self) -> usize {
        self.num_attention_heads / self.size
    }

    /// KV heads each rank keeps: an even share, or one (replicated) when fewer than ranks.
    pub fn kv_heads_per_rank(&self) -> usize {
        (self.num_key_value_heads / self.size).max(1)
    }

    /// The first KV head of rank `rank`.
    pub fn first_kv_head(&self, rank: usize) -> usize {
        if self.num_key_value_heads >= self.size {
            rank * self.kv_heads_per_rank()
        } else {
            // size / kv ranks share each KV head; their query heads all read it.
            rank / (self.size / self.num_key_value_heads)
        }
    }

    /// The model as one rank sees it: its heads and MLP columns, everything else whole.
    pub fn rank_config(&self, config: &ModelConfig) -> ModelConfig {
        let mut c = config.clone();
        c.num_attention_heads = self.heads_per_rank();
        c.num_key_value_heads = self.kv_heads_per_rank();
        c.intermediate_size = self.intermediate_size / self.size;
        c
    }

    /// The part of weight `name` that rank `rank` holds (names as HF writes them).
    pub fn shard(&self, name: &str, rank: usize) -> Shard {
        let d = self.head_dim;
        let rows = |start: usize, len: usize| Shard::Slice { dim: 0, start, len };
        let cols = |start: usize, len: usize| Shard::Slice { dim: 1, start, len };
        let q = self.heads_per_rank() * d;
        let kv = self.kv_heads_per_rank() * d;
        let kv_start = self.first_kv_head(rank) * d;
        let mlp = self.intermediate_size / self.size;
        let tail = name.rsplit_once(".layers.").map_or(name, |(_, rest)| {
            rest.split_once('.').map_or(rest, |(_, after_index)| after_index)
        });
        match tail {
            "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => rows(rank * q, q),
            "self_attn.k_proj.weight"
            | "self_attn.k_proj.bias"
            | "self_attn.v_proj.weight"
            | "self_attn.v_proj.bias" => rows(kv_start, kv),
            "self_attn.o_proj.weight" => cols(rank * q, q),
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => rows(rank * mlp, mlp),
            "mlp.down_proj.weight" => cols(rank * mlp, mlp),
            _ => Shard::Whole,
        }
    }

    /// The whole tensor's shape, given the shape of rank `rank`'s shard of it.
    pub fn whole_shape(&self, name: &str, rank: usize, shard: &[usize]) -> Vec<usize> {
        let mut shape = shard.to_vec();
        if let Shard::Slice { dim, .. } = self.shard(name, rank) {
            let d = self.head_dim;
            let whole = match dim {
                0 if name.contains("self_attn.q_proj") => self.num_attention_heads * d,
                0 if name.contains("self_attn.") => self.num_key_value_heads * d,
                1 if name.contains("self_attn.") => self.num_attention_heads * d,
                _ => self.intermediate_size,
            };
            if let Some(s) = shape.get_mut(dim) {
                *s = whole;
            }
        }
        shape
    }

    /// The shape of `name`'s shard, given the whole tensor's shape.
    pub fn shard_shape(&self, name: &str, rank: usize, whole: &[usize]) -> Vec<usize> {
        let mut shape = whole.to_vec();
        if let Shard::Slice { dim, len, .. } = self.shard(name, rank) {
            if let Some(s) = shape.get_mut(dim) {
                *s = len;
            }
        }
        shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn config(heads: usize, kv: usize, head_dim: usize, intermediate: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Qwen3,
            vocab_size: 512,
            hidden_size: heads * head_dim,
            intermediate_size: intermediate,
            num_hidden_layers: 2,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            max_position_embeddings: 128,
            sliding_window: None,
            tie_word_embeddings: true,
            attention_bias: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    fn slice(dim: usize, start: usize, len: usize) -> Shard {
        Shard::Slice { dim, start, len }
    }

    #[test]
    fn two_ranks_split_heads_and_mlp_columns_and_keep_the_rest_whole() {
        // 4 heads of 16, 2 KV heads, MLP 128: rank 1 of 2.
        let spec = ShardSpec::new(&config(4, 2, 16, 128), 2).expect("divides");
        let l = "model.layers.7.";
        assert_eq!(spec.shard(&format!("{l}self_attn.q_proj.weight"), 1), slice(0, 32, 32));
        assert_eq!(spec.shard(&format!("{l}self_attn.q_proj.bias"), 1), slice(0, 32, 32));
        assert_eq!(spec.shard(&format!("{l}self_attn.k_proj.weight"), 1), slice(0, 16, 16));
        assert_eq!(spec.shard(&format!("{l}self_attn.v_proj.bias"), 0), slice(0, 0, 16));
        assert_eq!(spec.shard(&format!("{l}self_attn.o_proj.weight"), 1), slice(1, 32, 32));
        assert_eq!(spec.shard(&format!("{l}mlp.gate_proj.weight"), 1), slice(0, 64, 64));
        assert_eq!(spec.shard(&format!("{l}mlp.up_proj.weight"), 0), slice(0, 0, 64));
        assert_eq!(spec.shard(&format!("{l}mlp.down_proj.weight"), 1), slice(1, 64, 64));
        for whole in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
        ] {
            assert_eq!(spec.shard(whole, 1), Shard::Whole, "{whole}");
        }
        assert_eq!(
            spec.shard_shape(&format!("{l}mlp.down_proj.weight"), 0, &[64, 128]),
            vec![64, 64]
        );
        for (name, whole) in [
            ("self_attn.q_proj.weight", vec![64, 64]),
            ("self_attn.k_proj.weight", vec![32, 64]),
            ("self_attn.v_proj.bias", vec![32]),
            ("self_attn.o_proj.weight", vec![64, 64]),
            ("mlp.gate_proj.weight", vec![128, 64]),
            ("mlp.down_proj.weight", vec![64, 128]),
            ("input_layernorm.weight", vec![64]),
        ] {
            let name = format!("{l}{name}");
            let shard = spec.shard_shape(&name, 1, &whole);
            assert_eq!(spec.whole_shape(&name, 1, &shard), whole, "{name}");
        }
        let rank = spec.rank_config(&config(4, 2, 16, 128));
        assert_eq!(
            (
                rank.num_attention_heads,
                rank.num_key_value_heads,
                rank.intermediate_size,
                rank.hidden_size
            ),
            (2, 1, 64, 64)
        );
    }

    /// Every rank's slices tile each split weight exactly once (no gap, no overlap).
    #[test]
    fn the_ranks_slices_tile_every_split_weight() {
        for (heads, kv, size) in [(32, 8, 2), (32, 8, 4), (32, 8, 8), (14, 2, 2), (16, 16, 4)] {
            let spec = ShardSpec::new(&config(heads, kv, 8, 64), size).expect("divides");
            for (name, dim, total) in [
                ("model.layers.0.self_attn.q_proj.weight", 0, heads * 8),
                ("model.layers.0.self_attn.k_proj.weight", 0, kv * 8),
                ("model.layers.0.self_attn.o_proj.weight", 1, heads * 8),
                ("model.layers.0.mlp.down_proj.weight", 1, 64),
            ] {
                let mut next = 0;
                for r in 0..size {
                    let Shard::Slice { dim: d, start, len } = spec.shard(name, r) else {
                        panic!("{name} is split");
                    };
                    assert_eq!((d, start), (dim, next), "{name} rank {r} of {size}");
                    next += len;
                }
                assert_eq!(next, total, "{name} over {size} ranks");
            }
        }
    }

    /// 2 KV heads over 4 ranks: ranks 0,1 keep KV head 0 and ranks 2,3 KV head 1, the one
    /// their query heads (1 each of 4, group of 2) read.
    #[test]
    fn kv_heads_fewer_than_ranks_are_replicated_to_the_ranks_that_read_them() {
        let spec = ShardSpec::new(&config(4, 2, 16, 128), 4).expect("divides");
        assert_eq!(spec.kv_heads_per_rank(), 1);
        let k = "model.layers.3.self_attn.k_proj.weight";
        let got: Vec<Shard> = (0..4).map(|r| spec.shard(k, r)).collect();
        assert_eq!(
            got,
            vec![slice(0, 0, 16), slice(0, 0, 16), slice(0, 16, 16), slice(0, 16, 16)]
        );
        for r in 0..4 {
            // Query head r reads KV head r / group in the whole model.
            let group = 4 / 2;
            let Shard::Slice { start, .. } = spec.shard("model.layers.0.self_attn.q_proj.weight", r) else {
                panic!("q is split");
            };
            assert_eq!(start / 16 / group, spec.first_kv_head(r), "rank {r}");
        }
    }

    #[test]
    fn sizes_that_do_not_divide_the_model_are_validation_errors() {
        use crate::error::ErrorCategory;
        for (c, size, words) in [
            (config(4, 2, 16, 128), 3, "attention heads"),
            (config(12, 4, 16, 128), 6, "KV heads"),
            (config(4, 2, 16, 130), 4, "MLP width"),
            (config(4, 2, 16, 128), 0, "at least 1"),
        ] {
            let err = ShardSpec::new(&c, size).expect_err("must not divide");
            assert_eq!(err.category, ErrorCategory::Validation);
            assert!(err.message.contains(words), "{}", err.message);
            assert!(err.message.contains("tensor_parallel_size"), "{}", err.message);
        }
    }
}
