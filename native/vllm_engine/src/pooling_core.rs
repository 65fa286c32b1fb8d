//! The pooling engine core: a thread that batches waiting pooling requests (prefill only,
//! whole sequences) under max_num_seqs / max_num_batched_tokens, runs the encoder once per
//! batch and hands each request its pooled vector or label probabilities.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::engine_core::CoreShared;
use crate::error::{EngineError, Result};
use crate::models::encoder::{EncoderBatch, EncoderConfig, EncoderModel};
use crate::pooling::{self, PoolingParams};

/// What a pooling request asks for (vLLM's pooling tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingTask {
    /// The model's pooled hidden state, as its pooler gives it.
    Encode,
    /// A sentence embedding: pooled, truncated to `dimensions`, normalised per the model.
    Embed,
    /// Label probabilities from a sequence-classification head.
    Classify,
    /// A cross-encoder relevance score of a text pair (one label: sigmoid).
    Score,
}

impl PoolingTask {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "encode" => Ok(PoolingTask::Encode),
            "embed" => Ok(PoolingTask::Embed),
            "classify" => Ok(PoolingTask::Classify),
            "score" => Ok(PoolingTask::Score),
            other => Err(EngineError::validation(format!(
                "unknown pooling task {other:?} (encode, embed, classify, score)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolingTask::Encode => "encode",
            PoolingTask::Embed => "embed",
            PoolingTask::Classify => "classify",
            PoolingTask::Score => "score",
        }
    }

    fn uses_head(self) -> bool {
        matches!(self, PoolingTask::Classify | PoolingTask::Score)
    }
}

/// One pooling request: a whole tokenized sequence (a text pair for `score`, with its
/// segment ids).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolingRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// BERT segment ids, one per token; None: all 0.
    pub token_type_ids: Option<Vec<u32>>,
    pub task: PoolingTask,
    pub params: PoolingParams,
}

/// The single, final output of a pooling request (vLLM's PoolingRequestOutput): `data` is
/// the embedding (encode/embed), the label probabilities (classify) or `[score]` (score).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolingOutput {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub task: PoolingTask,
    pub data: Vec<f32>,
    pub finished: bool,
}

/// Where a pooling request's output goes (the NIF sends it to a pid).
pub trait PoolingSink: Send {
    /// Delivers the output; false when the receiver is gone.
    fn send(&mut self, output: PoolingOutput) -> bool;
    /// The request failed (bad input found late, or the engine died); nothing follows.
    fn fail(&mut self, error: EngineError);
}

pub(crate) enum PoolingCommand {
    Add(Box<(PoolingRequest, Box<dyn PoolingSink>)>),
    Abort(String),
    Shutdown,
}

/// Batch limits of the pooling core.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolingLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

pub(crate) struct PoolingCore {
    model: Box<dyn EncoderModel>,
    limits: PoolingLimits,
    commands: Receiver<PoolingCommand>,
    waiting: VecDeque<(PoolingRequest, Box<dyn PoolingSink>)>,
    shared: Arc<CoreShared>,
}

impl PoolingCore {
    pub fn new(
        model: Box<dyn EncoderModel>,
        limits: PoolingLimits,
        commands: Receiver<PoolingCommand>,
        shared: Arc<CoreShared>,
    ) -> Self {
        PoolingCore {
            model,
            limits,
            commands,
            waiting: VecDeque::new(),
            shared,
        }
    }

