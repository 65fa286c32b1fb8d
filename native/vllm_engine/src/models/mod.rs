//! Model families over shared layers. Every model runs a flattened batch of
//! sequences (prefill chunks and decodes alike) against the paged KV cache.

use candle_core::Tensor;

use crate::batch_size::BatchSize;
use crate::config::{EngineArgs, ModelConfig};
use crate::error::Result;
use crate::kv_cache::PagedKvCache;

/// One sequence's slice of a forward batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqSlice {
    /// Offset of this sequence's first new token in `ForwardBatch::token_ids`.
    pub query_start: usize,
    /// Number of new tokens (a prefill chunk, or 1 for a decode).
    pub query_len: usize,
    /// Tokens in the KV cache once this step's tokens are written (positions 0..context_len).
    pub context_len: usize,
    /// Physical KV blocks holding positions 0..context_len, in order.
    pub block_table: Vec<u32>,
    /// Return logits for this sequence's last new token.
    pub want_logits: bool,
    /// Return logits for every new token of this sequence (prompt logprobs), not just the
    /// last: `query_len` rows instead of one.
    pub logits_for_all_tokens: bool,
    /// The resident LoRA slot whose deltas apply to this sequence (None: the base model).
    pub lora_slot: Option<usize>,
}

impl SeqSlice {
    /// Rows of logits this sequence gets back from `forward`.
    pub fn num_logit_rows(&self) -> usize {
        if self.logits_for_all_tokens {
            self.query_len
        } else {
            usize::from(self.want_logits && self.query_len > 0)
        }
    }
}

/// Indices into `batch.token_ids` of the tokens whose logits `forward` returns, in order.
pub fn logit_token_indices(batch: &ForwardBatch) -> Vec<usize> {
    let mut out = Vec::new();
    for seq in &batch.seqs {
        let end = seq.query_start + seq.query_len;
        out.extend(end - seq.num_logit_rows()..end);
    }
    out
}

/// The model input of one engine step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// New tokens of all sequences, concatenated in `seqs` order.
    pub token_ids: Vec<u32>,
    /// Absolute position of each token in `token_ids`.
    pub positions: Vec<usize>,
    pub seqs: Vec<SeqSlice>,
    /// Nothing waits to be scheduled, so the next step likely decodes these same rows: a
    /// model may launch it ahead (the CUDA decode lookahead).
    pub lookahead: bool,
}

impl ForwardBatch {
    /// Each sequence's new tokens cut into runs of at most `per_tile` (the CUDA prefill
    /// attention's tiles: a tile never spans two sequences), as u32 pairs (first token,
    /// token count).
    pub fn query_tiles(&self, per_tile: usize) -> Vec<u32> {
        let per_tile = per_tile.max(1);
        let mut out = Vec::new();
        for seq in &self.seqs {
            let mut first = 0;
            while first < seq.query_len {
                let count = per_tile.min(seq.query_len - first);
                out.push((seq.query_start + first) as u32);
                out.push(count as u32);
                first += count;
            }
        }
        out
    }
}

/// What a model needs to capture its decode steps (CUDA graphs) at start-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeCaptureLimits {
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// KV blocks the scheduler manages.
    pub num_blocks: usize,
    /// Decode eagerly: capture nothing.
    pub enforce_eager: bool,
    /// LoRA slots (`max_loras`; 0: LoRA off) and their largest rank, for the device.
    pub max_loras: usize,
    pub max_lora_rank: usize,
}

