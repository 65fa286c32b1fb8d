//! Turns a scheduled step into a ForwardBatch, runs the model on it against the paged KV
//! cache, and hands back one row of logits per sequence that reached the end of its
//! known tokens.

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::manager::SeqId;
use crate::kv_cache::paged_cache::LayerKv;
use crate::kv_cache::PagedKvCache;
use crate::lora::{slots::SlotLoad, LoraAdapter, LoraSlots};
use crate::models::{CausalLM, DecodeCaptureLimits, ForwardBatch, SeqSlice};
use crate::scheduler::{Scheduler, SchedulerOutput};
use std::collections::HashSet;
use std::sync::Arc;

/// The KV budget when the caller gives none: room for every sequence at full length,
/// but at most this much.
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

pub struct ModelRunner {
    model: Box<dyn CausalLM>,
    kv: PagedKvCache,
    /// `VLLM_STEP_TIMING=1`: where step time goes, printed to stderr when the runner drops.
    timing: Option<StepTiming>,
    /// Resident LoRA slots when LoRA is enabled.
    lora: Option<LoraSlots>,
    /// Draws of unseeded requests sampled on the device.
    device_draws: rand_chacha::ChaCha8Rng,
    /// What the decode graphs were captured for: they are captured again against a
    /// reallocated KV cache or a reloaded model (wake-up).
    capture_limits: Option<DecodeCaptureLimits>,
    /// False between `release_kv_cache` and `restore_kv_cache`.
    kv_live: bool,
}

#[derive(Default)]
struct StepTiming {
    steps: u64,
    tokens: u64,
    /// Host time to issue the forward pass (on a GPU: launches only).
    forward_s: f64,
    /// Waiting for the device and copying logits (or argmaxes) back.
    fetch_s: f64,
    /// Between one step's end and the next one's start: scheduling, sampling, outputs.
    outside_s: f64,
    last_end: Option<std::time::Instant>,
    /// `VLLM_STEP_LOG=path` (with VLLM_STEP_TIMING): one line per step, written to `path`
    /// when the runner drops: tokens, sequences, decode rows (one query token), longest
    /// context, sum of contexts, forward ms (issue + device wait), ms outside the runner.
    log: Option<(std::path::PathBuf, Vec<String>)>,
}

impl Drop for ModelRunner {
    fn drop(&mut self) {
        if let Some(t) = &self.timing {
            let per = |s: f64| s * 1e3 / t.steps.max(1) as f64;
            eprintln!(
                "step timing: {} steps, {} tokens; per step: forward issue {:.3} ms, device wait + fetch {:.3} ms, outside the runner {:.3} ms",
                t.steps,
                t.tokens,
                per(t.forward_s),
                per(t.fetch_s),
                per(t.outside_s)
            );
            if let Some((path, lines)) = &t.log {
                let text = format!(
                    "# tokens seqs decode_rows max_ctx sum_ctx forward_ms outside_ms\n{}\n",
                    lines.join("\n")
                );
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("VLLM_STEP_LOG: cannot write {}: {e}", path.display());
                }
            }
        }
    }
}

/// Logits of the sequences that sample this step.
pub struct StepLogits {
    pub seq_ids: Vec<SeqId>,
    /// Row i belongs to seq_ids[i]. Empty when `greedy` is given.
    pub rows: Vec<Vec<f32>>,
    /// For sequences that asked for prompt logprobs: the logits at prompt positions
    /// `first..first + rows.len()` (each predicts the prompt token after it).
    pub prompt_rows: Vec<PromptRows>,
    /// On a GPU, when every sampling sequence decodes greedily with nothing that changes
    /// its logits (each row's argmax and largest logit), or when every row qualifies for
    /// the device sampler (each row's pick and its raw logit): computed on the device, so
    /// the rows never cross to the host.
    pub greedy: Option<GreedyRows>,
}

pub struct PromptRows {
    pub seq_id: SeqId,
    pub first: usize,
    pub rows: Vec<Vec<f32>>,
}

pub struct GreedyRows {
    pub token_ids: Vec<u32>,
    pub max_logits: Vec<f32>,
}

impl ModelRunner {
    /// Allocates the model's KV cache (on its device) of `num_blocks` blocks.
    pub fn new(model: Box<dyn CausalLM>, num_blocks: usize, block_size: usize) -> Result<Self> {
        let kv = model.new_kv_cache(num_blocks, block_size)?;
        let timing = std::env::var_os("VLLM_STEP_TIMING").map(|_| StepTiming {
            log: std::env::var_os("VLLM_STEP_LOG").map(|p| (p.into(), Vec::new())),
            ..StepTiming::default()
        });
        Ok(ModelRunner {
            model,
            kv,
            timing,
            lora: None,
            device_draws: unseeded_draws(),
            capture_limits: None,
            kv_live: true,
        })
    }

