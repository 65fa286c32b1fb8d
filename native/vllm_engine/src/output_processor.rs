//! The output thread: turns each request's sampled tokens into RequestOutputs. It
//! detokenizes incrementally, applies stop strings (holding back text that could still
//! become one), honours the output kind, and delivers to the request's sink.
//!
//! A request with n > 1 is n child sequences in the core; here they are gathered back
//! into one RequestOutput per step whose `outputs` carry every child, by `index`.
//!
//! Guarantees: every request ends with exactly one final output (or one `fail`), nothing
//! follows it, and when a final output is delivered all of the request's KV blocks are
//! already free (a child stopped by a stop string waits for the core's `Released`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
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

/// Caller request ids of live requests and their child sequences, shared with the
/// Engine (duplicate checks, abort).
pub type LiveRequests = Arc<Mutex<HashMap<String, Vec<SeqId>>>>;

type Finish = (FinishReason, Option<StopReason>);

/// Per prompt position: None for the first token, else its logprob then the top-k.
pub type PromptLogprobs = Vec<Option<Vec<TokenLogprob>>>;

pub enum OutputMessage {
    Register(Box<RequestStream>),
    Step(Vec<TokenEvent>),
    /// Logprobs of prompt tokens `first..first + entries.len()` (a prefill chunk's worth).
    PromptLogprobs {
        seq_id: SeqId,
        first: usize,
        entries: Vec<Vec<TokenLogprob>>,
    },
    /// The core has forgotten the sequence and freed its blocks.
    Released(SeqId),
    Dead(String),
    Shutdown,
}

/// What the output thread needs to know about a request, registered before the core sees it.
pub struct RequestStream {
    /// One sequence per output index (n of them).
    pub seq_ids: Vec<SeqId>,
    pub request_id: String,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub arrival_time: SystemTime,
    pub sink: Box<dyn OutputSink>,
    /// Echoed in every output as `lora_request`.
    pub lora: Option<crate::lora::LoRARequest>,
}

/// One child sequence's output so far.
struct Child {
    seq_id: SeqId,
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
    /// Why it finished, once known (a stop string is known before the core forgets it).
    finish: Option<Finish>,
    /// The core has forgotten it and freed its blocks.
    freed: bool,
}

/// One request: its sink and its children.
struct Tracked {
    stream: RequestStream,
    children: Vec<Child>,
    prompt_logprobs: Option<PromptLogprobs>,
    prompt_logprobs_sent: bool,
    metrics: RequestMetrics,
    /// The receiver is gone: send nothing more.
    gone: bool,
    /// Prompt tokens the prefix cache supplied (from the core's first token event).
    num_cached_tokens: usize,
}

impl Tracked {
    fn all_freed(&self) -> bool {
        self.children.iter().all(|c| c.freed)
    }
}

