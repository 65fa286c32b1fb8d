//! The engine-core thread: drains commands, schedules a step, runs it, samples, applies
//! the stop conditions it owns (max_tokens, EOS, stop token ids, context length), frees
//! finished requests' blocks at once, and sends the step's tokens to the output thread.
//! A panic or model error in a step kills the engine, not the process: every request
//! then fails with EngineDead.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};

use crate::engine::EngineStats;
use crate::error::Result;
use crate::kv_cache::manager::SeqId;
use crate::output_processor::OutputMessage;
use crate::request::{FinishReason, SamplingParams, StopReason, TokenLogprob};
use crate::runner::ModelRunner;
use crate::sampler::{prepare_batch, Sample, SampleRow, Sampler};
use crate::scheduler::Scheduler;
use crate::sequence::Sequence;
use crate::structured_output::{apply_mask, Advance, GrammarMatcher};

pub enum CoreCommand {
    Add(Box<NewRequest>),
    /// Forget a request and free its blocks (abort, a stop string, or a gone receiver).
    /// Always answered with `OutputMessage::Released`, even for unknown requests.
    Release(SeqId),
    /// Forget every cached prefix (see Scheduler::reset_prefix_cache); answers whether
    /// it was done.
    ResetPrefixCache {
        reset_running_requests: bool,
        reply: Sender<bool>,
    },
    /// Pin a LoRA adapter into a resident slot (never evicted until removed).
    PinLora {
        id: u32,
        adapter: std::sync::Arc<crate::lora::LoraAdapter>,
        reply: Sender<Result<()>>,
    },
    /// Drop a LoRA adapter from its slot (requests still using it reload it).
    RemoveLora(u32),
    /// Release everything and stop the thread.
    Shutdown,
    /// Sleep, wake up, ping: run between steps and answered on the command's channel.
    Control(crate::control::ControlCommand),
}

pub struct NewRequest {
    pub seq_id: SeqId,
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub priority: i32,
    /// Prefix-cache keys besides the tokens: blocks computed with another LoRA adapter
    /// or under another salt are never shared.
    pub lora_int_id: Option<u32>,
    pub cache_salt: Option<String>,
    /// The weights of adapter `lora_int_id`.
    pub lora: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    /// The compiled structured-output constraint, when the request has one.
    pub grammar: Option<Box<GrammarMatcher>>,
}

/// One token sampled for one request in one step.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub seq_id: SeqId,
    pub token_id: u32,
    pub logprob: f32,
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Set when the core finished the request with this token (its blocks are already free).
    pub finish: Option<(FinishReason, Option<StopReason>)>,
    /// When the request was first scheduled (seconds since the Unix epoch).
    pub first_scheduled_time: Option<f64>,
    /// Prompt tokens found in the prefix cache when the request was first admitted.
    pub num_cached_tokens: usize,
}

/// State the client side reads without talking to the core thread.
#[derive(Default)]
pub struct CoreShared {
    pub stats: Mutex<EngineStats>,
    pub dead: AtomicBool,
    /// Requests preempted by recompute since start-up.
    pub preemptions: AtomicU64,
    /// LoRA adapters swapped into a slot, and swapped out to make room, since start-up.
    pub lora_loads: AtomicU64,
    pub lora_evictions: AtomicU64,
    /// Step phases, recorded while a profile runs.
    pub profiler: crate::profiler::Profiler,
    /// Weights and KV cache bytes, published by the core after every change.
    pub memory: Mutex<crate::control::MemoryUsage>,
    /// Called once, with the reason, when the engine dies of an internal error (see
    /// `Engine::on_death`).
    pub death_listeners: Mutex<Vec<DeathListener>>,
}

/// Hears why the engine died (the NIF sends it to the engine process).
pub type DeathListener = Box<dyn FnOnce(&str) + Send>;

impl CoreShared {
    /// Tells every death listener why the engine died (each hears once). Call it after
    /// setting `dead` and failing the requests.
    pub fn notify_death(&self, why: &str) {
        let listeners = match self.death_listeners.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(_) => return,
        };
        for listener in listeners {
            let _ = catch_unwind(AssertUnwindSafe(|| listener(why)));
        }
    }
}