    /// Bytes of key and value memory the cache holds now (0 after `release_kv_cache`).
    pub fn kv_cache_bytes(&self) -> usize {
        self.kv.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Lets the model capture its decode steps against this runner's KV cache (CUDA graphs).
    pub fn prepare_decode_graphs(&mut self, limits: &DecodeCaptureLimits) -> Result<()> {
        self.capture_limits = Some(*limits);
        self.model.prepare_decode_graphs(limits, &self.kv)
    }

    /// Frees the KV cache memory (sleep), host or device, after dropping the decode graphs
    /// that point into it. The block geometry stays for `restore_kv_cache`.
    pub fn release_kv_cache(&mut self) {
        if let Some(limits) = self.capture_limits {
            // Capturing nothing (enforce_eager) drops the model's graphs; it cannot fail.
            let eager = DecodeCaptureLimits {
                enforce_eager: true,
                ..limits
            };
            let _ = self.model.prepare_decode_graphs(&eager, &self.kv);
        }
        self.kv = self.empty_kv();
        self.kv_live = false;
    }

    /// Reallocates a released KV cache (zeroed) with the geometry it had, where the model
    /// keeps it (its device), and captures the decode graphs against it again.
    pub fn restore_kv_cache(&mut self) -> Result<()> {
        self.kv = self.model.new_kv_cache(self.kv.num_blocks, self.kv.block_size)?;
        self.kv_live = true;
        self.capture_graphs()
    }

    /// After `replace_model` put reloaded weights in (wake-up): a live KV cache made while
    /// the weights were dropped lives on the host; a GPU model gets its own again (the
    /// content is void: sleeping released every request). Then the graphs are captured
    /// for the new model.
    pub fn reattach_kv_cache(&mut self) -> Result<()> {
        if !self.kv_live {
            return Ok(());
        }
        let kv_on_host = !self.kv.layers.is_empty();
        if self.model.samples_on_device() && kv_on_host {
            self.kv = self.empty_kv();
            self.kv = self.model.new_kv_cache(self.kv.num_blocks, self.kv.block_size)?;
        }
        self.capture_graphs()
    }

    fn capture_graphs(&mut self) -> Result<()> {
        match self.capture_limits {
            Some(limits) => self.model.prepare_decode_graphs(&limits, &self.kv),
            None => Ok(()),
        }
    }

    /// A cache of the same geometry holding no memory.
    fn empty_kv(&self) -> PagedKvCache {
        PagedKvCache::new(
            0,
            self.kv.num_blocks,
            self.kv.block_size,
            self.kv.num_kv_heads,
            self.kv.head_dim,
        )
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

    /// Gives the model `max_loras` LoRA slots (`:unsupported` for models without LoRA).
    pub fn enable_lora(&mut self, max_loras: usize) -> Result<()> {
        if !self.model.supports_lora() {
            return Err(EngineError::unsupported(
                "this model architecture does not support LoRA adapters",
            ));
        }
        self.lora = Some(LoraSlots::new(max_loras));
        Ok(())
    }

    pub fn lora_slots(&self) -> Option<&LoraSlots> {
        self.lora.as_ref()
    }

    /// Pins adapter `id` into a slot (see LoraSlots::pin).
    pub fn pin_lora(&mut self, id: u32, adapter: Arc<LoraAdapter>, running: &HashSet<u32>) -> Result<()> {
        let slots = self
            .lora
            .as_mut()
            .ok_or_else(|| EngineError::validation("LoRA is not enabled (enable_lora)"))?;
        let loads = slots.pin(id, adapter, running)?;
        self.apply_lora_loads(loads)
    }

    /// Drops adapter `id` from its slot, if resident.
    pub fn remove_lora(&mut self, id: u32) -> Result<()> {
        let load = self.lora.as_mut().and_then(|s| s.remove(id));
        self.apply_lora_loads(load.into_iter().collect())
    }

    fn apply_lora_loads(&mut self, loads: Vec<SlotLoad>) -> Result<()> {
        for (slot, adapter) in loads {
            self.model.set_lora_slot(slot, adapter)?;
        }
        Ok(())
    }

    /// Swaps the adapters this step's sequences use into slots (LRU).
    fn activate_loras(&mut self, step: &SchedulerOutput, scheduler: &Scheduler) -> Result<()> {
        let Some(slots) = self.lora.as_mut() else { return Ok(()) };
        let mut needed: Vec<(u32, Arc<LoraAdapter>)> = Vec::new();
        for s in &step.scheduled {
            let Some(seq) = scheduler.seq(s.seq_id) else { continue };
            if let (Some(id), Some(adapter)) = (seq.extra_keys.lora_int_id, seq.lora.as_ref()) {
                if !needed.iter().any(|(n, _)| *n == id) {
                    needed.push((id, adapter.clone()));
                }
            }
        }
        let loads = slots.activate(&needed)?;
        self.apply_lora_loads(loads)
    }

    /// Runs one scheduled step. Sequences whose step ends before their last known token
    /// (a prefill chunk) only fill the cache.
    pub fn execute(&mut self, step: &SchedulerOutput, scheduler: &Scheduler) -> Result<StepLogits> {
        self.activate_loras(step, scheduler)?;
        let lora = self.lora.as_ref();
        let (batch, seq_ids) = build_batch(step, scheduler, &|id| lora.and_then(|l| l.slot_of(id)))?;
        if seq_ids.is_empty() && batch.token_ids.is_empty() {
            return Ok(StepLogits {
                seq_ids,
                rows: Vec::new(),
                prompt_rows: Vec::new(),
                greedy: None,
            });
        }
        let started = std::time::Instant::now();
        let expected: usize = batch.seqs.iter().map(|s| s.num_logit_rows()).sum();
        let on_device = device_greedy_enabled() && expected == seq_ids.len();
        let greedy = if on_device && all_plain_greedy(&seq_ids, scheduler) {
            self.model.forward_greedy(&batch, &mut self.kv)?
        } else if on_device && self.model.samples_on_device() {
            // Every row penalised or drawn on the device, or none (see device_sampling).
            match device_rows(&seq_ids, scheduler, &mut self.device_draws) {
                Some(rows) => self.model.forward_sample(&batch, &mut self.kv, &rows)?,
                None => None,
            }
        } else {
            None
        };
        let (issued, result) = match greedy {
            Some((token_ids, max_logits)) => {
                let result = if token_ids.len() == expected {
                    Ok(StepLogits {
                        seq_ids,
                        rows: Vec::new(),
                        prompt_rows: Vec::new(),
                        greedy: Some(GreedyRows { token_ids, max_logits }),
                    })
                } else {
                    Err(EngineError::internal(format!(
                        "model returned {} greedy rows, expected {expected}",
                        token_ids.len()
                    )))
                };
                // Issue and wait are one call here: all of it counts as forward.
                (std::time::Instant::now(), result)
            }
            None => {
                let logits = self.model.forward(&batch, &mut self.kv)?;
                let issued = std::time::Instant::now();
                (issued, fetch(logits, &batch, step, seq_ids, scheduler))
            }
        };
        if let Some(t) = &mut self.timing {
            let end = std::time::Instant::now();
            t.steps += 1;
            t.tokens += batch.token_ids.len() as u64;
            t.forward_s += (issued - started).as_secs_f64();
            t.fetch_s += (end - issued).as_secs_f64();
            let outside = t.last_end.map_or(0.0, |last| (started - last).as_secs_f64());
            t.outside_s += outside;
            t.last_end = Some(end);
            if let Some((_, lines)) = &mut t.log {
                let decode_rows = batch.seqs.iter().filter(|s| s.query_len == 1).count();
                let max_ctx = batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
                let sum_ctx: usize = batch.seqs.iter().map(|s| s.context_len).sum();
                lines.push(format!(
                    "{} {} {decode_rows} {max_ctx} {sum_ctx} {:.4} {:.4}",
                    batch.token_ids.len(),
                    batch.seqs.len(),
                    (end - started).as_secs_f64() * 1e3,
                    outside * 1e3
                ));
            }
        }
        result
    }
}

/// Brings the step's logits to the host (for plain greedy steps on a GPU: only their
/// argmaxes) and splits each seq's rows into prompt positions and the sampling row.
fn fetch(
    logits: candle_core::Tensor,
    batch: &ForwardBatch,
    step: &SchedulerOutput,
    seq_ids: Vec<SeqId>,
    scheduler: &Scheduler,
) -> Result<StepLogits> {
    let expected: usize = batch.seqs.iter().map(|s| s.num_logit_rows()).sum();
    if !logits.device().is_cpu()
        && device_greedy_enabled()
        && expected == seq_ids.len()
        && all_plain_greedy(&seq_ids, scheduler)
    {
        let token_ids = logits.argmax(1)?.to_vec1::<u32>()?;
        let max_logits = logits.max(1)?.to_vec1::<f32>()?;
        if token_ids.len() != expected {
            return Err(EngineError::internal(format!(
                "model returned {} rows of logits, expected {expected}",
                token_ids.len()
            )));
        }
        return Ok(StepLogits {
            seq_ids,
            rows: Vec::new(),
            prompt_rows: Vec::new(),
            greedy: Some(GreedyRows { token_ids, max_logits }),
        });
    }
    let all: Vec<Vec<f32>> = logits.to_vec2::<f32>()?;
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
        greedy: None,
    })
}

