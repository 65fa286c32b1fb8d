//! Turns a scheduled step into a ForwardBatch, runs the model on it against the paged KV
//! cache, and hands back one row of logits per sequence that reached the end of its
//! known tokens.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::manager::SeqId;
use crate::kv_cache::PagedKvCache;
use crate::models::{CausalLM, ForwardBatch, SeqSlice};
use crate::scheduler::{Scheduler, SchedulerOutput};

/// The KV budget when the caller gives none: room for every sequence at full length,
/// but at most this much.
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

pub struct ModelRunner {
    model: Box<dyn CausalLM>,
    kv: PagedKvCache,
}

/// Logits of the sequences that sample this step.
pub struct StepLogits {
    pub seq_ids: Vec<SeqId>,
    /// Row i belongs to seq_ids[i].
    pub rows: Vec<Vec<f32>>,
    /// For sequences that asked for prompt logprobs: the logits at prompt positions
    /// `first..first + rows.len()` (each predicts the prompt token after it).
    pub prompt_rows: Vec<PromptRows>,
}

pub struct PromptRows {
    pub seq_id: SeqId,
    pub first: usize,
    pub rows: Vec<Vec<f32>>,
}

impl ModelRunner {
    pub fn new(model: Box<dyn CausalLM>, num_blocks: usize, block_size: usize) -> Self {
        let c = model.config();
        let kv = PagedKvCache::new(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        );
        ModelRunner { model, kv }
    }

    /// Bytes of key and value memory the cache holds now (0 after `release_kv_cache`).
    pub fn kv_cache_bytes(&self) -> usize {
        let floats: usize = self.kv.layers.iter().map(|l| l.k.capacity() + l.v.capacity()).sum();
        floats * std::mem::size_of::<f32>()
    }

    /// Frees the KV cache memory (sleep). The block geometry stays for `restore_kv_cache`.
    pub fn release_kv_cache(&mut self) {
        for layer in &mut self.kv.layers {
            layer.k = Vec::new();
            layer.v = Vec::new();
        }
    }

    /// Reallocates a released KV cache (zeroed) with the geometry it had.
    pub fn restore_kv_cache(&mut self) {
        let c = self.model.config();
        self.kv = PagedKvCache::new(
            c.num_hidden_layers,
            self.kv.num_blocks,
            self.kv.block_size,
            c.num_key_value_heads,
            c.head_dim,
        );
    }

    /// The model's resident weight bytes (0 when the model does not know).
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Swaps the model (sleep drops the weights, wake-up reloads them); returns the old one.
    pub fn replace_model(&mut self, model: Box<dyn CausalLM>) -> Box<dyn CausalLM> {
        std::mem::replace(&mut self.model, model)
    }

    /// How many blocks `bytes` of KV memory hold for this model (at least one).
    pub fn num_blocks_for_bytes(config: &ModelConfig, block_size: usize, bytes: usize) -> usize {
        let per_block = PagedKvCache::bytes_per_block(
            config.num_hidden_layers,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
        );
        (bytes / per_block.max(1)).max(1)
    }

    /// Runs one scheduled step. Sequences whose step ends before their last known token
    /// (a prefill chunk) only fill the cache.
    pub fn execute(&mut self, step: &SchedulerOutput, scheduler: &Scheduler) -> Result<StepLogits> {
        let (batch, seq_ids) = build_batch(step, scheduler)?;
        if seq_ids.is_empty() && batch.token_ids.is_empty() {
            return Ok(StepLogits {
                seq_ids,
                rows: Vec::new(),
                prompt_rows: Vec::new(),
            });
        }
        let logits = self.model.forward(&batch, &mut self.kv)?;
        let all: Vec<Vec<f32>> = logits.to_vec2::<f32>()?;
        let expected: usize = batch.seqs.iter().map(|s| s.num_logit_rows()).sum();
        if all.len() != expected {
            return Err(EngineError::internal(format!(
                "model returned {} rows of logits, expected {expected}",
                all.len()
            )));
        }
        // Split each seq's rows: prompt positions (when asked for) and the sampling row.
        let mut all = all.into_iter();
        let mut rows = Vec::with_capacity(seq_ids.len());
        let mut prompt_rows = Vec::new();
        for (slice, s) in batch.seqs.iter().zip(&step.scheduled) {
            let mut mine: Vec<Vec<f32>> = all.by_ref().take(slice.num_logit_rows()).collect();
            if slice.logits_for_all_tokens {
                let first = slice.context_len - slice.query_len;
                let num_prompt = scheduler.seq(s.seq_id).map_or(0, |q| q.num_prompt_tokens);
                // Position p predicts token p + 1: only those inside the prompt count.
                let prompt_part = num_prompt.saturating_sub(1).saturating_sub(first).min(mine.len());
                let sampling_row = if slice.want_logits { mine.pop() } else { None };
                mine.truncate(prompt_part);
                prompt_rows.push(PromptRows {
                    seq_id: s.seq_id,
                    first,
                    rows: mine,
                });
                rows.extend(sampling_row);
            } else {
                rows.extend(mine);
            }
        }
        Ok(StepLogits {
            seq_ids,
            rows,
            prompt_rows,
        })
    }
}

fn build_batch(step: &SchedulerOutput, scheduler: &Scheduler) -> Result<(ForwardBatch, Vec<SeqId>)> {
    let mut batch = ForwardBatch::default();
    let mut sampling = Vec::new();
    for s in &step.scheduled {
        let seq = scheduler
            .seq(s.seq_id)
            .ok_or_else(|| EngineError::internal(format!("scheduled request {} is unknown", s.seq_id)))?;
        let start = seq.num_computed_tokens;
        let end = start + s.num_new_tokens;
        let want_logits = end == seq.num_tokens();
        let logits_for_all_tokens = seq.params.prompt_logprobs.is_some() && start + 1 < seq.num_prompt_tokens;
        batch.seqs.push(SeqSlice {
            query_start: batch.token_ids.len(),
            query_len: s.num_new_tokens,
            context_len: end,
            block_table: scheduler.kv().block_table(s.seq_id).to_vec(),
            want_logits,
            logits_for_all_tokens,
        });
        batch.token_ids.extend_from_slice(&seq.token_ids[start..end]);
        batch.positions.extend(start..end);
        if want_logits {
            sampling.push(s.seq_id);
        }
    }
    Ok((batch, sampling))
}
