//! Pooling requests (embed, encode, classify, score): submitted with `pooling_request`,
//! answered by one message `{:vllm_pooling, request_id, %Vllm.PoolingRequestOutput{}}` or
//! `{:vllm_error, request_id, {category, message}}` to the owner pid.

use rustler::{Atom, Encoder, Env, LocalPid, OwnedEnv, ResourceArc, Term, TermType};
use vllm_engine::{EngineError, PoolingOutput, PoolingParams, PoolingRequest, PoolingSink, PoolingTask, Result};

use crate::decode::{self, Prompt};
use crate::engine_ref::EngineRef;
use crate::{atoms, error};

/// Queues a pooling request. `prompt`: a string, `%{prompt: s}`, `%{prompt_token_ids: ids}`
/// or, for score, a `{text_a, text_b}` pair; `task`: "encode" | "embed" | "classify" |
/// "score"; `params`: `%{dimensions, normalize, use_activation}` (nil: the model's default).
/// DirtyCpu: tokenizing. Returns `:ok` or `{:error, {category, message}}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pooling_request<'a>(
    env: Env<'a>,
    resource: ResourceArc<EngineRef>,
    request_id: Term<'a>,
    prompt: Term<'a>,
    task: Term<'a>,
    params: Term<'a>,
    to: Term<'a>,
) -> Term<'a> {
    match submit(&resource, request_id, prompt, task, params, to) {
        Ok(()) => atoms::ok().encode(env),
        Err(err) => error::reply::<()>(env, Err(err)),
    }
}

/// `{:ok, [task]}`: what the loaded model serves ("generate", or pooling tasks).
#[rustler::nif]
fn supported_tasks<'a>(env: Env<'a>, resource: ResourceArc<EngineRef>) -> Term<'a> {
    error::reply(env, resource.engine().map(|e| e.supported_tasks()))
}

fn submit(resource: &EngineRef, request_id: Term, prompt: Term, task: Term, params: Term, to: Term) -> Result<()> {
    let request_id = decode::request_id(request_id)?;
    let task =
        PoolingTask::parse(&task.decode::<String>().map_err(|_| {
            EngineError::validation(format!("pooling task must be a string, got {}", decode::show(task)))
        })?)?;
    let params = pooling_params(params)?;
    let owner = to
        .decode::<LocalPid>()
        .map_err(|_| EngineError::validation(format!("`to` must be a local pid, got {}", decode::show(to))))?;
    let engine = resource.engine()?;
    let (ids, types) = match text_pair(prompt)? {
        Some((a, b)) => {
            let (ids, types) = engine.tokenize_pair(&a, &b)?;
            (ids, Some(types))
        }
        None => match decode::prompt(prompt)? {
            Prompt::Text(text) => (engine.tokenizer().encode(&text, true)?, None),
            Prompt::TokenIds(ids) => (ids, None),
        },
    };
    let request = PoolingRequest {
        request_id: request_id.clone(),
        prompt_token_ids: ids,
        token_type_ids: types,
        task,
        params,
    };
    engine.encode(request, Box::new(PoolingPidSink::new(request_id, owner)))
}

/// `{text_a, text_b}` (both strings) or None for any other term.
fn text_pair(term: Term) -> Result<Option<(String, String)>> {
    if term.get_type() != TermType::Tuple {
        return Ok(None);
    }
    term.decode::<(String, String)>().map(Some).map_err(|_| {
        EngineError::validation(format!(
            "a text pair must be {{text_a, text_b}} with two strings, got {}",
            decode::show(term)
        ))
    })
}

fn lookup<'a>(map: Term<'a>, key: &str) -> Option<Term<'a>> {
    let atom = Atom::from_str(map.get_env(), key).ok()?;
    let value = map.map_get(atom).ok()?;
    if value.decode::<Atom>().ok() == Some(atoms::nil()) {
        None
    } else {
        Some(value)
    }
}