    /// Runs until Shutdown (or every Engine handle is gone): waits for work, takes in
    /// everything queued meanwhile, then runs batches until nothing waits.
    pub fn run(mut self) {
        loop {
            if self.waiting.is_empty() {
                match self.commands.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut open = true;
            while let Ok(cmd) = self.commands.try_recv() {
                if !self.handle(cmd) {
                    open = false;
                    break;
                }
            }
            if !open {
                break;
            }
            self.step();
        }
        self.shared.dead.store(true, Ordering::SeqCst);
        for (_, mut sink) in self.waiting.drain(..) {
            sink.fail(EngineError::engine_dead("the engine was shut down"));
        }
        while let Ok(PoolingCommand::Add(add)) = self.commands.try_recv() {
            let (_, mut sink) = *add;
            sink.fail(EngineError::engine_dead("the engine was shut down"));
        }
    }

    /// false on Shutdown.
    fn handle(&mut self, cmd: PoolingCommand) -> bool {
        match cmd {
            PoolingCommand::Add(add) => self.waiting.push_back(*add),
            PoolingCommand::Abort(id) => {
                // A pooling request has no partial output: an aborted one just never answers.
                self.waiting.retain(|(r, _)| r.request_id != id);
            }
            PoolingCommand::Shutdown => return false,
        }
        true
    }

    /// Takes waiting requests in arrival order while they fit the batch limits (at least
    /// one, so a request as long as the token budget still runs) and runs them.
    fn step(&mut self) {
        let mut taken = Vec::new();
        let mut tokens = 0;
        while let Some((req, _)) = self.waiting.front() {
            let len = req.prompt_token_ids.len();
            if !taken.is_empty()
                && (taken.len() >= self.limits.max_num_seqs || tokens + len > self.limits.max_num_batched_tokens)
            {
                break;
            }
            tokens += len;
            if let Some(item) = self.waiting.pop_front() {
                taken.push(item);
            }
        }
        // Classification heads and plain poolers are separate forward passes.
        let (head, plain): (Vec<_>, Vec<_>) = taken.into_iter().partition(|(r, _)| r.task.uses_head());
        for group in [plain, head] {
            if !group.is_empty() {
                self.run_batch(group);
            }
        }
    }

    fn run_batch(&self, group: Vec<(PoolingRequest, Box<dyn PoolingSink>)>) {
        let mut batch = EncoderBatch::default();
        for (req, _) in &group {
            batch.push_with_types(&req.prompt_token_ids, req.token_type_ids.as_deref());
        }
        let uses_head = group[0].0.task.uses_head();
        let results = if uses_head {
            self.model.classify(&batch).and_then(|t| Ok(t.to_vec2::<f32>()?))
        } else {
            self.model
                .hidden_states(&batch)
                .and_then(|h| pooling::pool(&h, &batch, self.model.config().pooling))
        };
        match results {
            Ok(rows) => {
                for ((req, mut sink), row) in group.into_iter().zip(rows) {
                    match finish(self.model.config(), &req, row) {
                        Ok(data) => {
                            let _ = sink.send(PoolingOutput {
                                request_id: req.request_id,
                                prompt_token_ids: req.prompt_token_ids,
                                task: req.task,
                                data,
                                finished: true,
                            });
                        }
                        Err(e) => sink.fail(e),
                    }
                }
            }
            Err(e) => {
                tracing::error!("pooling batch failed: {e}");
                for (_, mut sink) in group {
                    sink.fail(e.clone());
                }
            }
        }
    }
}

/// Per-request post-processing of one pooled row or one row of label logits.
fn finish(config: &EncoderConfig, req: &PoolingRequest, row: Vec<f32>) -> Result<Vec<f32>> {
    let params = &req.params;
    match req.task {
        PoolingTask::Classify | PoolingTask::Score => Ok(if params.use_activation.unwrap_or(true) {
            pooling::activate(row)
        } else {
            row
        }),
        PoolingTask::Encode | PoolingTask::Embed => {
            let mut v = match params.dimensions {
                Some(d) => pooling::truncate_dimensions(row, d)?,
                None => row,
            };
            // encode gives the pooler's output as is unless normalize is asked for.
            let default_normalize = req.task == PoolingTask::Embed && config.normalize;
            if params.normalize.unwrap_or(default_normalize) {
                pooling::normalize(&mut v);
            }
            Ok(v)
        }
    }
}

/// Checks a request against the loaded model before it is queued.
pub(crate) fn validate(config: &EncoderConfig, max_model_len: usize, req: &PoolingRequest) -> Result<()> {
    let tasks = config.supported_tasks();
    if !tasks.contains(&req.task.as_str()) {
        return Err(EngineError::unsupported(format!(
            "the model does not support the {:?} task (supported: {})",
            req.task.as_str(),
            tasks.join(", ")
        )));
    }
    let ids = &req.prompt_token_ids;
    if ids.is_empty() {
        return Err(EngineError::validation("the prompt must not be empty"));
    }
    if ids.len() > max_model_len {
        return Err(EngineError::validation(format!(
            "prompt ({} tokens) exceeds the model's context length {max_model_len}",
            ids.len()
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(EngineError::validation(format!(
            "prompt token id {bad} is out of vocabulary (size {})",
            config.vocab_size
        )));
    }
    if let Some(types) = &req.token_type_ids {
        if types.len() != ids.len() {
            return Err(EngineError::validation(format!(
                "token_type_ids has {} entries for {} tokens",
                types.len(),
                ids.len()
            )));
        }
        if let Some(&bad) = types.iter().find(|&&t| t as usize >= config.type_vocab_size) {
            return Err(EngineError::validation(format!(
                "token type id {bad} is out of range (type_vocab_size {})",
                config.type_vocab_size
            )));
        }
    }
    if let Some(d) = req.params.dimensions {
        if req.task.uses_head() {
            return Err(EngineError::validation("dimensions applies to embed and encode only"));
        }
        if d == 0 || d > config.hidden_size {
            return Err(EngineError::validation(format!(
                "dimensions must be in 1..={} for this model, got {d}",
                config.hidden_size
            )));
        }
    }
    Ok(())
}

/// The sender side kept by the Engine.
pub(crate) type PoolingSender = Sender<PoolingCommand>;
