//! Checks a forward batch against the cache and the model before any indexing.

use crate::backend::cpu::attention::QueryToken;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::PagedKvCache;
use crate::models::ForwardBatch;

/// Rejects a batch that would index outside the cache or the vocabulary.
pub fn check_batch<'a>(batch: &'a ForwardBatch, kv: &PagedKvCache, c: &ModelConfig) -> Result<Vec<QueryToken<'a>>> {
    if kv.layers.len() != c.num_hidden_layers || kv.num_kv_heads != c.num_key_value_heads || kv.head_dim != c.head_dim {
        return Err(EngineError::internal(format!(
            "KV cache shape (layers {}, kv heads {}, head_dim {}) does not fit the model ({}, {}, {})",
            kv.layers.len(),
            kv.num_kv_heads,
            kv.head_dim,
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim
        )));
    }
    let layer_len = kv.num_blocks * kv.block_size * kv.num_kv_heads * kv.head_dim;
    if kv.block_size == 0 || kv.layers.iter().any(|l| l.lens() != (layer_len, layer_len)) {
        return Err(EngineError::internal(
            "KV cache buffers do not match its declared geometry",
        ));
    }
    let n = batch.token_ids.len();
    if batch.positions.len() != n {
        return Err(EngineError::internal(
            "forward batch: positions and token_ids differ in length",
        ));
    }
    if let Some(&bad) = batch.token_ids.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(EngineError::validation(format!(
            "token id {bad} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    let mut tokens: Vec<Option<QueryToken>> = vec![None; n];
    for (s, seq) in batch.seqs.iter().enumerate() {
        let end = seq.query_start + seq.query_len;
        if seq.want_logits && seq.query_len == 0 {
            return Err(EngineError::internal(format!(
                "forward batch: seq {s} wants logits but has no new tokens"
            )));
        }
        if end > n {
            return Err(EngineError::internal(format!(
                "forward batch: seq {s} reaches past the tokens"
            )));
        }
        let blocks_needed = seq.context_len.div_ceil(kv.block_size);
        if seq.block_table.len() < blocks_needed {
            return Err(EngineError::internal(format!(
                "forward batch: seq {s} has {} blocks for {} tokens",
                seq.block_table.len(),
                seq.context_len
            )));
        }
        if let Some(&b) = seq.block_table[..blocks_needed]
            .iter()
            .find(|&&b| b as usize >= kv.num_blocks)
        {
            return Err(EngineError::internal(format!(
                "forward batch: block {b} is outside the cache"
            )));
        }
        for (t, (slot, &position)) in tokens[seq.query_start..end]
            .iter_mut()
            .zip(&batch.positions[seq.query_start..end])
            .enumerate()
        {
            if position >= seq.context_len || slot.is_some() {
                return Err(EngineError::internal(format!(
                    "forward batch: token {} of seq {s} is at position {position} of context {} or in two seqs",
                    seq.query_start + t,
                    seq.context_len
                )));
            }
            *slot = Some(QueryToken {
                position,
                block_table: &seq.block_table,
            });
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(t, q)| q.ok_or_else(|| EngineError::internal(format!("forward batch: token {t} belongs to no seq"))))
        .collect()
}
