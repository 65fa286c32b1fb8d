//! Engine outputs -> Elixir structs (`%Vllm.RequestOutput{}`, `%Vllm.CompletionOutput{}`),
//! built as maps with `__struct__` so Elixir receives them ready to use.

use rustler::{Atom, Encoder, Env, Term};
use vllm_engine::{CompletionOutput, FinishReason, RequestMetrics, RequestOutput, StopReason, TokenLogprob};

use vllm_engine::lora::LoRARequest;

use crate::atoms;

/// A map with atom keys; keys come from this file only, so they are always valid atoms.
fn atom_map<'a>(env: Env<'a>, pairs: &[(&str, Term<'a>)]) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    for (key, value) in pairs {
        if let Ok(atom) = Atom::from_str(env, key) {
            if let Ok(next) = map.map_put(atom, *value) {
                map = next;
            }
        }
    }
    map
}

fn finish_reason<'a>(env: Env<'a>, reason: Option<FinishReason>) -> Term<'a> {
    match reason {
        None => atoms::nil().encode(env),
        Some(FinishReason::Stop) => atoms::stop().encode(env),
        Some(FinishReason::Length) => atoms::length().encode(env),
        Some(FinishReason::Abort) => atoms::abort().encode(env),
    }
}

/// vLLM's stop_reason: the stop string, the stop token id, or nil (EOS).
fn stop_reason<'a>(env: Env<'a>, reason: &Option<StopReason>) -> Term<'a> {
    match reason {
        None => atoms::nil().encode(env),
        Some(StopReason::Token(id)) => id.encode(env),
        Some(StopReason::Text(s)) => s.as_str().encode(env),
    }
}

/// One position's logprobs as `%{token_id => %{logprob: f, rank: r, decoded_token: s | nil}}`.
fn position_logprobs<'a>(env: Env<'a>, position: &[TokenLogprob]) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    for lp in position {
        let entry = atom_map(
            env,
            &[
                ("logprob", (lp.logprob as f64).encode(env)),
                ("rank", lp.rank.encode(env)),
                ("decoded_token", lp.decoded_token.as_deref().encode(env)),
            ],
        );
        if let Ok(next) = map.map_put(lp.token_id, entry) {
            map = next;
        }
    }
    map
}

fn logprobs<'a>(env: Env<'a>, logprobs: &Option<Vec<Vec<TokenLogprob>>>) -> Term<'a> {
    match logprobs {
        None => atoms::nil().encode(env),
        Some(positions) => positions
            .iter()
            .map(|p| position_logprobs(env, p))
            .collect::<Vec<_>>()
            .encode(env),
    }
}

/// vLLM's prompt_logprobs: nil for the first prompt token, then one map per position.
fn prompt_logprobs<'a>(env: Env<'a>, logprobs: &Option<Vec<Option<Vec<TokenLogprob>>>>) -> Term<'a> {
    match logprobs {
        None => atoms::nil().encode(env),
        Some(positions) => positions
            .iter()
            .map(|p| match p {
                Some(p) => position_logprobs(env, p),
                None => atoms::nil().encode(env),
            })
            .collect::<Vec<_>>()
            .encode(env),
    }
}

fn completion_output<'a>(env: Env<'a>, out: &CompletionOutput) -> Term<'a> {
    atom_map(
        env,
        &[
            ("__struct__", atoms::completion_output_struct().encode(env)),
            ("index", out.index.encode(env)),
            ("text", out.text.as_str().encode(env)),
            ("token_ids", out.token_ids.encode(env)),
            ("cumulative_logprob", out.cumulative_logprob.encode(env)),
            ("logprobs", logprobs(env, &out.logprobs)),
            ("finish_reason", finish_reason(env, out.finish_reason)),
            ("stop_reason", stop_reason(env, &out.stop_reason)),
        ],
    )
}

fn metrics<'a>(env: Env<'a>, m: &RequestMetrics) -> Term<'a> {
    atom_map(
        env,
        &[
            ("arrival_time", m.arrival_time.encode(env)),
            ("first_scheduled_time", m.first_scheduled_time.encode(env)),
            ("first_token_time", m.first_token_time.encode(env)),
            ("last_token_time", m.last_token_time.encode(env)),
            ("finished_time", m.finished_time.encode(env)),
            ("time_in_queue", m.time_in_queue.encode(env)),
        ],
    )
}

/// `%Vllm.LoRARequest{}` as the request gave it (nil: the base model).
fn lora_request<'a>(env: Env<'a>, lora: Option<&LoRARequest>) -> Term<'a> {
    let Some(l) = lora else {
        return atoms::nil().encode(env);
    };
    let path = l.lora_path.to_string_lossy();
    atom_map(
        env,
        &[
            ("__struct__", atoms::lora_request_struct().encode(env)),
            ("lora_name", l.lora_name.as_str().encode(env)),
            ("lora_int_id", l.lora_int_id.encode(env)),
            ("lora_path", path.as_ref().encode(env)),
        ],
    )
}

/// `%Vllm.RequestOutput{}` with every field of API.md.
pub fn request_output<'a>(env: Env<'a>, out: &RequestOutput) -> Term<'a> {
    atom_map(
        env,
        &[
            ("__struct__", atoms::request_output_struct().encode(env)),
            ("request_id", out.request_id.as_str().encode(env)),
            ("prompt", out.prompt.as_deref().encode(env)),
            ("prompt_token_ids", out.prompt_token_ids.encode(env)),
            ("prompt_logprobs", prompt_logprobs(env, &out.prompt_logprobs)),
            (
                "outputs",
                out.outputs
                    .iter()
                    .map(|o| completion_output(env, o))
                    .collect::<Vec<_>>()
                    .encode(env),
            ),
            ("finished", out.finished.encode(env)),
            ("metrics", metrics(env, &out.metrics)),
            ("lora_request", lora_request(env, out.lora_request.as_ref())),
            ("num_cached_tokens", out.num_cached_tokens.encode(env)),
        ],
    )
}
