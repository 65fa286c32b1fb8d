//! Fake models for the sampling tests: one that speaks a fixed script (to test stopping
//! and detokenization on chosen tokens) and one whose next-token distribution is known
//! and fixed (to test sampling statistics through the engine).
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::models::{CausalLM, ForwardBatch};
use vllm_engine::{Engine, ModelConfig};

#[path = "../engine_common/mod.rs"]
mod engine_common;
pub use engine_common::*;

const LOW: f32 = -30.0;

/// Whatever the context, the next token is `script[output position]` (the output position
/// is the context length minus `prompt_len`; past the end of the script it repeats the
/// last entry), with a logit of 10 and everything else at -30.
pub struct ScriptModel {
    config: ModelConfig,
    prompt_len: usize,
    script: Vec<u32>,
}

impl CausalLM for ScriptModel {
    fn forward(&self, batch: &ForwardBatch, _kv: &mut PagedKvCache) -> vllm_engine::Result<Tensor> {
        let mut rows = Vec::new();
        for seq in batch.seqs.iter().filter(|s| s.want_logits) {
            let at = seq.context_len.saturating_sub(self.prompt_len);
            let next = self.script[at.min(self.script.len() - 1)];
            let mut row = vec![LOW; VOCAB];
            row[next as usize] = 10.0;
            rows.extend(row);
        }
        let n = rows.len() / VOCAB;
        Ok(Tensor::from_vec(rows, (n, VOCAB), &Device::Cpu)?)
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
}

/// An engine whose model speaks `script` after any prompt of `prompt_len` tokens.
pub fn script_engine(prompt_len: usize, script: Vec<u32>) -> Engine {
    let model = ScriptModel {
        config: fake_config(512),
        prompt_len,
        script,
    };
    Engine::with_model(args(), Box::new(model), tokenizer()).expect("engine starts")
}

/// Every step gives the same logits: `logits[i]` for token `tokens[i]`, -30 elsewhere.
pub struct FixedModel {
    config: ModelConfig,
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
}

impl FixedModel {
    pub fn row(&self) -> Vec<f32> {
        let mut row = vec![LOW; VOCAB];
        for (&t, &l) in self.tokens.iter().zip(&self.logits) {
            row[t as usize] = l;
        }
        row
    }
}

impl CausalLM for FixedModel {
    fn forward(&self, batch: &ForwardBatch, _kv: &mut PagedKvCache) -> vllm_engine::Result<Tensor> {
        let n = batch.seqs.iter().filter(|s| s.want_logits).count();
        let row = self.row();
        let rows: Vec<f32> = (0..n).flat_map(|_| row.iter().copied()).collect();
        Ok(Tensor::from_vec(rows, (n, VOCAB), &Device::Cpu)?)
    }
    fn config(&self) -> &ModelConfig {
        &self.config
    }
}

pub fn fixed_model(tokens: Vec<u32>, logits: Vec<f32>) -> FixedModel {
    FixedModel {
        config: fake_config(4096),
        tokens,
        logits,
    }
}

pub fn fixed_engine(tokens: Vec<u32>, logits: Vec<f32>) -> Engine {
    let mut a = args();
    a.max_model_len = Some(4096);
    Engine::with_model(a, Box::new(fixed_model(tokens, logits)), tokenizer()).expect("engine starts")
}

/// Pearson's chi-square statistic of `counts` against `probs` (same order).
pub fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let expected = p * n as f64;
            (c as f64 - expected).powi(2) / expected
        })
        .sum()
}

/// Upper 0.001 quantiles of the chi-square distribution, by degrees of freedom (1..=10).
pub const CHI2_CRITICAL_P001: [f64; 10] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
];

pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}
