//! The output thread: turns each request's sampled tokens into RequestOutputs. It
//! detokenizes incrementally, applies stop strings (holding back text that could still
//! become one), honours the output kind, and delivers to the request's sink.
//!
//! Guarantees: every request ends with exactly one final output (or one `fail`), nothing
//! follows it, and when a final output is delivered the request's KV blocks are already
//! free (a request stopped by a stop string waits for the core's `Released`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender};

use crate::engine::OutputSink;
use crate::engine_core::{CoreCommand, CoreShared, TokenEvent};
use crate::error::EngineError;
use crate::kv_cache::manager::SeqId;
use crate::request::{
    unix_seconds, CompletionOutput, FinishReason, OutputKind, RequestMetrics, RequestOutput, SamplingParams,
    StopReason, TokenLogprob,
};
use crate::stop::{find_stop, hold_back};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// Caller request ids of live requests, shared with the Engine (duplicate checks, abort).
pub type LiveRequests = Arc<Mutex<HashMap<String, SeqId>>>;

type Finish = (FinishReason, Option<StopReason>);

pub enum OutputMessage {
    Register(Box<RequestStream>),
    Step(Vec<TokenEvent>),
    /// The core has forgotten the request and freed its blocks.
    Released(SeqId),
    Dead(String),
    Shutdown,
}

/// What the output thread needs to know about a request, registered before the core sees it.
pub struct RequestStream {
    pub seq_id: SeqId,
    pub request_id: String,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub arrival_time: SystemTime,
    pub sink: Box<dyn OutputSink>,
}

struct Tracked {
    stream: RequestStream,
    detok: IncrementalDetokenizer,
    token_ids: Vec<u32>,
    logprobs: Vec<Vec<TokenLogprob>>,
    cumulative_logprob: f64,
    text: String,
    /// Bytes of `text` that may be shown (the rest could be the start of a stop string).
    released: usize,
    /// What Delta outputs have already carried.
    sent_text: usize,
    sent_tokens: usize,
    metrics: RequestMetrics,
    /// Stopped by a stop string: the final output waits for the core to release it.
    pending_final: Option<Finish>,
    /// The receiver is gone: send nothing more.
    gone: bool,
    /// Prompt tokens the prefix cache supplied (from the core's first token event).
    num_cached_tokens: usize,
}

pub struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    messages: Receiver<OutputMessage>,
    core: Sender<CoreCommand>,
    live: LiveRequests,
    shared: Arc<CoreShared>,
    requests: HashMap<SeqId, Tracked>,
    dead: Option<String>,
}

