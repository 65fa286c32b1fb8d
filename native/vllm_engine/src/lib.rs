//! vllm_engine: an LLM serving engine (continuous batching over a paged KV cache).
//! Plain Rust; knows nothing of the BEAM. See ../../../README.md and shared/DESIGN.md.

pub mod backend;
pub mod batch_size;
pub mod config;
pub mod control;
pub mod decode_lookahead;
pub mod device_sampling;
pub mod engine;
pub mod engine_core;
pub mod error;
pub mod kv_cache;
pub mod loader;
pub mod lora;
pub mod models;
pub mod output_processor;
pub mod pooling;
pub mod pooling_core;
pub mod profiler;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod structured_output;
pub mod tokenizer;

pub use config::{EngineArgs, ModelConfig};
pub use engine::{Engine, EngineStats, OutputSink};
pub use error::{EngineError, ErrorCategory, Result};
pub use pooling::PoolingParams;
pub use pooling_core::{PoolingOutput, PoolingRequest, PoolingSink, PoolingTask};
pub use request::{
    CompletionOutput, EngineRequest, FinishReason, OutputKind, RequestMetrics, RequestOutput, SamplingParams,
    StopReason, TokenLogprob,
};