/// The device sampler's rows for this step, or None when a row needs the host sampler.
fn device_rows(
    seq_ids: &[SeqId],
    scheduler: &Scheduler,
    unseeded: &mut rand_chacha::ChaCha8Rng,
) -> Option<Vec<crate::device_sampling::DeviceSampleRow>> {
    let seqs: Option<Vec<_>> = seq_ids.iter().map(|&id| scheduler.seq(id)).collect();
    let seqs = seqs?;
    if !seqs.iter().all(|s| crate::device_sampling::qualifies(s)) {
        return None;
    }
    Some(
        seqs.iter()
            .map(|s| crate::device_sampling::row_for(s, unseeded))
            .collect(),
    )
}

/// The generator of unseeded device draws: seeded from the clock (unseeded requests are
/// not reproducible, as on the host where they share the engine's generator).
fn unseeded_draws() -> rand_chacha::ChaCha8Rng {
    use rand_chacha::rand_core::SeedableRng;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    rand_chacha::ChaCha8Rng::seed_from_u64(nanos)
}

/// `VLLM_HOST_SAMPLING=1` turns the device argmax and sampler off (to compare the paths).
fn device_greedy_enabled() -> bool {
    std::env::var_os("VLLM_HOST_SAMPLING").is_none_or(|v| v != "1")
}

