//! OutputSink that delivers a request's outputs as messages to its owner pid:
//! `{:vllm, request_id, %Vllm.RequestOutput{}}` and, on failure,
//! `{:vllm_error, request_id, {category, message}}`. When the request ends (finished output
//! or failure) a watcher pid, if any, gets `{:vllm_request_done, request_id}` so the engine
//! process can forget it.

use rustler::{Encoder, LocalPid, OwnedEnv};
use vllm_engine::{EngineError, OutputSink, RequestOutput};

use crate::flow::Flow;
use crate::{atoms, encode, error};

// Outputs are nearly every message: boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Message {
    Output(RequestOutput),
    Failure(EngineError),
    Done,
}

pub struct PidSink {
    request_id: String,
    owner: LocalPid,
    watcher: Option<LocalPid>,
    env: OwnedEnv,
    /// Back-pressure for a reader that acknowledges what it reads (see flow.rs).
    flow: Option<Flow>,
}

impl PidSink {
    pub fn new(request_id: String, owner: LocalPid, watcher: Option<LocalPid>) -> Self {
        PidSink {
            request_id,
            owner,
            watcher,
            env: OwnedEnv::new(),
            flow: None,
        }
    }

    pub fn with_flow(mut self, flow: Option<Flow>) -> Self {
        self.flow = flow;
        self
    }

    fn notify_done(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            deliver(&mut self.env, &watcher, &self.request_id, Message::Done);
        }
    }
}

/// Sends one message; false when the recipient is no longer alive.
fn deliver(env: &mut OwnedEnv, to: &LocalPid, request_id: &str, message: Message) -> bool {
    if rustler::thread::is_scheduler_thread() {
        // OwnedEnv cannot send from a scheduler thread (the engine may call a sink inside a
        // NIF call, e.g. on abort): hand the message to a short-lived thread instead. The
        // recipient's liveness is then unknown; report it alive, a later send will tell.
        let to = *to;
        let request_id = request_id.to_string();
        std::thread::spawn(move || {
            let mut env = OwnedEnv::new();
            deliver(&mut env, &to, &request_id, message);
        });
        return true;
    }
    env.send_and_clear(to, |env| match &message {
        Message::Output(output) => (atoms::vllm(), request_id, encode::request_output(env, output)).encode(env),
        Message::Failure(err) => (atoms::vllm_error(), request_id, error::reason_term(env, err)).encode(env),
        Message::Done => (atoms::vllm_request_done(), request_id).encode(env),
    })
    .is_ok()
}

impl OutputSink for PidSink {
    fn send(&mut self, output: RequestOutput) -> bool {
        let output = match self.flow.as_mut() {
            Some(flow) => match flow.admit(output) {
                Some(output) => output,
                // Held back (merged) until the reader catches up.
                None => return true,
            },
            None => output,
        };
        let finished = output.finished;
        let alive = deliver(&mut self.env, &self.owner, &self.request_id, Message::Output(output));
        if finished || !alive {
            self.notify_done();
        }
        alive
    }

    fn fail(&mut self, err: EngineError) {
        deliver(&mut self.env, &self.owner, &self.request_id, Message::Failure(err));
        self.notify_done();
    }
}

impl Drop for PidSink {
    /// The engine drops a sink when its request is gone for good; make sure the watcher
    /// hears. A sink dropped on a scheduler thread never left the `add_request` call (the
    /// request was refused, and the caller got the error): there is nothing to forget.
    fn drop(&mut self) {
        if !rustler::thread::is_scheduler_thread() {
            self.notify_done();
        }
    }
}