pub trait CausalLM: Send {
    /// Runs the batch, writing its keys and values into `kv`. Returns float32 logits of
    /// the tokens `logit_token_indices` lists (the last new token of each seq with
    /// want_logits, every new token of one with logits_for_all_tokens), shape [rows, vocab].
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> Result<Tensor>;
    fn config(&self) -> &ModelConfig;
    /// Resident bytes of the weights (float32 or quantized blocks); 0 when unknown.
    fn weight_bytes(&self) -> usize {
        0
    }
    /// Bytes one KV block of `block_size` tokens takes for this model.
    fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        let c = self.config();
        PagedKvCache::bytes_per_block(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim)
    }
    /// The KV cache this model runs against: host memory by default; a GPU model
    /// allocates it on its device.
    fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        let c = self.config();
        Ok(PagedKvCache::new(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        ))
    }
    /// KV cache bytes when `kv_cache_memory_bytes` is not given, for steps of at most
    /// `batch`: a GPU model answers from gpu_memory_utilization and what its device has
    /// left; None: the engine's CPU default.
    fn kv_cache_budget(&self, _args: &EngineArgs, _batch: BatchSize) -> Result<Option<usize>> {
        Ok(None)
    }
    /// The step width the engine takes when the args set none (a GPU model answers for
    /// its card).
    fn batch_defaults(&self) -> Result<BatchSize> {
        Ok(BatchSize::DEFAULT)
    }
    /// Puts `adapter` into LoRA slot `slot` (None empties it); sequences name the slot in
    /// `SeqSlice::lora_slot`. Models without LoRA support answer `:unsupported`.
    fn set_lora_slot(
        &mut self,
        _slot: usize,
        _adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    ) -> Result<()> {
        Err(crate::error::EngineError::unsupported(
            "this model does not support LoRA adapters",
        ))
    }
    fn supports_lora(&self) -> bool {
        false
    }
    /// For steps where every logit row is sampled greedily with nothing changing the
    /// logits: (argmax id, largest logit) per row of `forward`'s result, computed where
    /// the logits are. None: this model has no such path; the caller runs `forward`.
    fn forward_greedy(&self, _batch: &ForwardBatch, _kv: &mut PagedKvCache) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        Ok(None)
    }
    /// Whether `forward_sample` samples on this model's device (a GPU model).
    fn samples_on_device(&self) -> bool {
        false
    }
    /// For steps where every logit row qualifies for device sampling (crate::device_sampling):
    /// (picked id, its raw logit) per row of `forward`'s result, sampled where the logits
    /// are. None: this model has no such path; the caller runs `forward`.
    fn forward_sample(
        &self,
        _batch: &ForwardBatch,
        _kv: &mut PagedKvCache,
        _rows: &[crate::device_sampling::DeviceSampleRow],
    ) -> Result<Option<(Vec<u32>, Vec<f32>)>> {
        Ok(None)
    }
    /// Called once the KV cache exists: a GPU model captures its decode steps here.
    fn prepare_decode_graphs(&mut self, _limits: &DecodeCaptureLimits, _kv: &PagedKvCache) -> Result<()> {
        Ok(())
    }
}

pub mod batch;
pub mod bert;
pub mod decoder;
#[cfg(feature = "cuda")]
pub mod decoder_cuda;
#[cfg(feature = "cuda")]
pub mod decoder_cuda_tp;
pub mod encoder;
pub mod layers;
pub mod opt;
pub mod tensor_parallel;

pub use bert::BertModel;
pub use decoder::DecoderLM;
pub use encoder::{EncoderBatch, EncoderConfig, EncoderModel, PoolingType, Runner};
pub use opt::OptLM;

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(query_start: usize, query_len: usize) -> SeqSlice {
        SeqSlice {
            query_start,
            query_len,
            context_len: query_len,
            ..SeqSlice::default()
        }
    }

    #[test]
    fn query_tiles_cut_each_sequence_into_runs_of_at_most_per_tile() {
        // A decode row, a 70-token chunk, a 32-token chunk, a sequence with no new token.
        let batch = ForwardBatch {
            seqs: vec![seq(0, 1), seq(1, 70), seq(71, 32), seq(103, 0)],
            ..ForwardBatch::default()
        };
        assert_eq!(batch.query_tiles(32), vec![0, 1, 1, 32, 33, 32, 65, 6, 71, 32]);
        // Every token in exactly one tile, in order.
        let tiles = batch.query_tiles(7);
        let covered: Vec<u32> = tiles.chunks(2).flat_map(|t| t[0]..t[0] + t[1]).collect();
        assert_eq!(covered, (0..103).collect::<Vec<u32>>());
        assert!(tiles.chunks(2).all(|t| t[1] >= 1 && t[1] <= 7));
    }
}
