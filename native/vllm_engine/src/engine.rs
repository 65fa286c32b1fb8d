//! The client side of the engine: validates and registers requests, sends commands to the
//! engine-core thread, and routes each request's outputs to its sink (through the output
//! thread). Engine is Send + Sync: the NIF shares one between BEAM processes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};

use crate::batch_size::BatchSize;
use crate::config::{Device, EngineArgs, ModelConfig};
use crate::control::{ControlCommand, ControlOp, ControlReply, MemoryUsage};
use crate::engine_core::{CoreCommand, CoreShared, EngineCore, NewRequest};
use crate::error::{EngineError, Result};
use crate::kv_cache::manager::SeqId;
use crate::kv_cache::KvCacheManager;
use crate::lora::{LoRARequest, LoraInfo, LoraRegistry};
use crate::models::encoder::{EncoderConfig, EncoderModel, Runner};
use crate::models::CausalLM;
use crate::output_processor::{LiveRequests, OutputMessage, OutputProcessor, RequestStream};
use crate::pooling_core::{
    self, PoolingCommand, PoolingCore, PoolingLimits, PoolingRequest, PoolingSender, PoolingSink,
};
use crate::profiler::ProfileSummary;
use crate::request::{EngineRequest, RequestOutput, SamplingParams};
use crate::runner::{ModelRunner, DEFAULT_KV_CACHE_BYTES};
use crate::sampler::Sampler;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::structured_output::StructuredOutputCompiler;
use crate::tokenizer::Tokenizer;

/// Where a request's outputs go (the NIF implements it with a message to a pid).
pub trait OutputSink: Send {
    /// Delivers one output. Returns false when the receiver is gone: the engine then
    /// aborts the request and frees its blocks.
    fn send(&mut self, output: RequestOutput) -> bool;
    /// The request cannot finish because the engine died (category EngineDead) or failed
    /// on it; no other output follows.
    fn fail(&mut self, error: EngineError);
}

/// A snapshot of the engine core (vLLM's scheduler stats). Counters run since start-up:
/// a caller computes throughput from two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub total_blocks: usize,
    /// Blocks no request holds (cached blocks waiting for reuse included).
    pub free_blocks: usize,
    pub num_running: usize,
    pub num_waiting: usize,
    /// Fraction of KV blocks held by requests, 0..=1.
    pub kv_cache_usage: f64,
    /// Requests looked up in the prefix cache on their first admission.
    pub prefix_cache_requests: u64,
    /// Prompt tokens looked up, and of those found cached.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens_total: u64,
    /// Output tokens sampled.
    pub generation_tokens_total: u64,
    /// Requests preempted by recompute (the KV cache ran out, or priority).
    pub num_preemptions: u64,
}

impl EngineStats {
    /// Fraction of looked-up prompt tokens found in the prefix cache (0 before any lookup).
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        if self.prefix_cache_queries == 0 {
            0.0
        } else {
            self.prefix_cache_hits as f64 / self.prefix_cache_queries as f64
        }
    }
}

/// Limits the engine settled on at start-up (from EngineArgs and the model).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
}

/// Longest wait for sleep / wake-up (a level-2 wake-up reloads the weights from disk).
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub struct Engine {
    core_tx: Sender<CoreCommand>,
    out_tx: Sender<OutputMessage>,
    shared: Arc<CoreShared>,
    /// Also the lock that orders add/abort/shutdown commands on the channels.
    live: LiveRequests,
    closed: AtomicBool,
    next_seq_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    tokenizer: Arc<Tokenizer>,
    /// The decoder's shape; None for a pooling model.
    config: Option<ModelConfig>,
    limits: EngineLimits,
    /// Added LoRA adapters (None: enable_lora off).
    loras: Option<Mutex<LoraRegistry>>,
    max_loras: usize,
    /// Compiles structured-output constraints (lazily builds the token trie).
    structured: StructuredOutputCompiler,
    /// Set for a pooling model: its core thread takes every request, and the generation
    /// channels above lead nowhere (generation requests are refused before using them).
    pooling: Option<PoolingSide>,
    /// The previous do_log_stats snapshot (for throughput over the interval).
    last_logged: Mutex<Option<(std::time::Instant, EngineStats)>>,
    /// Live requests admitted at most: max_num_seqs + max_waiting_requests (None: no limit).
    max_live_requests: Option<usize>,
}

/// The pooling engine's handle: its command channel and the encoder's description.
struct PoolingSide {
    tx: PoolingSender,
    config: EncoderConfig,
}