impl OutputProcessor {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        messages: Receiver<OutputMessage>,
        core: Sender<CoreCommand>,
        live: LiveRequests,
        shared: Arc<CoreShared>,
    ) -> Self {
        OutputProcessor {
            tokenizer,
            messages,
            core,
            live,
            shared,
            requests: HashMap::new(),
            dead: None,
        }
    }

    pub fn run(mut self) {
        while let Ok(msg) = self.messages.recv() {
            if let OutputMessage::Shutdown = msg {
                break;
            }
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.handle(msg))) {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("output thread panicked: {why}");
                self.shared.dead.store(true, Ordering::SeqCst);
                let _ = self.core.send(CoreCommand::Shutdown);
                self.fail_all(&format!("output processing panicked: {why}"));
            }
        }
        self.fail_all("the engine was shut down");
    }

    fn handle(&mut self, msg: OutputMessage) {
        match msg {
            OutputMessage::Register(stream) => self.register(*stream),
            OutputMessage::Step(events) => {
                let started = self.shared.profiler.begin();
                let n = events.len() as u64;
                events.into_iter().for_each(|e| self.on_token(e));
                let tid = crate::profiler::OUTPUT_THREAD;
                self.shared
                    .profiler
                    .record("detokenize", tid, started, &[("num_seqs", n)]);
            }
            OutputMessage::Released(id) => self.on_released(id),
            OutputMessage::Dead(why) => self.fail_all(&why),
            OutputMessage::Shutdown => {}
        }
    }

    fn register(&mut self, mut stream: RequestStream) {
        if let Some(why) = &self.dead {
            stream.sink.fail(EngineError::engine_dead(why.clone()));
            self.forget(stream.seq_id, &stream.request_id);
            return;
        }
        let metrics = RequestMetrics {
            arrival_time: unix_seconds(stream.arrival_time),
            ..Default::default()
        };
        // In the prompt's context, as vLLM: SentencePiece keeps the first token's leading space.
        let skip = stream.params.skip_special_tokens;
        let detok = IncrementalDetokenizer::with_prompt(&self.tokenizer, &stream.prompt_token_ids, skip)
            .unwrap_or_else(|_| IncrementalDetokenizer::new(skip));
        let t = Tracked {
            stream,
            detok,
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            cumulative_logprob: 0.0,
            text: String::new(),
            released: 0,
            sent_text: 0,
            sent_tokens: 0,
            metrics,
            pending_final: None,
            gone: false,
            num_cached_tokens: 0,
        };
        self.requests.insert(t.stream.seq_id, t);
    }

    fn on_token(&mut self, ev: TokenEvent) {
        let id = ev.seq_id;
        let Some(t) = self.requests.get_mut(&id) else { return };
        if t.pending_final.is_some() || t.gone {
            // Its remaining tokens are dropped; if the core finished it meanwhile, it has
            // already released it.
            if ev.finish.is_some() {
                self.on_released(id);
            }
            return;
        }
        let now = unix_seconds(SystemTime::now());
        t.metrics.first_token_time.get_or_insert(now);
        if t.metrics.first_scheduled_time.is_none() {
            t.metrics.first_scheduled_time = ev.first_scheduled_time;
            t.metrics.time_in_queue = ev.first_scheduled_time.map(|s| (s - t.metrics.arrival_time).max(0.0));
        }
        t.metrics.last_token_time = Some(now);
        t.num_cached_tokens = ev.num_cached_tokens;
        t.token_ids.push(ev.token_id);
        t.cumulative_logprob += ev.logprob as f64;
        let params = &t.stream.params;
        if let Some(mut lps) = ev.logprobs {
            if params.detokenize {
                for lp in &mut lps {
                    lp.decoded_token = self.tokenizer.decode(&[lp.token_id], false).ok();
                }
            }
            t.logprobs.push(lps);
        }

        // As vLLM: the text of an EOS or stop token is not part of the output.
        let stopped_by_token = matches!(ev.finish, Some((FinishReason::Stop, _)));
        let detokenize = params.detokenize && (!stopped_by_token || params.include_stop_str_in_output);
        if detokenize {
            let delta = t.detok.push(&self.tokenizer, ev.token_id).unwrap_or_default();
            t.text.push_str(&delta);
        }

        if params.detokenize && !params.stop.is_empty() && t.token_ids.len() > params.min_tokens {
            if let Some((at, stop)) = find_stop(&t.text, t.released, &params.stop) {
                let end = if params.include_stop_str_in_output {
                    at + stop.len()
                } else {
                    at
                };
                let finish = (FinishReason::Stop, Some(StopReason::Text(stop.to_string())));
                t.text.truncate(end);
                t.released = end;
                if ev.finish.is_some() {
                    self.emit(id, Some(finish));
                } else {
                    t.pending_final = Some(finish);
                    let _ = self.core.send(CoreCommand::Release(id));
                }
                return;
            }
        }

        if let Some(finish) = ev.finish {
            if detokenize {
                let rest = t.detok.flush(&self.tokenizer).unwrap_or_default();
                t.text.push_str(&rest);
            }
            t.released = t.text.len();
            self.emit(id, Some(finish));
        } else {
            let hold = hold_back(&t.text, &params.stop);
            t.released = t.released.max(t.text.len() - hold);
            if params.output_kind != OutputKind::FinalOnly {
                self.emit(id, None);
            }
        }
    }

    fn on_released(&mut self, id: SeqId) {
        let Some(t) = self.requests.get(&id) else { return };
        if t.gone {
            let request_id = t.stream.request_id.clone();
            self.requests.remove(&id);
            self.forget(id, &request_id);
        } else {
            let finish = t.pending_final.clone().unwrap_or((FinishReason::Abort, None));
            self.emit(id, Some(finish));
        }
    }

    /// Sends one output; a final one also ends the request here.
    fn emit(&mut self, id: SeqId, finish: Option<Finish>) {
        let Some(t) = self.requests.get_mut(&id) else { return };
        if finish.is_some() {
            t.metrics.finished_time = Some(unix_seconds(SystemTime::now()));
        }
        let output = build_output(t, finish.clone());
        let sink = &mut t.stream.sink;
        let delivered = catch_unwind(AssertUnwindSafe(|| sink.send(output))).unwrap_or(false);
        if finish.is_some() {
            let request_id = t.stream.request_id.clone();
            self.requests.remove(&id);
            self.forget(id, &request_id);
        } else if !delivered {
            t.gone = true;
            let _ = self.core.send(CoreCommand::Release(id));
        }
    }

    fn fail_all(&mut self, why: &str) {
        self.dead.get_or_insert_with(|| why.to_string());
        let ids: Vec<SeqId> = self.requests.keys().copied().collect();
        for id in ids {
            let Some(t) = self.requests.get_mut(&id) else { continue };
            if t.pending_final.is_some() {
                let finish = t.pending_final.clone();
                self.emit(id, finish);
            } else if let Some(mut t) = self.requests.remove(&id) {
                if !t.gone {
                    let sink = &mut t.stream.sink;
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        sink.fail(EngineError::engine_dead(why.to_string()))
                    }));
                }
                self.forget(id, &t.stream.request_id);
            }
        }
    }

    fn forget(&self, id: SeqId, request_id: &str) {
        if let Ok(mut live) = self.live.lock() {
            if live.get(request_id) == Some(&id) {
                live.remove(request_id);
            }
        }
    }
}

fn build_output(t: &mut Tracked, finish: Option<Finish>) -> RequestOutput {
    let params = &t.stream.params;
    let want_logprobs = params.logprobs.is_some();
    let (text, token_ids, logprobs) = match params.output_kind {
        OutputKind::Delta => {
            let text = t.text[t.sent_text..t.released].to_string();
            let tokens = t.token_ids[t.sent_tokens..].to_vec();
            let logprobs = t.logprobs.get(t.sent_tokens..).unwrap_or_default().to_vec();
            t.sent_text = t.released;
            t.sent_tokens = t.token_ids.len();
            (text, tokens, logprobs)
        }
        OutputKind::Cumulative | OutputKind::FinalOnly => (
            t.text[..t.released].to_string(),
            t.token_ids.clone(),
            t.logprobs.clone(),
        ),
    };
    let (finish_reason, stop_reason) = match finish.clone() {
        Some((r, s)) => (Some(r), s),
        None => (None, None),
    };
    RequestOutput {
        request_id: t.stream.request_id.clone(),
        prompt: t.stream.prompt.clone(),
        prompt_token_ids: t.stream.prompt_token_ids.clone(),
        outputs: vec![CompletionOutput {
            index: 0,
            text,
            token_ids,
            cumulative_logprob: want_logprobs.then_some(t.cumulative_logprob),
            logprobs: want_logprobs.then_some(logprobs),
            finish_reason,
            stop_reason,
        }],
        finished: finish.is_some(),
        metrics: t.metrics.clone(),
        num_cached_tokens: t.num_cached_tokens,
    }
}