/// Whether the host sampler would pick exactly the row's argmax for every sequence.
fn all_plain_greedy(seq_ids: &[SeqId], scheduler: &Scheduler) -> bool {
    seq_ids.iter().all(|&id| scheduler.seq(id).is_some_and(plain_greedy))
}

/// Greedy, no penalties, no logprobs, no suppressed tokens this step, no structured-output
/// mask (the engine core applies it to host rows only: a constrained request must never
/// take the device argmax), and every other field that can touch the logits at its
/// default (new fields are covered by the struct update).
fn plain_greedy(seq: &crate::sequence::Sequence) -> bool {
    let p = &seq.params;
    let plain = crate::request::SamplingParams {
        n: p.n,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        seed: p.seed,
        stop: p.stop.clone(),
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        max_tokens: p.max_tokens,
        min_tokens: p.min_tokens,
        detokenize: p.detokenize,
        skip_special_tokens: p.skip_special_tokens,
        spaces_between_special_tokens: p.spaces_between_special_tokens,
        include_stop_str_in_output: p.include_stop_str_in_output,
        output_kind: p.output_kind,
        ..Default::default()
    };
    // Before min_tokens the core suppresses EOS and stop tokens, which an argmax ignores.
    let nothing_suppressed = seq.num_output_tokens() >= p.min_tokens || (p.ignore_eos && p.stop_token_ids.is_empty());
    p.is_greedy() && p.structured_outputs.is_none() && plain == *p && nothing_suppressed
}

fn build_batch(
    step: &SchedulerOutput,
    scheduler: &Scheduler,
    lora_slot_of: &dyn Fn(u32) -> Option<usize>,
) -> Result<(ForwardBatch, Vec<SeqId>)> {
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
            lora_slot: seq.extra_keys.lora_int_id.and_then(&lora_slot_of),
        });
        batch.token_ids.extend_from_slice(&seq.token_ids[start..end]);
        batch.positions.extend(start..end);
        if want_logits {
            sampling.push(s.seq_id);
        }
    }
    batch.lookahead = scheduler.num_waiting() == 0;
    Ok((batch, sampling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SamplingParams;
    use crate::sequence::Sequence;
    use crate::structured_output::StructuredOutputs;

    fn seq(params: SamplingParams) -> Sequence {
        Sequence::new(0, "r".into(), vec![1, 2, 3], params, 64, 0, 0)
    }

    /// The device argmax (CUDA) serves only rows the host sampler would reduce to an
    /// argmax: a structured-output request, greedy or not, always gets its logits on the
    /// host, where the engine core applies its mask before sampling.
    #[test]
    fn constrained_requests_never_take_the_device_argmax() {
        let greedy = SamplingParams::greedy(8);
        assert!(
            plain_greedy(&seq(greedy.clone())),
            "the control case takes the device path"
        );
        for spec in [
            StructuredOutputs::Json(r#"{"type": "object"}"#.into()),
            StructuredOutputs::Choice(vec!["yes".into(), "no".into()]),
        ] {
            let mut p = greedy.clone();
            p.structured_outputs = Some(spec);
            assert!(!plain_greedy(&seq(p)));
        }
        let mut logprobs = greedy;
        logprobs.logprobs = Some(1);
        assert!(!plain_greedy(&seq(logprobs)));
    }
}