impl Engine {
    /// Loads the model and starts the engine threads. Slow: call it off the BEAM schedulers.
    /// `args.runner` "auto" picks generation or pooling from the model (loader::detect_runner).
    pub fn new(args: EngineArgs) -> Result<Engine> {
        args.validate()?;
        let runner = match args.runner.as_str() {
            "auto" => crate::loader::detect_runner(&args.model)?,
            "generate" => Runner::Generate,
            "pooling" => Runner::Pooling,
            other => {
                return Err(EngineError::validation(format!(
                    "runner must be \"auto\", \"generate\" or \"pooling\", got {other:?}"
                )))
            }
        };
        if runner == Runner::Pooling {
            let (model, _config) = crate::loader::load_encoder(&args)?;
            let source = args.tokenizer.clone().unwrap_or_else(|| args.model.clone());
            let tokenizer = Tokenizer::from_file(&source)?;
            return Engine::with_encoder(args, model, tokenizer);
        }
        let loaded = crate::loader::load(&args)?;
        Engine::with_model(args, loaded.model, loaded.tokenizer)
    }

    /// Starts the engine threads over an already loaded model.
    pub fn with_model(args: EngineArgs, model: Box<dyn CausalLM>, tokenizer: Tokenizer) -> Result<Engine> {
        args.validate()?;
        let config = model.config().clone();
        let limits = resolve_limits(&args, &config, &tokenizer, model.as_ref())?;

        let (core_tx, core_rx) = unbounded();
        let (out_tx, out_rx) = unbounded();
        let shared = Arc::new(CoreShared::default());
        // Exact from the first call, before the core thread publishes anything.
        if let Ok(mut stats) = shared.stats.lock() {
            *stats = EngineStats {
                total_blocks: limits.num_blocks,
                free_blocks: limits.num_blocks,
                ..Default::default()
            };
        }
        let live: LiveRequests = Arc::new(Mutex::new(HashMap::new()));
        let tokenizer = Arc::new(tokenizer);

        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: limits.max_num_seqs,
                max_num_batched_tokens: limits.max_num_batched_tokens,
                enable_chunked_prefill: args.enable_chunked_prefill,
                policy: args.scheduling_policy,
            },
            KvCacheManager::new(limits.num_blocks, limits.block_size).with_prefix_caching(args.enable_prefix_caching),
        );
        let mut scheduler = scheduler;
        // Captured decode graphs launch each greedy step ahead (backend/cuda/graphs.rs).
        if model.samples_on_device() && !args.enforce_eager {
            scheduler.set_lookahead_slots(1);
        }
        let mut runner = ModelRunner::new(model, limits.num_blocks, limits.block_size)?;
        runner.prepare_decode_graphs(&crate::models::DecodeCaptureLimits {
            max_num_seqs: limits.max_num_seqs,
            max_model_len: limits.max_model_len,
            block_size: limits.block_size,
            num_blocks: limits.num_blocks,
            enforce_eager: args.enforce_eager,
            max_loras: if args.enable_lora { args.max_loras } else { 0 },
            max_lora_rank: args.max_lora_rank,
        })?;
        let loras = if args.enable_lora {
            runner.enable_lora(args.max_loras)?;
            scheduler.set_lora_limit(Some(args.max_loras));
            Some(Mutex::new(LoraRegistry::new(
                args.max_lora_rank,
                args.max_cpu_loras.unwrap_or(args.max_loras),
            )))
        } else {
            None
        };
        let mut core = EngineCore::new(
            scheduler,
            runner,
            Sampler::new(args.seed),
            limits.eos_token_ids.clone(),
            limits.max_model_len,
            core_rx,
            out_tx.clone(),
            shared.clone(),
        );
        // Level-2 sleep drops the weights; waking reloads them from the same files.
        core.control.reload_args = Some(args.clone());
        core.publish_memory();
        let output = OutputProcessor::new(tokenizer.clone(), out_rx, core_tx.clone(), live.clone(), shared.clone());

        let spawn_err = |e: std::io::Error| EngineError::internal(format!("cannot start engine thread: {e}"));
        let pool = compute_pool(args.num_threads, &args.device)?;
        let core_thread = std::thread::Builder::new()
            .name("vllm-engine-core".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(|| core.run()),
                None => core.run(),
            });
        let core_thread = core_thread.map_err(spawn_err)?;
        let output_thread = std::thread::Builder::new()
            .name("vllm-output".into())
            .spawn(move || output.run());
        let output_thread = match output_thread {
            Ok(t) => t,
            Err(e) => {
                let _ = core_tx.send(CoreCommand::Shutdown);
                let _ = core_thread.join();
                return Err(spawn_err(e));
            }
        };
        let max_live_requests = max_live_requests(&args, &limits);
        Ok(Engine {
            core_tx,
            out_tx,
            shared,
            live,
            closed: AtomicBool::new(false),
            next_seq_id: AtomicU64::new(0),
            threads: Mutex::new(vec![core_thread, output_thread]),
            tokenizer: tokenizer.clone(),
            config: Some(config),
            structured: StructuredOutputCompiler::new(
                tokenizer.clone(),
                limits.vocab_size,
                limits.eos_token_ids.first().copied(),
            ),
            limits,
            loras,
            max_loras: args.max_loras,
            pooling: None,
            last_logged: Mutex::new(None),
            max_live_requests,
        })
    }

    /// Starts a pooling engine over a loaded encoder: one core thread batching whole
    /// sequences (prefill only); no KV cache.
    pub fn with_encoder(args: EngineArgs, model: Box<dyn EncoderModel>, mut tokenizer: Tokenizer) -> Result<Engine> {
        args.validate()?;
        let config = model.config().clone();
        let max_model_len = args.max_model_len.unwrap_or(config.max_position_embeddings);
        if max_model_len > config.max_position_embeddings {
            return Err(EngineError::validation(format!(
                "max_model_len {max_model_len} exceeds the model's max_position_embeddings {}",
                config.max_position_embeddings
            )));
        }
        // Text inputs are cut to what the model can see (sentence-transformers truncates too).
        tokenizer.set_truncation(Some(max_model_len))?;
        let limits = EngineLimits {
            max_model_len,
            max_num_seqs: args.max_num_seqs.unwrap_or(BatchSize::DEFAULT.max_num_seqs),
            max_num_batched_tokens: args.max_num_batched_tokens.unwrap_or(max_model_len.max(8192)),
            block_size: args.block_size,
            num_blocks: 0,
            vocab_size: config.vocab_size,
            eos_token_ids: Vec::new(),
        };
        let (tx, rx) = unbounded();
        let shared = Arc::new(CoreShared::default());
        let core = PoolingCore::new(
            model,
            PoolingLimits {
                max_num_seqs: limits.max_num_seqs,
                max_num_batched_tokens: limits.max_num_batched_tokens,
            },
            rx,
            shared.clone(),
        );
        let pool = compute_pool(args.num_threads, &args.device)?;
        let thread = std::thread::Builder::new()
            .name("vllm-pooling-core".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(|| core.run()),
                None => core.run(),
            })
            .map_err(|e| EngineError::internal(format!("cannot start engine thread: {e}")))?;
        // Generation channels with no receiver: never used, refused up front.
        let (core_tx, _) = unbounded();
        let (out_tx, _) = unbounded();
        let tokenizer = Arc::new(tokenizer);
        tracing::info!(
            "pooling model {} ({} tasks)",
            config.architecture,
            config.supported_tasks().join(", ")
        );
        let max_live_requests = max_live_requests(&args, &limits);
        Ok(Engine {
            core_tx,
            out_tx,
            shared,
            live: Arc::new(Mutex::new(HashMap::new())),
            closed: AtomicBool::new(false),
            next_seq_id: AtomicU64::new(0),
            threads: Mutex::new(vec![thread]),
            structured: StructuredOutputCompiler::new(tokenizer.clone(), limits.vocab_size, None),
            tokenizer,
            config: None,
            limits,
            loras: None,
            max_loras: 0,
            pooling: Some(PoolingSide { tx, config }),
            last_logged: Mutex::new(None),
            max_live_requests,
        })
    }

    /// The tasks the loaded model serves (vLLM's get_supported_tasks): ["generate"] for a
    /// decoder; "encode", "embed" (or "classify", "score" with a head) for an encoder.
    pub fn supported_tasks(&self) -> Vec<String> {
        match &self.pooling {
            Some(p) => p.config.supported_tasks().into_iter().map(String::from).collect(),
            None => vec!["generate".to_string()],
        }
    }

    /// The encoder's description; None for a generation model.
    pub fn encoder_config(&self) -> Option<&EncoderConfig> {
        self.pooling.as_ref().map(|p| &p.config)
    }

    /// Queues a pooling request; its one output (or failure) goes to `sink`. A generation
    /// model, or a task the model lacks, is `:unsupported`; bad ids or lengths `:validation`.
    pub fn encode(&self, request: PoolingRequest, sink: Box<dyn PoolingSink>) -> Result<()> {
        let Some(pooling) = &self.pooling else {
            return Err(EngineError::unsupported(format!(
                "the {:?} task needs a pooling model; this model only supports \"generate\"",
                request.task.as_str()
            )));
        };
        request.params.validate()?;
        pooling_core::validate(&pooling.config, self.limits.max_model_len, &request)?;
        let _live = self
            .live
            .lock()
            .map_err(|_| EngineError::internal("engine registry poisoned"))?;
        self.check_alive()?;
        pooling
            .tx
            .send(PoolingCommand::Add(Box::new((request, sink))))
            .map_err(|_| EngineError::engine_dead("the pooling core has stopped"))
    }

    /// The token ids and segment ids of a text pair as a cross-encoder sees it
    /// ([CLS] a [SEP] b [SEP], types 0 then 1), cut to the context length.
    pub fn tokenize_pair(&self, text_a: &str, text_b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        self.tokenizer.encode_pair(text_a, text_b)
    }

    fn refuse_generation(&self) -> Result<()> {
        match &self.pooling {
            Some(p) => Err(EngineError::unsupported(format!(
                "the \"generate\" task is not supported by this pooling model (supported: {})",
                p.config.supported_tasks().join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Queues a request; its outputs go to `sink`. Duplicate live request ids, empty
    /// prompts, out-of-vocabulary ids and too-long prompts are `:validation` errors; a
    /// request that could never fit in the KV cache is `:resource_exhausted`.
    pub fn add_request(&self, request: EngineRequest, sink: Box<dyn OutputSink>) -> Result<()> {
        self.refuse_generation()?;
        let request = self.prepare(request)?;
        self.validate(&request)?;
        let lora = match &request.lora {
            Some(req) => {
                let mut registry = self.lora_registry()?;
                let adapter = registry.get_or_load(req, self.generation_config()?)?.0;
                registry.check_runnable(req.lora_int_id, self.max_loras)?;
                Some(adapter)
            }
            None => None,
        };
        // Compiled now, so a bad schema, regex or grammar fails the request here.
        let grammar = match &request.params.structured_outputs {
            Some(spec) => Some(self.structured.compile(spec)?),
            None => None,
        };
        let mut live = self
            .live
            .lock()
            .map_err(|_| EngineError::internal("engine registry poisoned"))?;
        self.check_alive()?;
        if live.contains_key(&request.request_id) {
            return Err(EngineError::validation(format!(
                "request id {:?} is already in use by a running request",
                request.request_id
            )));
        }
        if let Some(limit) = self.max_live_requests.filter(|&limit| live.len() >= limit) {
            return Err(EngineError::resource_exhausted(format!(
                "{limit} requests are already in flight (max_num_seqs {} + max_waiting_requests {}): retry later",
                self.limits.max_num_seqs,
                limit - self.limits.max_num_seqs
            )));
        }
        // n > 1 fans out into n child sequences (as vLLM V1's ParentRequest); the output
        // thread gathers them back into one RequestOutput whose outputs carry `index`.
        let n = request.params.n;
        let first = self.next_seq_id.fetch_add(n as u64, Ordering::Relaxed);
        let seq_ids: Vec<SeqId> = (first..first + n as u64).collect();
        live.insert(request.request_id.clone(), seq_ids.clone());
        let stream = RequestStream {
            seq_ids: seq_ids.clone(),
            request_id: request.request_id.clone(),
            prompt: request.prompt,
            prompt_token_ids: request.prompt_token_ids.clone(),
            params: request.params.clone(),
            arrival_time: request.arrival_time,
            sink,
            lora: request.lora.clone(),
        };
        // The output thread learns of the request before the core can produce tokens for it.
        // If either thread is gone, the output thread (or its shutdown) fails the sink.
        let _ = self.out_tx.send(OutputMessage::Register(Box::new(stream)));
        for (index, &seq_id) in seq_ids.iter().enumerate() {
            let _ = self.core_tx.send(CoreCommand::Add(Box::new(NewRequest {
                seq_id,
                request_id: request.request_id.clone(),
                prompt_token_ids: request.prompt_token_ids.clone(),
                params: child_params(&request.params, index),
                priority: request.priority,
                lora_int_id: request.lora.as_ref().map(|l| l.lora_int_id),
                cache_salt: None,
                lora: lora.clone(),
                grammar: grammar.as_ref().map(|g| Box::new(g.fork())),
            })));
        }
        Ok(())
    }

    fn lora_registry(&self) -> Result<std::sync::MutexGuard<'_, LoraRegistry>> {
        let registry = self
            .loras
            .as_ref()
            .ok_or_else(|| EngineError::validation("LoRA adapters need an engine started with enable_lora"))?;
        registry
            .lock()
            .map_err(|_| EngineError::internal("LoRA registry poisoned"))
    }

    /// Loads and registers an adapter. Ok(false): that id is already added with that path.
    /// Missing directory: `:not_found`; rank above max_lora_rank, a target the model
    /// lacks, bad shapes, an id already used for another path: `:validation`.
    pub fn add_lora(&self, request: LoRARequest) -> Result<bool> {
        self.check_alive()?;
        Ok(self
            .lora_registry()?
            .get_or_load(&request, self.generation_config()?)?
            .1)
    }

    /// Forgets an adapter (running requests keep theirs). Ok(false): it was not added.
    pub fn remove_lora(&self, lora_int_id: u32) -> Result<bool> {
        let removed = self.lora_registry()?.remove(lora_int_id);
        if removed {
            let _ = self.core_tx.send(CoreCommand::RemoveLora(lora_int_id));
        }
        Ok(removed)
    }

    /// Keeps an added adapter resident in a slot until removed. Unknown id: `:not_found`;
    /// more pinned (and running) adapters than max_loras: `:validation`.
    pub fn pin_lora(&self, lora_int_id: u32) -> Result<bool> {
        self.check_alive()?;
        let adapter = self
            .lora_registry()?
            .get(lora_int_id)
            .ok_or_else(|| EngineError::not_found(format!("LoRA {lora_int_id} has not been added")))?;
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.core_tx
            .send(CoreCommand::PinLora {
                id: lora_int_id,
                adapter,
                reply,
            })
            .map_err(|_| EngineError::engine_dead("the engine core is gone"))?;
        answer
            .recv()
            .map_err(|_| EngineError::engine_dead("the engine core is gone"))??;
        self.lora_registry()?.set_pinned(lora_int_id, true);
        Ok(true)
    }

    /// Added adapters, by id (empty when enable_lora is off).
    pub fn list_loras(&self) -> Vec<LoraInfo> {
        match self.lora_registry() {
            Ok(r) => r.list(),
            Err(_) => Vec::new(),
        }
    }

    /// (adapters swapped into a slot, adapters evicted from one) since start-up.
    pub fn lora_swaps(&self) -> (u64, u64) {
        (
            self.shared.lora_loads.load(Ordering::Relaxed),
            self.shared.lora_evictions.load(Ordering::Relaxed),
        )
    }

    /// Aborts a request if it is live: its sink gets a final output with finish_reason abort.
    pub fn abort(&self, request_id: &str) {
        if let Some(pooling) = &self.pooling {
            let _ = pooling.tx.send(PoolingCommand::Abort(request_id.to_string()));
            return;
        }
        if let Ok(live) = self.live.lock() {
            for &seq_id in live.get(request_id).into_iter().flatten() {
                let _ = self.core_tx.send(CoreCommand::Release(seq_id));
            }
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The decoder's shape; None for a pooling model (see `encoder_config`).
    pub fn model_config(&self) -> Option<&ModelConfig> {
        self.config.as_ref()
    }

    /// The decoder's config; a pooling model has none (LoRA and generation need one).
    fn generation_config(&self) -> Result<&ModelConfig> {
        self.config
            .as_ref()
            .ok_or_else(|| EngineError::unsupported("this is a pooling model; it serves no generation or LoRA"))
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Blocks and requests as of the last command or step the core handled. When a
    /// request's final output has been delivered, its blocks already show as free.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Requests preempted by recompute since start-up (the KV cache ran out).
    pub fn num_preemptions(&self) -> u64 {
        self.shared.preemptions.load(Ordering::Relaxed)
    }

    /// Forgets every cached prefix (vLLM's reset_prefix_cache). Ok(false) when requests
    /// hold blocks and `reset_running_requests` is false; with it, running requests are
    /// preempted first (they recompute and continue). Waits for the step in progress.
    pub fn reset_prefix_cache(&self, reset_running_requests: bool) -> Result<bool> {
        self.refuse_generation()?;
        let (reply, answer) = crossbeam_channel::bounded(1);
        {
            let _live = self
                .live
                .lock()
                .map_err(|_| EngineError::internal("engine registry poisoned"))?;
            self.check_alive()?;
            self.core_tx
                .send(CoreCommand::ResetPrefixCache {
                    reset_running_requests,
                    reply,
                })
                .map_err(|_| EngineError::engine_dead("the engine core has stopped"))?;
        }
        answer
            .recv()
            .map_err(|_| EngineError::engine_dead("the engine core stopped before resetting the prefix cache"))
    }

    /// Logs one line of stats as vLLM's do_log_stats (throughput since the previous call)
    /// and returns it.
    pub fn do_log_stats(&self) -> String {
        let now = std::time::Instant::now();
        let stats = self.stats();
        let mut last = self.last_logged.lock().unwrap_or_else(|e| e.into_inner());
        let (prompt_tps, gen_tps) = match last.as_ref() {
            Some((at, prev)) => {
                let dt = now.duration_since(*at).as_secs_f64().max(1e-9);
                (
                    stats.prompt_tokens_total.saturating_sub(prev.prompt_tokens_total) as f64 / dt,
                    stats
                        .generation_tokens_total
                        .saturating_sub(prev.generation_tokens_total) as f64
                        / dt,
                )
            }
            None => (0.0, 0.0),
        };
        let line = format!(
            "Avg prompt throughput: {prompt_tps:.1} tokens/s, Avg generation throughput: {gen_tps:.1} tokens/s, \
             Running: {} reqs, Waiting: {} reqs, KV cache usage: {:.1}%, Prefix cache hit rate: {:.1}%, \
             Preemptions: {}",
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage * 100.0,
            stats.prefix_cache_hit_rate() * 100.0,
            stats.num_preemptions
        );
        tracing::info!("{line}");
        *last = Some((now, stats));
        line
    }

    /// Whether the engine can still serve (false after a fatal error or shutdown).
    pub fn is_alive(&self) -> bool {
        self.check_alive().is_ok()
    }

    /// Aborts everything in flight and stops the threads. Idempotent.
    pub fn shutdown(&self) {
        {
            let Ok(_live) = self.live.lock() else { return };
            if self.closed.swap(true, Ordering::SeqCst) {
                return;
            }
            let _ = self.core_tx.send(CoreCommand::Shutdown);
            if let Some(pooling) = &self.pooling {
                let _ = pooling.tx.send(PoolingCommand::Shutdown);
            }
        }
        let threads: Vec<JoinHandle<()>> = match self.threads.lock() {
            Ok(mut t) => t.drain(..).collect(),
            Err(_) => return,
        };
        let mut threads = threads.into_iter();
        // The core first: its last Released messages reach the output thread before Shutdown.
        if let Some(core) = threads.next() {
            let _ = core.join();
        }
        let _ = self.out_tx.send(OutputMessage::Shutdown);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Calls `listener` with the reason when the engine dies of an internal error (a
    /// panic or a failed step; not a shutdown). At once when it is already dead.
    pub fn on_death(&self, listener: crate::engine_core::DeathListener) {
        let pending = match self.shared.death_listeners.lock() {
            Ok(mut listeners) if !self.shared.dead.load(Ordering::SeqCst) => {
                listeners.push(listener);
                None
            }
            _ => Some(listener),
        };
        if let Some(listener) = pending {
            listener("the engine stopped after an internal error");
        }
    }

    /// Test-only: panics the core thread (as a bug in a step would), killing the engine.
    /// Not for production: the NIF honours it only when the VM's environment has
    /// VLLM_FAULT_INJECTION=1 (control::FAULT_INJECTION_ENV).
    #[doc(hidden)]
    pub fn inject_fault(&self) -> Result<()> {
        match self.control(ControlOp::InjectPanic, std::time::Duration::from_secs(5)) {
            Err(e) if e.category == crate::error::ErrorCategory::EngineDead => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(EngineError::internal("the injected fault did not fire")),
        }
    }

    /// Proves the core thread is serving: it answers between two steps.
    pub fn ping(&self, timeout: std::time::Duration) -> Result<()> {
        self.control(ControlOp::Ping, timeout).map(|_| ())
    }

    /// Sleep level 1 frees the KV cache memory (on the CPU the weights stay in host
    /// memory); level 2 also drops the weights. Requests in flight are aborted; requests
    /// added while asleep wait for `wake_up`.
    pub fn sleep(&self, level: u8) -> Result<()> {
        self.control(ControlOp::Sleep { level }, CONTROL_TIMEOUT).map(|_| ())
    }

    /// Restores the weights (reloaded from disk after a level-2 sleep) and/or the KV cache.
    pub fn wake_up(&self, weights: bool, kv_cache: bool) -> Result<()> {
        self.control(ControlOp::WakeUp { weights, kv_cache }, CONTROL_TIMEOUT)
            .map(|_| ())
    }

    /// Weights and KV cache bytes held now.
    pub fn memory_usage(&self) -> MemoryUsage {
        self.shared.memory.lock().map(|m| *m).unwrap_or_default()
    }

    pub fn is_sleeping(&self) -> bool {
        self.memory_usage().sleep_level > 0
    }

    /// Starts recording engine steps (schedule, forward, sample, detokenize).
    pub fn start_profile(&self) -> Result<()> {
        self.check_alive()?;
        self.shared.profiler.start()
    }

    /// Stops recording and writes the Chrome trace to `path`.
    pub fn stop_profile(&self, path: &std::path::Path) -> Result<ProfileSummary> {
        self.shared.profiler.stop(path)
    }

    fn control(&self, op: ControlOp, timeout: std::time::Duration) -> Result<ControlReply> {
        self.check_alive()?;
        let (reply, answer) = crossbeam_channel::bounded(1);
        let dead = || EngineError::engine_dead("the engine core thread is not running");
        self.core_tx
            .send(CoreCommand::Control(ControlCommand { op, reply }))
            .map_err(|_| dead())?;
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(EngineError::new(
                crate::error::ErrorCategory::Timeout,
                format!("the engine core did not answer {op:?} within {timeout:?}"),
            )),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(dead()),
        }
    }

    fn check_alive(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(EngineError::engine_dead("the engine has been shut down"));
        }
        if self.shared.dead.load(Ordering::SeqCst) {
            return Err(EngineError::engine_dead("the engine stopped after an internal error"));
        }
        Ok(())
    }

    /// What the tokenizer and the limits decide before validation: the prompt truncated
    /// to `truncate_prompt_tokens`, and `bad_words` turned into token ids.
    fn prepare(&self, mut request: EngineRequest) -> Result<EngineRequest> {
        request.params.validate()?;
        if let Some(k) = request.params.truncate_prompt_tokens {
            let keep = if k < 0 {
                self.limits.max_model_len
            } else {
                usize::try_from(k).unwrap_or(usize::MAX)
            };
            let prompt = &mut request.prompt_token_ids;
            if prompt.len() > keep {
                prompt.drain(..prompt.len() - keep);
            }
        }
        let words = std::mem::take(&mut request.params.bad_words);
        for word in &words {
            for ids in bad_word_token_ids(&self.tokenizer, word)? {
                if !request.params.bad_words_token_ids.contains(&ids) {
                    request.params.bad_words_token_ids.push(ids);
                }
            }
        }
        request.params.bad_words = words;
        Ok(request)
    }

    fn validate(&self, request: &EngineRequest) -> Result<()> {
        request.params.validate()?;
        let vocab = self.limits.vocab_size;
        if let Some((field, id)) = request
            .params
            .mentioned_token_ids()
            .find(|&(_, id)| id as usize >= vocab)
        {
            return Err(EngineError::validation(format!(
                "{field} token id {id} is out of vocabulary (size {vocab})"
            )));
        }
        let prompt = &request.prompt_token_ids;
        if prompt.is_empty() {
            return Err(EngineError::validation("the prompt must not be empty"));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.limits.vocab_size) {
            return Err(EngineError::validation(format!(
                "prompt token id {bad} is out of vocabulary (size {})",
                self.limits.vocab_size
            )));
        }
        let max_len = self.limits.max_model_len;
        let total = match request.params.max_tokens {
            Some(max_tokens) if prompt.len() + max_tokens > max_len => {
                return Err(EngineError::validation(format!(
                    "prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length {max_len}",
                    prompt.len()
                )));
            }
            Some(max_tokens) => prompt.len() + max_tokens,
            None if prompt.len() >= max_len => {
                return Err(EngineError::validation(format!(
                    "prompt ({} tokens) leaves no room to generate within the model's context length {max_len}",
                    prompt.len()
                )));
            }
            // Without max_tokens a request may grow to the context length.
            None => max_len,
        };
        let blocks = total.div_ceil(self.limits.block_size);
        if blocks > self.limits.num_blocks {
            return Err(EngineError::resource_exhausted(format!(
                "the request needs {blocks} KV cache blocks ({total} tokens) but the cache has only {}",
                self.limits.num_blocks
            )));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Child `index` of a request with n > 1: one sequence, seed + index when seeded, and
/// only the first child computes the prompt logprobs (they are the same for all).
fn child_params(params: &SamplingParams, index: usize) -> SamplingParams {
    let mut child = params.clone();
    if params.n > 1 {
        child.n = 1;
        child.seed = params.seed.map(|s| s.wrapping_add(index as u64));
        if index > 0 {
            child.prompt_logprobs = None;
        }
    }
    child
}

/// vLLM's tokenization of a bad word: the word (leading spaces stripped) alone, and after
/// a space when that gives a different first token but as many tokens.
fn bad_word_token_ids(tokenizer: &Tokenizer, word: &str) -> Result<Vec<Vec<u32>>> {
    let word = word.trim_start();
    let plain = tokenizer.encode(word, false)?;
    let spaced = tokenizer.encode(&format!(" {word}"), false)?;
    if plain.is_empty() {
        return Err(EngineError::validation(format!("bad word {word:?} has no tokens")));
    }
    let mut out = vec![plain.clone()];
    if spaced.len() == plain.len() && spaced.first() != plain.first() {
        out.push(spaced);
    }
    Ok(out)
}

/// Turns EngineArgs into concrete limits, with vLLM's defaults.
fn resolve_limits(
    args: &EngineArgs,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    model: &dyn CausalLM,
) -> Result<EngineLimits> {
    let max_model_len = args.max_model_len.unwrap_or(config.max_position_embeddings);
    if max_model_len == 0 {
        return Err(EngineError::validation("the model's max_position_embeddings is 0"));
    }
    if max_model_len > config.max_position_embeddings {
        return Err(EngineError::validation(format!(
            "max_model_len {max_model_len} exceeds the model's max_position_embeddings {}",
            config.max_position_embeddings
        )));
    }
    let defaults = model.batch_defaults()?;
    let max_num_seqs = args.max_num_seqs.unwrap_or(defaults.max_num_seqs);
    let max_num_batched_tokens = match args.max_num_batched_tokens {
        Some(n) => n,
        None if args.enable_chunked_prefill => defaults.max_num_batched_tokens,
        None => max_model_len.max(defaults.max_num_batched_tokens),
    };
    if !args.enable_chunked_prefill && max_num_batched_tokens < max_model_len {
        return Err(EngineError::validation(format!(
            "max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_model_len \
             ({max_model_len}) when chunked prefill is off"
        )));
    }
    let block_size = args.block_size;
    let per_block = model.kv_bytes_per_block(block_size).max(1);
    let kv_bytes = match args.kv_cache_memory_bytes {
        Some(bytes) => bytes,
        // A GPU model sizes its cache from gpu_memory_utilization and the card's memory.
        None => match model.kv_cache_budget(
            args,
            BatchSize {
                max_num_seqs,
                max_num_batched_tokens,
            },
        )? {
            Some(bytes) => bytes,
            None => {
                // The CPU's gpu_memory_utilization: a share of the memory left after the
                // weights, no more than max_num_seqs full-length requests need, and at most 1 GiB.
                let wanted = (max_num_seqs * max_model_len)
                    .div_ceil(block_size)
                    .saturating_mul(per_block);
                let available = available_memory_bytes()
                    .map(|m| (m as f64 * args.gpu_memory_utilization) as usize)
                    .unwrap_or(usize::MAX);
                wanted.min(available).min(DEFAULT_KV_CACHE_BYTES)
            }
        },
    };
    let num_blocks = (kv_bytes / per_block).max(1);
    let num_tokens = num_blocks * block_size;
    tracing::info!(
        "KV cache: {num_blocks} blocks of {block_size} tokens, {num_tokens} tokens, {:.1} MiB",
        (num_blocks * per_block) as f64 / (1 << 20) as f64
    );
    tracing::info!(
        "Maximum concurrency for {max_model_len} tokens per request: {:.2}x",
        num_tokens as f64 / max_model_len as f64
    );
    let mut eos_token_ids: Vec<u32> = tokenizer.eos_token_id().into_iter().collect();
    for &e in &config.eos_token_ids {
        if !eos_token_ids.contains(&e) {
            eos_token_ids.push(e);
        }
    }
    Ok(EngineLimits {
        max_model_len,
        max_num_seqs,
        max_num_batched_tokens,
        block_size,
        num_blocks,
        vocab_size: config.vocab_size,
        eos_token_ids,
    })
}

/// MemAvailable from /proc/meminfo (Linux); None elsewhere.
fn available_memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The pool whose worker runs the engine core, so the model's parallel loops (rayon, gemm)
/// are forked from inside it: `num_threads` threads, or on the CPU device by default as
/// many as rayon picks (RAYON_NUM_THREADS, else all cores). A loop started from a thread
/// outside a pool is injected and its caller blocks on a latch, which cost ~20% of a
/// batch-1 decode step (bench/RESULTS.md, C2 session 5). None: the global pool.
fn compute_pool(num_threads: Option<usize>, device: &Device) -> Result<Option<rayon::ThreadPool>> {
    if num_threads.is_none() && !matches!(device, Device::Cpu) {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads.unwrap_or(0))
        .thread_name(|i| format!("vllm-cpu-{i}"))
        .build()
        .map(Some)
        .map_err(|e| EngineError::internal(format!("cannot start the compute threads ({num_threads:?}): {e}")))
}

/// Requests an engine admits at once: the waiting queue's limit on top of the running
/// batch (None: unlimited).
fn max_live_requests(args: &EngineArgs, limits: &EngineLimits) -> Option<usize> {
    args.max_waiting_requests.map(|w| w.saturating_add(limits.max_num_seqs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        fn assert_unwind_safe<T: std::panic::RefUnwindSafe>() {}
        assert_send_sync::<Engine>();
        assert_unwind_safe::<Engine>();
    }
}