pub struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    messages: Receiver<OutputMessage>,
    core: Sender<CoreCommand>,
    live: LiveRequests,
    shared: Arc<CoreShared>,
    /// Keyed by the request's first child's seq id.
    requests: HashMap<SeqId, Tracked>,
    /// Child seq id -> (request key, output index).
    children: HashMap<SeqId, (SeqId, usize)>,
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
            children: HashMap::new(),
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
                self.shared.dead.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = self.core.send(CoreCommand::Shutdown);
                let why = format!("output processing panicked: {why}");
                self.fail_all(&why);
                self.shared.notify_death(&why);
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
                // One output per request per step, whatever number of its children stepped.
                let mut touched = Vec::new();
                for e in events {
                    if let Some(key) = self.on_token(e) {
                        if !touched.contains(&key) {
                            touched.push(key);
                        }
                    }
                }
                for key in touched {
                    self.progress(key);
                }
                let tid = crate::profiler::OUTPUT_THREAD;
                self.shared
                    .profiler
                    .record("detokenize", tid, started, &[("num_seqs", n)]);
            }
            OutputMessage::PromptLogprobs { seq_id, first, entries } => self.on_prompt_logprobs(seq_id, first, entries),
            OutputMessage::Released(id) => self.on_released(id),
            OutputMessage::Dead(why) => self.fail_all(&why),
            OutputMessage::Shutdown => {}
        }
    }

    fn register(&mut self, mut stream: RequestStream) {
        let key = stream.seq_ids.first().copied();
        let (Some(key), None) = (key, self.dead.as_ref()) else {
            let why = self.dead.clone().unwrap_or_else(|| "request without sequences".into());
            stream.sink.fail(EngineError::engine_dead(why));
            self.forget(&stream.seq_ids, &stream.request_id);
            return;
        };
        let metrics = RequestMetrics {
            arrival_time: unix_seconds(stream.arrival_time),
            ..Default::default()
        };
        // In the prompt's context, as vLLM: SentencePiece keeps the first token's leading space.
        let skip = stream.params.skip_special_tokens;
        let children = stream
            .seq_ids
            .iter()
            .enumerate()
            .map(|(index, &seq_id)| {
                self.children.insert(seq_id, (key, index));
                Child {
                    seq_id,
                    detok: IncrementalDetokenizer::with_prompt(&self.tokenizer, &stream.prompt_token_ids, skip)
                        .unwrap_or_else(|_| IncrementalDetokenizer::new(skip)),
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    cumulative_logprob: 0.0,
                    text: String::new(),
                    released: 0,
                    sent_text: 0,
                    sent_tokens: 0,
                    finish: None,
                    freed: false,
                }
            })
            .collect();
        // The first prompt token has no logprob (nothing predicts it), as vLLM.
        let num_prompt = stream.prompt_token_ids.len();
        let prompt_logprobs = stream.params.prompt_logprobs.map(|_| vec![None; num_prompt]);
        let t = Tracked {
            stream,
            children,
            prompt_logprobs,
            prompt_logprobs_sent: false,
            metrics,
            gone: false,
            num_cached_tokens: 0,
        };
        self.requests.insert(key, t);
    }

    fn on_prompt_logprobs(&mut self, seq_id: SeqId, first: usize, entries: Vec<Vec<TokenLogprob>>) {
        let Some(&(key, _)) = self.children.get(&seq_id) else {
            return;
        };
        let Some(t) = self.requests.get_mut(&key) else { return };
        let detokenize = t.stream.params.detokenize;
        let Some(all) = t.prompt_logprobs.as_mut() else { return };
        for (i, mut entry) in entries.into_iter().enumerate() {
            // A preempted request recomputes its prompt: keep what came first.
            if let Some(slot @ None) = all.get_mut(first + i).filter(|_| first + i > 0) {
                if detokenize {
                    for lp in &mut entry {
                        lp.decoded_token = self.tokenizer.decode(&[lp.token_id], false).ok();
                    }
                }
                *slot = Some(entry);
            }
        }
    }

    /// Takes one sampled token; returns the request to report on after the step, if any.
    fn on_token(&mut self, ev: TokenEvent) -> Option<SeqId> {
        let id = ev.seq_id;
        let &(key, index) = self.children.get(&id)?;
        let t = self.requests.get_mut(&key)?;
        let c = t.children.get_mut(index)?;
        if c.finish.is_some() || t.gone {
            // Its remaining tokens are dropped; if the core finished it meanwhile, it has
            // already freed it (a Released for it may still come, and changes nothing).
            if ev.finish.is_some() {
                c.freed = true;
                c.finish.get_or_insert((FinishReason::Abort, None));
                return Some(key);
            }
            return None;
        }
        let now = unix_seconds(SystemTime::now());
        t.metrics.first_token_time.get_or_insert(now);
        if t.metrics.first_scheduled_time.is_none() {
            t.metrics.first_scheduled_time = ev.first_scheduled_time;
            t.metrics.time_in_queue = ev.first_scheduled_time.map(|s| (s - t.metrics.arrival_time).max(0.0));
        }
        t.metrics.last_token_time = Some(now);
        if index == 0 {
            t.num_cached_tokens = ev.num_cached_tokens;
        }
        c.token_ids.push(ev.token_id);
        c.cumulative_logprob += ev.logprob as f64;
        let params = &t.stream.params;
        if let Some(mut lps) = ev.logprobs {
            if params.detokenize {
                for lp in &mut lps {
                    lp.decoded_token = self.tokenizer.decode(&[lp.token_id], false).ok();
                }
            }
            c.logprobs.push(lps);
        }

        // As vLLM: the text of an EOS or stop token is not part of the output.
        let stopped_by_token = matches!(ev.finish, Some((FinishReason::Stop, _)));
        let detokenize = params.detokenize && (!stopped_by_token || params.include_stop_str_in_output);
        if detokenize {
            let delta = c.detok.push(&self.tokenizer, ev.token_id).unwrap_or_default();
            c.text.push_str(&delta);
        }

        if params.detokenize && !params.stop.is_empty() && c.token_ids.len() > params.min_tokens {
            if let Some((at, stop)) = find_stop(&c.text, c.released, &params.stop) {
                let end = if params.include_stop_str_in_output {
                    at + stop.len()
                } else {
                    at
                };
                c.finish = Some((FinishReason::Stop, Some(StopReason::Text(stop.to_string()))));
                c.text.truncate(end);
                c.released = end;
                if ev.finish.is_some() {
                    c.freed = true;
                    return Some(key);
                }
                // Reported once the core has freed it.
                let _ = self.core.send(CoreCommand::Release(id));
                return None;
            }
        }

        if let Some(finish) = ev.finish {
            if detokenize {
                let rest = c.detok.flush(&self.tokenizer).unwrap_or_default();
                c.text.push_str(&rest);
            }
            c.released = c.text.len();
            c.finish = Some(finish);
            c.freed = true;
        } else {
            let hold = hold_back(&c.text, &params.stop);
            c.released = c.released.max(c.text.len() - hold);
        }
        Some(key)
    }

    fn on_released(&mut self, id: SeqId) {
        let Some(&(key, index)) = self.children.get(&id) else {
            return;
        };
        let Some(t) = self.requests.get_mut(&key) else { return };
        let Some(c) = t.children.get_mut(index) else { return };
        if c.freed {
            return;
        }
        c.freed = true;
        c.finish.get_or_insert((FinishReason::Abort, None));
        self.progress(key);
    }

    /// After a change to a request: its final output once every child is done and freed,
    /// else (when streaming) an output with what is new.
    fn progress(&mut self, key: SeqId) {
        let Some(t) = self.requests.get(&key) else { return };
        if t.all_freed() {
            if t.gone {
                self.remove(key);
            } else {
                self.emit(key, true);
            }
        } else if !t.gone && t.stream.params.output_kind != OutputKind::FinalOnly {
            self.emit(key, false);
        }
    }

    /// Sends one output; a final one also ends the request here.
    fn emit(&mut self, key: SeqId, last: bool) {
        let Some(t) = self.requests.get_mut(&key) else { return };
        if last {
            t.metrics.finished_time = Some(unix_seconds(SystemTime::now()));
        }
        let output = build_output(t, last);
        let sink = &mut t.stream.sink;
        let delivered = catch_unwind(AssertUnwindSafe(|| sink.send(output))).unwrap_or(false);
        if last {
            self.remove(key);
        } else if !delivered {
            t.gone = true;
            for c in t.children.iter().filter(|c| !c.freed) {
                let _ = self.core.send(CoreCommand::Release(c.seq_id));
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        self.dead.get_or_insert_with(|| why.to_string());
        let keys: Vec<SeqId> = self.requests.keys().copied().collect();
        for key in keys {
            let Some(t) = self.requests.get_mut(&key) else { continue };
            if !t.gone && t.children.iter().all(|c| c.finish.is_some()) {
                self.emit(key, true);
                continue;
            }
            if !t.gone {
                let sink = &mut t.stream.sink;
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    sink.fail(EngineError::engine_dead(why.to_string()))
                }));
            }
            self.remove(key);
        }
    }

    fn remove(&mut self, key: SeqId) {
        if let Some(t) = self.requests.remove(&key) {
            for id in &t.stream.seq_ids {
                self.children.remove(id);
            }
            self.forget(&t.stream.seq_ids, &t.stream.request_id);
        }
    }

    fn forget(&self, seq_ids: &[SeqId], request_id: &str) {
        if let Ok(mut live) = self.live.lock() {
            if live.get(request_id).map(Vec::as_slice) == Some(seq_ids) {
                live.remove(request_id);
            }
        }
    }
}