pub struct EngineCore {
    pub scheduler: Scheduler,
    pub runner: ModelRunner,
    pub sampler: Sampler,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    pub commands: Receiver<CoreCommand>,
    pub outputs: Sender<OutputMessage>,
    pub shared: std::sync::Arc<CoreShared>,
    /// Sleep state and what waking up needs.
    pub control: crate::control::SleepState,
    next_arrival: u64,
    /// Prompt tokens of requests that produced their first token, since start-up.
    prompt_tokens_total: u64,
    /// Tokens sampled since start-up.
    generation_tokens_total: u64,
}

enum Flow {
    Continue,
    Exit,
}

impl EngineCore {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scheduler: Scheduler,
        runner: ModelRunner,
        sampler: Sampler,
        eos_token_ids: Vec<u32>,
        max_model_len: usize,
        commands: Receiver<CoreCommand>,
        outputs: Sender<OutputMessage>,
        shared: std::sync::Arc<CoreShared>,
    ) -> Self {
        EngineCore {
            scheduler,
            runner,
            sampler,
            eos_token_ids,
            max_model_len,
            commands,
            outputs,
            shared,
            control: Default::default(),
            next_arrival: 0,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
        }
    }

    /// The thread body. Any panic in it (a step, a command) kills the engine cleanly.
    pub fn run(mut self) {
        match catch_unwind(AssertUnwindSafe(|| self.serve())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.die(format!("engine step failed: {e}")),
            Err(panic) => self.die(format!("engine step panicked: {}", panic_message(&panic))),
        }
    }

    /// Blocks on the channel when idle; otherwise drains it, then steps.
    fn serve(&mut self) -> Result<()> {
        self.publish_stats();
        let mut idle = true;
        loop {
            if idle || !self.scheduler.has_work() {
                match self.commands.recv() {
                    Ok(cmd) => {
                        if let Flow::Exit = self.handle(cmd) {
                            return Ok(());
                        }
                    }
                    Err(_) => {
                        self.release_all();
                        return Ok(());
                    }
                }
            }
            while let Ok(cmd) = self.commands.try_recv() {
                if let Flow::Exit = self.handle(cmd) {
                    return Ok(());
                }
            }
            self.publish_stats();
            // Nothing could be scheduled: wait for a command rather than spin.
            idle = !self.scheduler.has_work() || self.control.is_asleep() || !self.step()?;
        }
    }

    fn handle(&mut self, cmd: CoreCommand) -> Flow {
        match cmd {
            CoreCommand::Add(req) => {
                let req = *req;
                let arrival = self.next_arrival;
                self.next_arrival += 1;
                let mut seq = Sequence::new(
                    req.seq_id,
                    req.request_id,
                    req.prompt_token_ids,
                    req.params,
                    self.max_model_len,
                    req.priority,
                    arrival,
                )
                .with_extra_keys(req.lora_int_id, req.cache_salt)
                .with_lora(req.lora);
                seq.grammar = req.grammar;
                self.scheduler.add(seq);
                Flow::Continue
            }
            CoreCommand::Release(id) => {
                self.scheduler.remove(id);
                // Stats first, so a caller that sees the final output sees the blocks free.
                self.publish_stats();
                let _ = self.outputs.send(OutputMessage::Released(id));
                Flow::Continue
            }
            CoreCommand::ResetPrefixCache {
                reset_running_requests,
                reply,
            } => {
                let done = self.scheduler.reset_prefix_cache(reset_running_requests);
                if !done {
                    tracing::warn!("prefix cache not reset: requests still hold KV blocks");
                }
                self.publish_stats();
                let _ = reply.send(done);
                Flow::Continue
            }
            CoreCommand::PinLora { id, adapter, reply } => {
                let running = self.scheduler.running_loras();
                let result = self.runner.pin_lora(id, adapter, &running);
                self.sync_lora_state();
                let _ = reply.send(result);
                Flow::Continue
            }
            CoreCommand::RemoveLora(id) => {
                if let Err(e) = self.runner.remove_lora(id) {
                    tracing::warn!("removing LoRA {id}: {e}");
                }
                self.sync_lora_state();
                Flow::Continue
            }
            CoreCommand::Shutdown => {
                self.release_all();
                Flow::Exit
            }
            CoreCommand::Control(cmd) => {
                self.handle_control(cmd);
                Flow::Continue
            }
        }
    }

    pub(crate) fn release_all(&mut self) {
        let ids = self.scheduler.seq_ids();
        for id in &ids {
            self.scheduler.remove(*id);
        }
        self.publish_stats();
        for id in ids {
            let _ = self.outputs.send(OutputMessage::Released(id));
        }
    }

    /// One forward pass over what the scheduler picked. Returns false when nothing ran.
    fn step(&mut self) -> Result<bool> {
        let profiler = &self.shared.profiler;
        let started = profiler.begin();
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            return Ok(false);
        }
        let num_tokens: usize = plan.scheduled.iter().map(|s| s.num_new_tokens).sum();
        let batch_args = [
            ("num_seqs", plan.scheduled.len() as u64),
            ("num_tokens", num_tokens as u64),
        ];
        profiler.record("schedule", crate::profiler::CORE_THREAD, started, &batch_args);
        let now = crate::request::unix_seconds(std::time::SystemTime::now());
        for s in &plan.scheduled {
            if let Some(seq) = self.scheduler.seq_mut(s.seq_id) {
                seq.first_scheduled_time.get_or_insert(now);
            }
        }
        // Constrained sequences' masks depend only on tokens already sampled: compute
        // them while the forward pass runs, as a task of the same rayon pool (an idle
        // worker takes it; no extra thread competes with the matmul threads).
        let mut grammars = self.take_sampling_grammars(&plan);
        let started = self.shared.profiler.begin();
        let (logits, masks) = if grammars.is_empty() {
            (self.runner.execute(&plan, &self.scheduler), Vec::new())
        } else {
            let runner = &mut self.runner;
            let scheduler = &self.scheduler;
            let mut masks = Vec::new();
            let logits = rayon::in_place_scope(|scope| {
                scope.spawn(|_| masks = crate::structured_output::compute_masks(&mut grammars));
                runner.execute(&plan, scheduler)
            });
            (logits, masks)
        };
        self.shared
            .profiler
            .record("forward", crate::profiler::CORE_THREAD, started, &batch_args);
        let sampling_started = self.shared.profiler.begin();
        let masks: std::collections::HashMap<SeqId, _> = masks.into_iter().collect();
        for (id, grammar) in grammars {
            if let Some(seq) = self.scheduler.seq_mut(id) {
                seq.grammar = Some(grammar);
            }
        }
        let mut logits = logits?;
        for (id, row) in logits.seq_ids.iter().zip(logits.rows.iter_mut()) {
            if let Some(mask) = masks.get(id) {
                apply_mask(row, mask);
            }
        }
        for s in &plan.scheduled {
            if let Some(seq) = self.scheduler.seq_mut(s.seq_id) {
                seq.num_computed_tokens += s.num_new_tokens;
            }
        }
        self.send_prompt_logprobs(&logits.prompt_rows);
        let samples: Vec<(SeqId, Sample)> = match &logits.greedy {
            // Picked on the device: the argmax when every row is plain greedy, or the
            // device sampler when every row qualifies for it (device_sampling.rs).
            Some(g) => logits
                .seq_ids
                .iter()
                .zip(g.token_ids.iter().zip(&g.max_logits))
                .map(|(&id, (&token_id, &logprob))| {
                    let sample = Sample {
                        token_id,
                        logprob,
                        logprobs: None,
                    };
                    (id, sample)
                })
                .collect(),
            None => self.sample_rows(&logits),
        };
        let mut events = Vec::with_capacity(samples.len());
        for (id, sample) in samples {
            let Some(seq) = self.scheduler.seq_mut(id) else {
                continue;
            };
            seq.token_ids.push(sample.token_id);
            self.generation_tokens_total += 1;
            if seq.num_output_tokens() == 1 {
                self.prompt_tokens_total += seq.num_prompt_tokens as u64;
            }
            let mut finish = check_stop(seq, &self.eos_token_ids, self.max_model_len);
            if finish.is_none() {
                finish = advance_grammar(seq, sample.token_id);
            }
            events.push(TokenEvent {
                seq_id: id,
                token_id: sample.token_id,
                logprob: sample.logprob,
                logprobs: sample.logprobs,
                finish,
                first_scheduled_time: seq.first_scheduled_time,
                num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
            });
        }
        self.shared.profiler.record(
            "sample",
            crate::profiler::CORE_THREAD,
            sampling_started,
            &[("num_seqs", events.len() as u64)],
        );
        for e in &events {
            if e.finish.is_some() {
                self.scheduler.remove(e.seq_id);
            }
        }
        self.publish_stats();
        if !events.is_empty() {
            let _ = self.outputs.send(OutputMessage::Step(events));
        }
        Ok(true)
    }

    /// Takes the grammars of the constrained sequences that sample at the end of this
    /// step (their last known token is scheduled); the caller puts them back.
    fn take_sampling_grammars(
        &mut self,
        plan: &crate::scheduler::SchedulerOutput,
    ) -> Vec<(SeqId, Box<GrammarMatcher>)> {
        let mut taken = Vec::new();
        for s in &plan.scheduled {
            let Some(seq) = self.scheduler.seq_mut(s.seq_id) else {
                continue;
            };
            if seq.grammar.is_some() && seq.num_computed_tokens + s.num_new_tokens >= seq.num_tokens() {
                if let Some(g) = seq.grammar.take() {
                    taken.push((s.seq_id, g));
                }
            }
        }
        taken
    }

    /// Logprobs of the prompt tokens this step computed, to the output thread (before the
    /// step's tokens, so a request's final output always has them).
    fn send_prompt_logprobs(&self, prompt_rows: &[crate::runner::PromptRows]) {
        for p in prompt_rows {
            let Some(seq) = self.scheduler.seq(p.seq_id) else {
                continue;
            };
            let Some(k) = seq.params.prompt_logprobs else { continue };
            let entries = p
                .rows
                .iter()
                .enumerate()
                .filter_map(|(j, row)| {
                    let token = *seq.token_ids.get(p.first + j + 1)?;
                    Some(crate::sampler::token_logprobs(row, token, k))
                })
                .collect();
            let _ = self.outputs.send(OutputMessage::PromptLogprobs {
                seq_id: p.seq_id,
                first: p.first + 1,
                entries,
            });
        }
    }

    /// Samples every row on the host: all but the random draws over the whole batch at
    /// once (rows in parallel); the draws then go row by row, so unseeded requests share
    /// the engine's generator in a fixed order.
    fn sample_rows(&mut self, logits: &crate::runner::StepLogits) -> Vec<(SeqId, Sample)> {
        let rows: Vec<(SeqId, &Vec<f32>, Vec<u32>)> = logits
            .seq_ids
            .iter()
            .zip(&logits.rows)
            .filter_map(|(&id, row)| {
                let seq = self.scheduler.seq(id)?;
                Some((id, row, suppressed_tokens(seq, &self.eos_token_ids)))
            })
            .collect();
        let prepared = {
            let inputs: Vec<SampleRow> = rows
                .iter()
                .filter_map(|(id, row, suppressed)| {
                    let seq = self.scheduler.seq(*id)?;
                    Some(SampleRow {
                        logits: row,
                        params: &seq.params,
                        context: &seq.token_ids,
                        num_prompt_tokens: seq.num_prompt_tokens,
                        suppressed,
                    })
                })
                .collect();
            prepare_batch(&inputs)
        };
        let mut samples = Vec::with_capacity(rows.len());
        for ((id, row, _), prepared) in rows.iter().zip(prepared) {
            let Some(seq) = self.scheduler.seq_mut(*id) else {
                continue;
            };
            samples.push((*id, self.sampler.draw(row, &seq.params, prepared, seq.rng.as_mut())));
        }
        samples
    }

    /// Tells the scheduler which adapters are pinned, and the client the slot counters.
    /// Before a pin's reply: `Engine::lora_swaps` then already counts its load.
    fn sync_lora_state(&mut self) {
        if let Some(slots) = self.runner.lora_slots() {
            self.scheduler.set_pinned_loras(slots.pinned().clone());
        }
        self.publish_lora_counters();
    }

    fn publish_lora_counters(&self) {
        if let Some(slots) = self.runner.lora_slots() {
            self.shared.lora_loads.store(slots.loads, Ordering::Relaxed);
            self.shared.lora_evictions.store(slots.evictions, Ordering::Relaxed);
        }
    }

    fn publish_stats(&self) {
        self.publish_lora_counters();
        let kv = self.scheduler.kv();
        let prefix = kv.prefix_cache_stats();
        let num_preemptions = self.scheduler.num_preemptions();
        self.shared.preemptions.store(num_preemptions, Ordering::Relaxed);
        let stats = EngineStats {
            total_blocks: kv.num_blocks(),
            free_blocks: kv.num_free_blocks(),
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: kv.usage(),
            prefix_cache_requests: prefix.requests,
            prefix_cache_queries: prefix.queries,
            prefix_cache_hits: prefix.hits,
            prompt_tokens_total: self.prompt_tokens_total,
            generation_tokens_total: self.generation_tokens_total,
            num_preemptions,
        };
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = stats;
        }
    }

    fn die(&mut self, message: String) {
        tracing::error!("{message}");
        self.shared.dead.store(true, Ordering::SeqCst);
        let _ = self.outputs.send(OutputMessage::Dead(message.clone()));
        self.shared.notify_death(&message);
    }
}

