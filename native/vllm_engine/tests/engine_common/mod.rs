//! A fake model and helpers for the engine tests.
//!
//! The fake model writes each token id into the paged KV cache and computes its logits
//! from what it reads back through the block table over the whole context, so a wrong
//! block table, a lost block or a mixed-up batch changes the tokens it produces.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use crossbeam_channel::{unbounded, Receiver, Sender};
use vllm_engine::batch_size::BatchSize;
use vllm_engine::config::Architecture;
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::models::{CausalLM, ForwardBatch};
use vllm_engine::tokenizer::Tokenizer;
use vllm_engine::{
    Engine, EngineArgs, EngineError, EngineRequest, ModelConfig, OutputSink, RequestOutput, SamplingParams,
};

// The model-file locators of the model tests, shared rather than copied.
#[path = "../common/mod.rs"]
pub mod model_files;
#[allow(unused_imports)] // not every engine test loads the real model
pub use model_files::{smollm2_cases, smollm2_gguf, SmolLm2Case};

pub const VOCAB: usize = 49152;
pub const EOS: u32 = 2;

/// The shared fixtures: `$VLLM_FIXTURES_DIR`, else `../shared/fixtures` beside the repo
/// root (one level further up from a git worktree under `wt/`).
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VLLM_FIXTURES_DIR") {
        return PathBuf::from(dir);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let beside = PathBuf::from(root).join("../shared/fixtures");
    if beside.exists() {
        beside
    } else {
        PathBuf::from(root).join("../../shared/fixtures")
    }
}

pub fn tokenizer_path() -> PathBuf {
    fixtures_dir().join("smollm2_tokenizer.json")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_path()).expect("the SmolLM2 tokenizer fixture is missing")
}

/// Single-token words the fake model speaks, so outputs are readable text.
pub fn palette(tok: &Tokenizer) -> Vec<u32> {
    let words = [
        " the", " cat", " sat", " on", " mat", " dog", " ran", " far", " away", ",", ".", " and", " blue", " red",
        " sky", " sun", " big", " small", " house", " tree", " day", " night", " a", " is",
    ];
    let ids: Vec<u32> = words
        .iter()
        .filter_map(|w| match tok.encode(w, false).ok()?.as_slice() {
            [id] => Some(*id),
            _ => None,
        })
        .collect();
    assert!(ids.len() >= 16, "palette too small: {ids:?}");
    ids
}

/// The fake model's rule: the next token of a context, chosen from the palette.
pub fn next_token(palette: &[u32], context: &[u32]) -> u32 {
    let sum: u64 = context.iter().map(|&t| t as u64).sum();
    palette[((sum * 31 + context.len() as u64) % palette.len() as u64) as usize]
}

/// Greedy continuation by the rule, computed without the engine.
pub fn reference_greedy(palette: &[u32], prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ctx = prompt.to_vec();
    for _ in 0..n {
        let t = next_token(palette, &ctx);
        ctx.push(t);
    }
    ctx[prompt.len()..].to_vec()
}

#[derive(Default, Clone)]
pub struct FakeBehaviour {
    /// Emit EOS once the context reaches this length.
    pub eos_at_context_len: Option<usize>,
    /// Panic when asked for logits at this context length.
    pub panic_at_context_len: Option<usize>,
    /// Sleep this long in every forward pass (to abort mid-prefill or mid-decode).
    pub step_delay: Option<Duration>,
    /// The step width this model's device would default to (None: the trait's default).
    pub batch_defaults: Option<BatchSize>,
}

pub struct FakeModel {
    config: ModelConfig,
    palette: Vec<u32>,
    behaviour: FakeBehaviour,
    pub forward_calls: Arc<AtomicBool>,
}

pub fn fake_config(max_position_embeddings: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: VOCAB,
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        head_dim: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings,
        sliding_window: None,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![EOS],
    }
}

