//! The client side of the engine: validates and registers requests, sends commands to the
//! engine-core thread, and routes each request's outputs to its sink.

use crate::config::EngineArgs;
use crate::error::{EngineError, Result};
use crate::request::{EngineRequest, RequestOutput};
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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub total_blocks: usize,
    pub free_blocks: usize,
    pub num_running: usize,
    pub num_waiting: usize,
}

pub struct Engine {}

impl Engine {
    /// Loads the model and starts the engine threads. Slow: call it off the BEAM schedulers.
    pub fn new(_args: EngineArgs) -> Result<Engine> {
        todo!()
    }
    /// Queues a request; its outputs go to `sink`. Duplicate live request ids, empty
    /// prompts, out-of-vocabulary ids and too-long prompts are `:validation` errors.
    pub fn add_request(&self, _request: EngineRequest, _sink: Box<dyn OutputSink>) -> Result<()> {
        todo!()
    }
    /// Aborts a request if it is live: its sink gets a final output with finish_reason abort.
    pub fn abort(&self, _request_id: &str) {
        todo!()
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        todo!()
    }
    pub fn stats(&self) -> EngineStats {
        todo!()
    }
    /// Aborts everything in flight and stops the threads. Idempotent.
    pub fn shutdown(&self) {
        todo!()
    }
}