fn build_output(t: &mut Tracked, last: bool) -> RequestOutput {
    let params = &t.stream.params;
    let want_logprobs = params.logprobs.is_some();
    let delta = params.output_kind == OutputKind::Delta;
    let outputs = t
        .children
        .iter_mut()
        .enumerate()
        .map(|(index, c)| {
            let (text, token_ids, logprobs) = if delta {
                let text = c.text[c.sent_text..c.released].to_string();
                let tokens = c.token_ids[c.sent_tokens..].to_vec();
                let logprobs = c.logprobs.get(c.sent_tokens..).unwrap_or_default().to_vec();
                c.sent_text = c.released;
                c.sent_tokens = c.token_ids.len();
                (text, tokens, logprobs)
            } else {
                (
                    c.text[..c.released].to_string(),
                    c.token_ids.clone(),
                    c.logprobs.clone(),
                )
            };
            // A child still running at the end was cut short by an abort.
            let finish = c.finish.clone().or(last.then_some((FinishReason::Abort, None)));
            let (finish_reason, stop_reason) = match finish {
                Some((r, s)) => (Some(r), s),
                None => (None, None),
            };
            CompletionOutput {
                index,
                text,
                token_ids,
                cumulative_logprob: want_logprobs.then_some(c.cumulative_logprob),
                logprobs: want_logprobs.then_some(logprobs),
                finish_reason,
                stop_reason,
            }
        })
        .collect();
    // As vLLM: delta outputs carry the prompt logprobs once, the others every time.
    let prompt_logprobs = if delta && t.prompt_logprobs_sent {
        None
    } else {
        t.prompt_logprobs.clone()
    };
    t.prompt_logprobs_sent = true;
    RequestOutput {
        request_id: t.stream.request_id.clone(),
        prompt: t.stream.prompt.clone(),
        prompt_token_ids: t.stream.prompt_token_ids.clone(),
        prompt_logprobs,
        outputs,
        finished: last,
        metrics: t.metrics.clone(),
        num_cached_tokens: t.num_cached_tokens,
        lora_request: t.stream.lora.clone(),
    }
}
