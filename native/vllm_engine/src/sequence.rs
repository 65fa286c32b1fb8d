//! The engine core's view of one request: its tokens (prompt then output), how many of
//! them are in the KV cache, and what it samples with.

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::kv_cache::block_hash::{extend_block_hashes, BlockHash, ExtraKeys};
use crate::kv_cache::manager::SeqId;
use crate::request::SamplingParams;

pub struct Sequence {
    pub seq_id: SeqId,
    pub request_id: String,
    /// Prompt tokens followed by generated tokens.
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Tokens whose keys and values are in the KV cache (reset to 0 by preemption).
    pub num_computed_tokens: usize,
    pub params: SamplingParams,
    /// Generation stops at this many output tokens (max_tokens, or the room left in the context).
    pub max_output_tokens: usize,
    pub priority: i32,
    /// Order of arrival at the engine core; ties between equal priorities go to the older.
    pub arrival_order: u64,
    /// Its own generator when the request has a seed, so its samples do not depend on
    /// what else is in the batch.
    pub rng: Option<ChaCha8Rng>,
    /// When the scheduler first gave it a step (seconds since the Unix epoch).
    pub first_scheduled_time: Option<f64>,
    /// Prefix-cache keys besides the tokens (LoRA adapter, cache salt).
    pub extra_keys: ExtraKeys,
    /// Hashes of its full blocks so far (prefix caching), extended as tokens arrive.
    pub block_hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache when first admitted (vLLM's num_cached_tokens).
    pub num_cached_tokens: Option<usize>,
    /// Times it was preempted by recompute.
    pub num_preemptions: u32,
    /// Its LoRA adapter's weights (the id is `extra_keys.lora_int_id`).
    pub lora: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    /// Its structured-output state, advanced by each output token (kept across
    /// preemption, as the output tokens are).
    pub grammar: Option<Box<crate::structured_output::GrammarMatcher>>,
}

impl Sequence {
    pub fn new(
        seq_id: SeqId,
        request_id: String,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        max_model_len: usize,
        priority: i32,
        arrival_order: u64,
    ) -> Self {
        let num_prompt_tokens = prompt_token_ids.len();
        let room = max_model_len.saturating_sub(num_prompt_tokens);
        let max_output_tokens = params.max_tokens.map_or(room, |m| m.min(room));
        let rng = params.seed.map(ChaCha8Rng::seed_from_u64);
        Sequence {
            seq_id,
            request_id,
            token_ids: prompt_token_ids,
            num_prompt_tokens,
            num_computed_tokens: 0,
            params,
            max_output_tokens,
            priority,
            arrival_order,
            rng,
            first_scheduled_time: None,
            extra_keys: ExtraKeys::default(),
            block_hashes: Vec::new(),
            num_cached_tokens: None,
            num_preemptions: 0,
            lora: None,
            grammar: None,
        }
    }

    /// Sets the LoRA id and cache salt that key its blocks in the prefix cache.
    pub fn with_extra_keys(mut self, lora_int_id: Option<u32>, cache_salt: Option<String>) -> Self {
        self.extra_keys = ExtraKeys {
            lora_int_id,
            cache_salt,
        };
        self.block_hashes.clear();
        self
    }

    /// Attaches the LoRA adapter it runs with (its id must be in `extra_keys`).
    pub fn with_lora(mut self, adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>) -> Self {
        self.lora = adapter;
        self
    }

    /// Brings `block_hashes` up to date with the full blocks of `token_ids`.
    pub fn update_block_hashes(&mut self, block_size: usize) {
        extend_block_hashes(&mut self.block_hashes, &self.token_ids, block_size, &self.extra_keys);
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
    pub fn output_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }
    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }
    /// Known tokens not yet in the KV cache (a prompt, the rest of a chunked prefill,
    /// the last sampled token, or everything again after a preemption).
    pub fn num_uncomputed_tokens(&self) -> usize {
        self.token_ids.len() - self.num_computed_tokens
    }
}