/// Feeds a sampled token to a constrained sequence's grammar. A complete grammar leaves
/// only EOS in the next mask, so the request ends on EOS (finish_reason stop) as in vLLM;
/// a token the grammar rejects (which the mask should have prevented) ends it at once.
fn advance_grammar(seq: &mut Sequence, token: u32) -> Option<(FinishReason, Option<StopReason>)> {
    let grammar = seq.grammar.as_mut()?;
    match grammar.advance(token) {
        Advance::Continue | Advance::Finished => None,
        Advance::Rejected(e) => {
            tracing::warn!("request {}: structured output ended early: {e}", seq.request_id);
            Some((FinishReason::Stop, None))
        }
    }
}

/// Tokens a sequence may not sample yet: EOS (unless ignored) and its stop tokens, until
/// it has min_tokens outputs.
fn suppressed_tokens(seq: &Sequence, eos_token_ids: &[u32]) -> Vec<u32> {
    if seq.num_output_tokens() >= seq.params.min_tokens {
        return Vec::new();
    }
    let eos: &[u32] = if seq.params.ignore_eos { &[] } else { eos_token_ids };
    [eos, &seq.params.stop_token_ids].concat()
}

/// vLLM's order: length first, then (past min_tokens) EOS, then stop token ids.
fn check_stop(
    seq: &Sequence,
    eos_token_ids: &[u32],
    max_model_len: usize,
) -> Option<(FinishReason, Option<StopReason>)> {
    if seq.num_tokens() >= max_model_len || seq.num_output_tokens() >= seq.max_output_tokens {
        return Some((FinishReason::Length, None));
    }
    if seq.num_output_tokens() < seq.params.min_tokens {
        return None;
    }
    let last = *seq.token_ids.last()?;
    if !seq.params.ignore_eos && eos_token_ids.contains(&last) {
        return Some((FinishReason::Stop, None));
    }
    if seq.params.stop_token_ids.contains(&last) {
        return Some((FinishReason::Stop, Some(StopReason::Token(last))));
    }
    None
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
