//! What a caller submits (EngineRequest, SamplingParams) and what it gets back
//! (RequestOutput, CompletionOutput), mirroring vLLM's classes of the same names.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputKind {
    /// Every output carries all text and tokens so far (vLLM's default).
    #[default]
    Cumulative,
    /// Every output carries only what is new since the previous one.
    Delta,
    /// One output, when the request finishes.
    FinalOnly,
}

/// Sampling parameters, same names and defaults as vLLM 0.14's SamplingParams.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or -1: off.
    pub top_k: i32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// None: up to the model's context length.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    /// Number of top alternatives to return per generated token (None: no logprobs).
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    pub detokenize: bool,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    pub include_stop_str_in_output: bool,
    pub output_kind: OutputKind,
    /// Added to the logit of each token id (before penalties), clamped to [-100, 100].
    pub logit_bias: HashMap<u32, f32>,
    /// When set, only these token ids can be sampled.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Words never to generate: the engine tokenizes them (alone and after a space, as vLLM)
    /// into `bad_words_token_ids`.
    pub bad_words: Vec<String>,
    /// Filled by the engine from `bad_words`; a caller may also give token sequences directly.
    pub bad_words_token_ids: Vec<Vec<u32>>,
    /// Keep only the last k prompt tokens (-1: the model's context length).
    pub truncate_prompt_tokens: Option<i64>,
    /// Constrains the output (JSON schema, regex, choice, grammar) while decoding.
    pub structured_outputs: Option<crate::structured_output::StructuredOutputs>,
}

/// vLLM's default cap on `logprobs` and `prompt_logprobs` (its `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// The most children one request may fan out into (`n`).
pub const MAX_N: usize = 128;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            detokenize: true,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            include_stop_str_in_output: false,
            output_kind: OutputKind::Cumulative,
            logit_bias: HashMap::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            bad_words_token_ids: Vec::new(),
            truncate_prompt_tokens: None,
            structured_outputs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Default::default()
        }
    }

    /// Below vLLM's epsilon a temperature means greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == 1
    }

    /// Checks ranges the way vLLM does; the message names the offending field.
    /// The ids a request mentions outside its prompt (logit_bias, allowed_token_ids,
    /// stop_token_ids, bad words), for the engine's vocabulary check.
    pub fn mentioned_token_ids(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        let bias = self.logit_bias.keys().map(|&id| ("logit_bias", id));
        let allowed = self
            .allowed_token_ids
            .iter()
            .flatten()
            .map(|&id| ("allowed_token_ids", id));
        let stop = self.stop_token_ids.iter().map(|&id| ("stop_token_ids", id));
        let bad = self.bad_words_token_ids.iter().flatten().map(|&id| ("bad_words", id));
        bias.chain(allowed).chain(stop).chain(bad)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::validation(m));
        if !(1..=MAX_N).contains(&self.n) {
            return bad(format!("n must be in [1, {MAX_N}], got {}", self.n));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < -1 {
            return bad(format!(
                "top_k must be -1 (off), 0 (off) or positive, got {}",
                self.top_k
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1, got 0".to_string());
        }
        if let Some(max) = self.max_tokens {
            if self.min_tokens > max {
                return bad(format!(
                    "min_tokens ({}) must be <= max_tokens ({max})",
                    self.min_tokens
                ));
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".to_string());
        }
        if !self.detokenize && !self.stop.is_empty() {
            return bad("stop strings are not supported when detokenize is false".to_string());
        }
        for (name, value) in [("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)] {
            if let Some(k) = value {
                if k > MAX_LOGPROBS {
                    return bad(format!("{name} must be at most {MAX_LOGPROBS}, got {k}"));
                }
            }
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return bad(format!("logit_bias for token {id} must be a finite number, got {b}"));
        }
        if self.allowed_token_ids.as_ref().is_some_and(|ids| ids.is_empty()) {
            return bad("allowed_token_ids must not be empty".to_string());
        }
        if self.bad_words.iter().any(|w| w.trim().is_empty()) {
            return bad("bad_words must not be empty or blank".to_string());
        }
        if self.bad_words_token_ids.iter().any(|w| w.is_empty()) {
            return bad("bad_words_token_ids must not contain an empty sequence".to_string());
        }
        match self.truncate_prompt_tokens {
            Some(k) if k == 0 || k < -1 => {
                return bad(format!("truncate_prompt_tokens must be -1 or at least 1, got {k}"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// One request as the engine receives it: the prompt is already tokenized.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    /// The prompt text when the caller gave text (echoed back in outputs).
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Lower runs first (vLLM's priority scheduling); 0 by default.
    pub priority: i32,
    pub arrival_time: SystemTime,
    /// The LoRA adapter to run with (added on the fly when new); None: the base model.
    pub lora: Option<crate::lora::LoRARequest>,
}

impl EngineRequest {
    pub fn new(request_id: impl Into<String>, prompt_token_ids: Vec<u32>, params: SamplingParams) -> Self {
        EngineRequest {
            request_id: request_id.into(),
            prompt: None,
            prompt_token_ids,
            params,
            priority: 0,
            arrival_time: SystemTime::now(),
            lora: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// max_tokens or the context length.
    Length,
    /// Aborted by the caller (or its owner died).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What made a request stop with FinishReason::Stop (None for EOS, as vLLM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The logprob of one token, with its rank in the distribution (1 = most likely).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub rank: usize,
    pub decoded_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub cumulative_logprob: Option<f64>,
    /// Per generated token: the sampled token first, then the top-k alternatives.
    pub logprobs: Option<Vec<Vec<TokenLogprob>>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// Times of one request, as seconds since the Unix epoch and durations in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMetrics {
    pub arrival_time: f64,
    pub first_scheduled_time: Option<f64>,
    pub first_token_time: Option<f64>,
    pub last_token_time: Option<f64>,
    pub finished_time: Option<f64>,
    pub time_in_queue: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub request_id: String,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    /// When `prompt_logprobs` was asked for: per prompt token (None for the first, as
    /// vLLM), that token's logprob first, then the top-k alternatives. Delta outputs carry
    /// it in the first output only.
    pub prompt_logprobs: Option<Vec<Option<Vec<TokenLogprob>>>>,
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
    pub metrics: RequestMetrics,
    pub num_cached_tokens: usize,
    /// The adapter the request named (vLLM's `RequestOutput.lora_request`).
    pub lora_request: Option<crate::lora::LoRARequest>,
}

pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