impl FakeModel {
    pub fn new(palette: Vec<u32>, behaviour: FakeBehaviour) -> Self {
        FakeModel {
            config: fake_config(512),
            palette,
            behaviour,
            forward_calls: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl CausalLM for FakeModel {
    fn forward(&self, batch: &ForwardBatch, kv: &mut PagedKvCache) -> vllm_engine::Result<Tensor> {
        self.forward_calls.store(true, Ordering::SeqCst);
        if let Some(d) = self.behaviour.step_delay {
            std::thread::sleep(d);
        }
        let (bs, num_blocks) = (kv.block_size, kv.num_blocks);
        let stride = kv.num_kv_heads * kv.head_dim;
        let slot = |table: &[u32], pos: usize| -> usize {
            let block = table[pos / bs] as usize;
            assert!(block < num_blocks, "block id {block} out of range");
            (block * bs + pos % bs) * stride
        };
        let vllm_engine::kv_cache::paged_cache::LayerKv::F32(cache) = &mut kv.layers[0] else {
            panic!("the fake model keeps its tokens in a float32 cache");
        };
        assert_eq!(batch.token_ids.len(), batch.positions.len());
        for seq in &batch.seqs {
            assert!(seq.block_table.len() * bs >= seq.context_len, "block table too short");
            for j in 0..seq.query_len {
                let i = seq.query_start + j;
                let pos = batch.positions[i];
                assert_eq!(pos, seq.context_len - seq.query_len + j, "position mismatch");
                let at = slot(&seq.block_table, pos);
                cache.k[at] = batch.token_ids[i] as f32;
            }
        }
        let mut rows = Vec::new();
        for seq in batch.seqs.iter().filter(|s| s.want_logits) {
            let context: Vec<u32> = (0..seq.context_len)
                .map(|pos| cache.k[slot(&seq.block_table, pos)] as u32)
                .collect();
            if self.behaviour.panic_at_context_len == Some(seq.context_len) {
                panic!("fake model asked to panic");
            }
            let next = if self.behaviour.eos_at_context_len == Some(seq.context_len) {
                EOS
            } else {
                next_token(&self.palette, &context)
            };
            let mut row = vec![-20.0f32; VOCAB];
            // Two runners-up, so sampling at temperature > 0 has choices.
            let idx = self.palette.iter().position(|&p| p == next).unwrap_or(0);
            row[self.palette[(idx + 2) % self.palette.len()] as usize] = 7.0;
            row[self.palette[(idx + 1) % self.palette.len()] as usize] = 8.0;
            row[next as usize] = 10.0;
            rows.extend(row);
        }
        let n = rows.len() / VOCAB;
        Ok(Tensor::from_vec(rows, (n, VOCAB), &Device::Cpu)?)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn batch_defaults(&self) -> vllm_engine::Result<BatchSize> {
        Ok(self.behaviour.batch_defaults.unwrap_or(BatchSize::DEFAULT))
    }
}

pub fn args() -> EngineArgs {
    let mut a = EngineArgs::new("fake-model");
    a.max_model_len = Some(512);
    a.max_num_seqs = Some(16);
    a.block_size = 4;
    a
}

pub struct Harness {
    pub engine: Engine,
    pub palette: Vec<u32>,
}

pub fn engine_with(args: EngineArgs, behaviour: FakeBehaviour) -> Harness {
    let tok = tokenizer();
    let palette = palette(&tok);
    let model = FakeModel::new(palette.clone(), behaviour);
    let engine = Engine::with_model(args, Box::new(model), tok).expect("engine starts");
    Harness { engine, palette }
}

pub fn engine() -> Harness {
    engine_with(args(), FakeBehaviour::default())
}

// Few events per test: an unboxed output keeps the matches plain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    Output(RequestOutput),
    Fail(EngineError),
}

/// Forwards everything to a channel; `send` returns false once the receiver is dropped.
pub struct ChannelSink {
    tx: Sender<Event>,
}

impl OutputSink for ChannelSink {
    fn send(&mut self, output: RequestOutput) -> bool {
        self.tx.send(Event::Output(output)).is_ok()
    }
    fn fail(&mut self, error: EngineError) {
        let _ = self.tx.send(Event::Fail(error));
    }
}

pub fn sink() -> (Box<dyn OutputSink>, Receiver<Event>) {
    let (tx, rx) = unbounded();
    (Box::new(ChannelSink { tx }), rx)
}

/// Adds a request and returns the receiver of its outputs.
pub fn submit(engine: &Engine, id: &str, prompt: Vec<u32>, params: SamplingParams) -> Receiver<Event> {
    let (s, rx) = sink();
    engine
        .add_request(EngineRequest::new(id, prompt, params), s)
        .expect("request accepted");
    rx
}

/// Every output of one request up to its final one; panics on a fail or a timeout, and
/// checks nothing arrives after the final output.
pub fn collect(rx: &Receiver<Event>) -> Vec<RequestOutput> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut outs = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Output(o)) => {
                let done = o.finished;
                outs.push(o);
                if done {
                    break;
                }
            }
            Ok(Event::Fail(e)) => panic!("request failed: {e:?}"),
            Err(e) => panic!("no final output in time: {e:?} after {} outputs", outs.len()),
        }
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(rx.try_recv().is_err(), "something arrived after the final output");
    outs
}

pub fn final_tokens(outs: &[RequestOutput]) -> Vec<u32> {
    outs.last().expect("at least one output").outputs[0].token_ids.clone()
}

/// A prompt of `n` palette-free ids derived from `seed`.
pub fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 100 + (seed * 7919 + i * 104729) % 40000)
        .collect()
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn assert_all_blocks_free(engine: &Engine) {
    let s = engine.stats();
    assert_eq!(s.free_blocks, s.total_blocks, "blocks leaked: {s:?}");
    assert_eq!((s.num_running, s.num_waiting), (0, 0), "requests left: {s:?}");
}