fn pooling_params(map: Term) -> Result<PoolingParams> {
    if map.get_type() != TermType::Map {
        return Err(EngineError::validation(format!(
            "pooling params must be a map, got {}",
            decode::show(map)
        )));
    }
    let bool_of = |key: &str| -> Result<Option<bool>> {
        lookup(map, key)
            .map(|t| {
                t.decode::<bool>().map_err(|_| {
                    EngineError::validation(format!(
                        "pooling param `{key}` must be a boolean, got {}",
                        decode::show(t)
                    ))
                })
            })
            .transpose()
    };
    let dimensions = lookup(map, "dimensions")
        .map(|t| {
            t.decode::<usize>().ok().filter(|&d| d > 0).ok_or_else(|| {
                EngineError::validation(format!(
                    "pooling param `dimensions` must be a positive integer, got {}",
                    decode::show(t)
                ))
            })
        })
        .transpose()?;
    let params = PoolingParams {
        normalize: bool_of("normalize")?,
        dimensions,
        use_activation: bool_of("use_activation")?,
    };
    params.validate()?;
    Ok(params)
}

struct PoolingPidSink {
    request_id: String,
    owner: LocalPid,
    env: OwnedEnv,
}

impl PoolingPidSink {
    fn new(request_id: String, owner: LocalPid) -> Self {
        PoolingPidSink {
            request_id,
            owner,
            env: OwnedEnv::new(),
        }
    }
}

/// Sends from any thread: OwnedEnv cannot send from a scheduler thread, so that case goes
/// through a short-lived thread (the engine answers from its own threads in practice).
fn deliver(env: &mut OwnedEnv, to: LocalPid, request_id: String, message: Result<PoolingOutput>) -> bool {
    if rustler::thread::is_scheduler_thread() {
        std::thread::spawn(move || {
            let mut env = OwnedEnv::new();
            deliver(&mut env, to, request_id, message);
        });
        return true;
    }
    env.send_and_clear(&to, |env| match &message {
        Ok(output) => (atoms::vllm_pooling(), request_id.as_str(), output_term(env, output)).encode(env),
        Err(err) => (atoms::vllm_error(), request_id.as_str(), error::reason_term(env, err)).encode(env),
    })
    .is_ok()
}

impl PoolingSink for PoolingPidSink {
    fn send(&mut self, output: PoolingOutput) -> bool {
        deliver(&mut self.env, self.owner, self.request_id.clone(), Ok(output))
    }
    fn fail(&mut self, error: EngineError) {
        deliver(&mut self.env, self.owner, self.request_id.clone(), Err(error));
    }
}

fn struct_term<'a>(env: Env<'a>, module: &str, pairs: &[(&str, Term<'a>)]) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    let entries = std::iter::once(("__struct__", Atom::from_str(env, module).map(|a| a.encode(env))))
        .chain(pairs.iter().map(|(k, v)| (*k, Ok(*v))));
    for (key, value) in entries {
        if let (Ok(atom), Ok(value)) = (Atom::from_str(env, key), value) {
            if let Ok(next) = map.map_put(atom, value) {
                map = next;
            }
        }
    }
    map
}

/// `%Vllm.PoolingRequestOutput{outputs: %Vllm.EmbeddingOutput{} | %Vllm.ClassificationOutput{}
/// | %Vllm.ScoringOutput{}}` by task.
fn output_term<'a>(env: Env<'a>, output: &PoolingOutput) -> Term<'a> {
    let data: Vec<f64> = output.data.iter().map(|&x| x as f64).collect();
    let inner = match output.task {
        PoolingTask::Encode | PoolingTask::Embed => {
            struct_term(env, "Elixir.Vllm.EmbeddingOutput", &[("embedding", data.encode(env))])
        }
        PoolingTask::Classify => struct_term(env, "Elixir.Vllm.ClassificationOutput", &[("probs", data.encode(env))]),
        PoolingTask::Score => struct_term(
            env,
            "Elixir.Vllm.ScoringOutput",
            &[("score", data.first().copied().unwrap_or(f64::NAN).encode(env))],
        ),
    };
    struct_term(
        env,
        "Elixir.Vllm.PoolingRequestOutput",
        &[
            ("request_id", output.request_id.as_str().encode(env)),
            ("prompt_token_ids", output.prompt_token_ids.encode(env)),
            ("outputs", inner),
            ("finished", output.finished.encode(env)),
        ],
    )
}
