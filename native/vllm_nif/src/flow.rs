//! Back-pressure for a request's outputs. A `generate/5` stream passes a `Credit` (a
//! counter it bumps with `ack/1` for every output it takes from its mailbox) and a limit
//! of unread outputs. While that many are unread, the sink does not send: it merges each
//! new output into one pending output (delta texts and tokens concatenated, a cumulative
//! output replaced by the newer one) and sends it once the reader catches up or the
//! request finishes. A reader that never reads thus holds at most `max_unread + 1`
//! outputs of a request, and the engine at most one pending output.

use std::sync::atomic::{AtomicU64, Ordering};

use rustler::{Resource, ResourceArc};
use vllm_engine::{OutputKind, RequestOutput};

use crate::atoms;

/// Outputs a stream has taken from its mailbox.
pub struct Credit {
    consumed: AtomicU64,
}

#[rustler::resource_impl]
impl Resource for Credit {}

/// A fresh credit counter for one request.
#[rustler::nif]
fn new_credit() -> ResourceArc<Credit> {
    ResourceArc::new(Credit {
        consumed: AtomicU64::new(0),
    })
}

/// The reader took one output from its mailbox.
#[rustler::nif]
fn ack(credit: ResourceArc<Credit>) -> rustler::Atom {
    credit.consumed.fetch_add(1, Ordering::Relaxed);
    atoms::ok()
}

pub struct Flow {
    credit: ResourceArc<Credit>,
    max_unread: u64,
    kind: OutputKind,
    sent: u64,
    pending: Option<RequestOutput>,
}

impl Flow {
    pub fn new(credit: ResourceArc<Credit>, max_unread: u64, kind: OutputKind) -> Self {
        Flow {
            credit,
            max_unread: max_unread.max(1),
            kind,
            sent: 0,
            pending: None,
        }
    }

    /// The output to send now, or None when it waits (merged) for the reader.
    pub fn admit(&mut self, output: RequestOutput) -> Option<RequestOutput> {
        let output = match self.pending.take() {
            Some(pending) => merge(pending, output, self.kind),
            None => output,
        };
        let unread = self.sent.saturating_sub(self.credit.consumed.load(Ordering::Relaxed));
        if output.finished || unread < self.max_unread {
            self.sent += 1;
            Some(output)
        } else {
            self.pending = Some(output);
            None
        }
    }
}

/// One output saying what `earlier` then `later` said.
fn merge(mut earlier: RequestOutput, later: RequestOutput, kind: OutputKind) -> RequestOutput {
    if kind != OutputKind::Delta {
        // Cumulative (and final-only) outputs carry everything so far.
        return later;
    }
    for completion in later.outputs {
        match earlier.outputs.iter_mut().find(|c| c.index == completion.index) {
            Some(c) => {
                c.text.push_str(&completion.text);
                c.token_ids.extend_from_slice(&completion.token_ids);
                match (&mut c.logprobs, completion.logprobs) {
                    (Some(mine), Some(more)) => mine.extend(more),
                    (mine @ None, more) => *mine = more,
                    (Some(_), None) => {}
                }
                c.cumulative_logprob = completion.cumulative_logprob;
                c.finish_reason = completion.finish_reason;
                c.stop_reason = completion.stop_reason;
            }
            None => earlier.outputs.push(completion),
        }
    }
    earlier.outputs.sort_by_key(|c| c.index);
    if earlier.prompt_logprobs.is_none() {
        earlier.prompt_logprobs = later.prompt_logprobs;
    }
    earlier.finished = later.finished;
    earlier.metrics = later.metrics;
    earlier.num_cached_tokens = later.num_cached_tokens;
    earlier
}
