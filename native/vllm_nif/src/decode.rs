//! Terms -> engine structs: engine options, sampling parameters and prompts. Every bad term
//! is a `:validation` error naming the argument or key; nothing here panics.

use std::path::PathBuf;

use rustler::{Atom, Binary, Decoder, Term, TermType};
use vllm_engine::config::{DType, Device, LoadFormat};
use vllm_engine::{EngineArgs, EngineError, OutputKind, Result, SamplingParams};

use crate::atoms;

/// A prompt as the caller gave it: text to tokenize, or token ids.
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// Looks up `key` (an atom) in a map; nil counts as absent.
fn lookup<'a>(map: Term<'a>, key: &str) -> Option<Term<'a>> {
    let atom = Atom::from_str(map.get_env(), key).ok()?;
    let value = map.map_get(atom).ok()?;
    if value.is_atom() && value.decode::<Atom>().ok() == Some(atoms::nil()) {
        None
    } else {
        Some(value)
    }
}

/// A term for an error message, cut short: a bad prompt may be a huge list.
pub fn show(term: Term) -> String {
    const LIMIT: usize = 120;
    let text = format!("{term:?}");
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn require_map(term: Term, what: &str) -> Result<()> {
    if term.get_type() == TermType::Map {
        Ok(())
    } else {
        Err(EngineError::validation(format!(
            "{what} must be a map, got {}",
            show(term)
        )))
    }
}

fn bad_type(what: &str, key: &str, expected: &str, term: Term) -> EngineError {
    EngineError::validation(format!("{what} `{key}` must be {expected}, got {}", show(term)))
}

/// `term.decode::<T>()`, except that an improper list (`[1 | 2]`) is a decode error:
/// rustler's list decoders panic on one.
pub fn proper<'a, T: Decoder<'a>>(term: Term<'a>) -> rustler::NifResult<T> {
    if term.get_type() == TermType::List && term.list_length().is_err() {
        return Err(rustler::Error::BadArg);
    }
    term.decode::<T>()
}

/// Decodes `map[key]` as `T` when present; `expected` describes `T` in the error message.
fn field<'a, T: Decoder<'a>>(map: Term<'a>, what: &str, key: &str, expected: &str) -> Result<Option<T>> {
    match lookup(map, key) {
        None => Ok(None),
        Some(term) => proper::<T>(term)
            .map(Some)
            .map_err(|_| bad_type(what, key, expected, term)),
    }
}

/// A number (integer or float) as f32.
fn float_field(map: Term, what: &str, key: &str) -> Result<Option<f32>> {
    match lookup(map, key) {
        None => Ok(None),
        Some(term) => term
            .decode::<f64>()
            .or_else(|_| term.decode::<i64>().map(|i| i as f64))
            .map(|v| Some(v as f32))
            .map_err(|_| bad_type(what, key, "a number", term)),
    }
}

/// A non-negative integer as usize.
fn count_field(map: Term, what: &str, key: &str) -> Result<Option<usize>> {
    match lookup(map, key) {
        None => Ok(None),
        Some(term) => match term.decode::<i64>() {
            Ok(v) if v >= 0 => Ok(Some(v as usize)),
            Ok(v) => Err(EngineError::validation(format!("{what} `{key}` must be >= 0, got {v}"))),
            Err(_) => Err(bad_type(what, key, "a non-negative integer", term)),
        },
    }
}

fn string_field(map: Term, what: &str, key: &str) -> Result<Option<String>> {
    field::<String>(map, what, key, "a string")
}

/// Engine options (`Vllm.AsyncLLMEngine.new/2`, already key-checked in Elixir) -> EngineArgs.
pub fn engine_args(opts: Term) -> Result<EngineArgs> {
    const WHAT: &str = "engine option";
    require_map(opts, "engine options")?;
    let model = string_field(opts, WHAT, "model")?.ok_or_else(|| {
        EngineError::validation("engine option `model` is required (a .gguf file or a model directory)")
    })?;
    let mut args = EngineArgs::new(PathBuf::from(model));
    args.tokenizer = string_field(opts, WHAT, "tokenizer")?.map(PathBuf::from);
    if let Some(dtype) = string_field(opts, WHAT, "dtype")? {
        args.dtype = DType::parse(&dtype)?;
    }
    if let Some(device) = string_field(opts, WHAT, "device")? {
        // "auto": the GPU when this NIF was built with CUDA, else the CPU. A CUDA device
        // asked of a CPU-only build is refused by `validate` below (:unsupported).
        args.device = match device.as_str() {
            "auto" if cfg!(feature = "cuda") => Device::Cuda(0),
            "auto" => Device::Cpu,
            other => Device::parse(other)?,
        };
    }
    if let Some(format) = string_field(opts, WHAT, "load_format")? {
        args.load_format = LoadFormat::parse(&format)?;
    }
    if let Some(b) = field::<bool>(opts, WHAT, "enforce_eager", "a boolean")? {
        args.enforce_eager = b;
    }
    if let Some(u) = field::<f64>(opts, WHAT, "gpu_memory_utilization", "a number")? {
        args.gpu_memory_utilization = u;
    }
    if let Some(seed) = field::<u64>(opts, WHAT, "seed", "a non-negative integer")? {
        args.seed = seed;
    }
    args.max_model_len = count_field(opts, WHAT, "max_model_len")?;
    args.max_num_seqs = count_field(opts, WHAT, "max_num_seqs")?;
    if let Some(n) = count_field(opts, WHAT, "tensor_parallel_size")? {
        args.tensor_parallel_size = n;
    }
    args.max_num_batched_tokens = count_field(opts, WHAT, "max_num_batched_tokens")?;
    if let Some(n) = count_field(opts, WHAT, "block_size")? {
        args.block_size = n;
    }
    args.kv_cache_memory_bytes = count_field(opts, WHAT, "kv_cache_memory_bytes")?;
    if let Some(b) = field::<bool>(opts, WHAT, "enable_prefix_caching", "a boolean")? {
        args.enable_prefix_caching = b;
    }
    if let Some(b) = field::<bool>(opts, WHAT, "enable_chunked_prefill", "a boolean")? {
        args.enable_chunked_prefill = b;
    }
    args.num_threads = count_field(opts, WHAT, "num_threads")?;
    if let Some(b) = field::<bool>(opts, WHAT, "enable_lora", "a boolean")? {
        args.enable_lora = b;
    }
    if let Some(n) = count_field(opts, WHAT, "max_loras")? {
        args.max_loras = n;
    }
    if let Some(n) = count_field(opts, WHAT, "max_lora_rank")? {
        args.max_lora_rank = n;
    }
    args.max_cpu_loras = count_field(opts, WHAT, "max_cpu_loras")?;
    if let Some(runner) = string_field(opts, WHAT, "runner")? {
        args.runner = runner;
    }
    args.quantization = string_field(opts, WHAT, "quantization")?;
    args.max_waiting_requests = count_field(opts, WHAT, "max_waiting_requests")?;
    args.validate()?;
    Ok(args)
}

fn output_kind(term: Term) -> Result<OutputKind> {
    match term.decode::<Atom>() {
        Ok(a) if a == atoms::cumulative() => Ok(OutputKind::Cumulative),
        Ok(a) if a == atoms::delta() => Ok(OutputKind::Delta),
        Ok(a) if a == atoms::final_only() => Ok(OutputKind::FinalOnly),
        _ => Err(EngineError::validation(format!(
            "sampling param `output_kind` must be :cumulative, :delta or :final_only, got {}",
            show(term)
        ))),
    }
}

/// `stop` may be one string or a list of strings, as in vLLM.
fn stop_strings(map: Term) -> Result<Vec<String>> {
    match lookup(map, "stop") {
        None => Ok(Vec::new()),
        Some(term) => term
            .decode::<String>()
            .map(|s| vec![s])
            .or_else(|_| proper::<Vec<String>>(term))
            .map_err(|_| bad_type("sampling param", "stop", "a string or a list of strings", term)),
    }
}

/// A `%Vllm.SamplingParams{}` (or a plain map with its keys) -> SamplingParams, validated.
pub fn sampling_params(map: Term) -> Result<SamplingParams> {
    const WHAT: &str = "sampling param";
    require_map(map, "sampling params")?;
    let mut p = SamplingParams::default();
    if let Some(n) = count_field(map, WHAT, "n")? {
        p.n = n;
    }
    macro_rules! float {
        ($name:ident) => {
            if let Some(v) = float_field(map, WHAT, stringify!($name))? {
                p.$name = v;
            }
        };
    }
    float!(presence_penalty);
    float!(frequency_penalty);
    float!(repetition_penalty);
    float!(temperature);
    float!(top_p);
    float!(min_p);
    if let Some(k) = field::<i32>(map, WHAT, "top_k", "an integer")? {
        p.top_k = k;
    }
    p.seed = field::<u64>(map, WHAT, "seed", "a non-negative integer")?;
    p.stop = stop_strings(map)?;
    if let Some(ids) = field::<Vec<u32>>(map, WHAT, "stop_token_ids", "a list of token ids")? {
        p.stop_token_ids = ids;
    }
    macro_rules! flag {
        ($name:ident) => {
            if let Some(v) = field::<bool>(map, WHAT, stringify!($name), "a boolean")? {
                p.$name = v;
            }
        };
    }
    flag!(ignore_eos);
    flag!(detokenize);
    flag!(skip_special_tokens);
    flag!(spaces_between_special_tokens);
    flag!(include_stop_str_in_output);
    // An explicit nil means "up to the context length"; an absent key keeps vLLM's 16.
    let max_tokens_present = Atom::from_str(map.get_env(), "max_tokens")
        .ok()
        .map(|k| map.map_get(k).is_ok())
        .unwrap_or(false);
    if max_tokens_present {
        p.max_tokens = count_field(map, WHAT, "max_tokens")?;
    }
    if let Some(n) = count_field(map, WHAT, "min_tokens")? {
        p.min_tokens = n;
    }
    p.logprobs = count_field(map, WHAT, "logprobs")?;
    p.prompt_logprobs = count_field(map, WHAT, "prompt_logprobs")?;
    if let Some(term) = lookup(map, "output_kind") {
        p.output_kind = output_kind(term)?;
    }
    if let Some(term) = lookup(map, "logit_bias") {
        p.logit_bias = logit_bias(term)?;
    }
    p.allowed_token_ids = field::<Vec<u32>>(map, WHAT, "allowed_token_ids", "a list of token ids")?;
    if let Some(term) = lookup(map, "bad_words") {
        p.bad_words = term
            .decode::<String>()
            .map(|s| vec![s])
            .or_else(|_| proper::<Vec<String>>(term))
            .map_err(|_| bad_type(WHAT, "bad_words", "a list of strings", term))?;
    }
    p.truncate_prompt_tokens = field::<i64>(map, WHAT, "truncate_prompt_tokens", "an integer (-1 or >= 1)")?;
    if let Some(term) = lookup(map, "structured_outputs") {
        p.structured_outputs = Some(structured_outputs(term)?);
    }
    p.validate()?;
    Ok(p)
}

/// `structured_outputs`: a map with exactly one of `json` (JSON text), `json_object: true`,
/// `regex`, `choice` (list of strings), `grammar` (Elixir encodes a schema map as text).
fn structured_outputs(term: Term) -> Result<vllm_engine::structured_output::StructuredOutputs> {
    use vllm_engine::structured_output::StructuredOutputs as S;
    const WHAT: &str = "structured_outputs";
    require_map(term, "sampling param `structured_outputs`")?;
    let text = |key: &str| field::<String>(term, WHAT, key, "a string");
    let mut found = Vec::new();
    if let Some(schema) = text("json")? {
        found.push(S::Json(schema));
    }
    if field::<bool>(term, WHAT, "json_object", "a boolean")? == Some(true) {
        found.push(S::JsonObject);
    }
    if let Some(rx) = text("regex")? {
        found.push(S::Regex(rx));
    }
    if let Some(choices) = field::<Vec<String>>(term, WHAT, "choice", "a list of strings")? {
        found.push(S::Choice(choices));
    }
    if let Some(grammar) = text("grammar")? {
        found.push(S::Grammar(grammar));
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EngineError::validation(
            "sampling param `structured_outputs` needs one of json, json_object, regex, choice, grammar",
        )),
        _ => Err(EngineError::validation(
            "sampling param `structured_outputs` takes only one of json, json_object, regex, choice, grammar",
        )),
    }
}

/// `logit_bias`: a map of token id (integer) to bias (number).
fn logit_bias(term: Term) -> Result<std::collections::HashMap<u32, f32>> {
    let bad = || bad_type("sampling param", "logit_bias", "a map of token id to number", term);
    let pairs: Vec<(Term, Term)> = rustler::types::map::MapIterator::new(term).ok_or_else(bad)?.collect();
    pairs
        .into_iter()
        .map(|(k, v)| {
            let id = k.decode::<u32>().map_err(|_| bad())?;
            let bias = v
                .decode::<f64>()
                .or_else(|_| v.decode::<i64>().map(|i| i as f64))
                .map_err(|_| bad())?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// A prompt: a UTF-8 binary, or a list of non-negative token ids.
pub fn prompt(term: Term) -> Result<Prompt> {
    if term.get_type() == TermType::Binary {
        let bin: Binary = term
            .decode()
            .map_err(|_| EngineError::validation("prompt must be a string"))?;
        let text =
            std::str::from_utf8(bin.as_slice()).map_err(|_| EngineError::validation("prompt must be valid UTF-8"))?;
        return Ok(Prompt::Text(text.to_string()));
    }
    proper::<Vec<u32>>(term).map(Prompt::TokenIds).map_err(|_| {
        EngineError::validation(format!(
            "prompt must be a string or a list of token ids (non-negative integers), got {}",
            show(term)
        ))
    })
}

/// The request id: a non-empty string.
pub fn request_id(term: Term) -> Result<String> {
    match term.decode::<String>() {
        Ok(id) if !id.is_empty() => Ok(id),
        _ => Err(EngineError::validation(format!(
            "request_id must be a non-empty string, got {}",
            show(term)
        ))),
    }
}

/// Per-request options besides sampling: `priority` (integer, lower runs first).
pub fn priority(opts: Term) -> Result<i32> {
    require_map(opts, "request options")?;
    Ok(field::<i32>(opts, "request option", "priority", "an integer")?.unwrap_or(0))
}

/// A LoRA request term: a map (or `%Vllm.LoRARequest{}`) with `lora_name`, `lora_int_id`
/// and `lora_path`.
pub fn lora_request_term(term: Term) -> Result<vllm_engine::lora::LoRARequest> {
    const WHAT: &str = "LoRA request";
    require_map(term, "a LoRA request")?;
    let id =
        lookup(term, "lora_int_id").ok_or_else(|| EngineError::validation("LoRA request `lora_int_id` is required"))?;
    crate::lora::lora_request(
        id,
        string_field(term, WHAT, "lora_name")?,
        string_field(term, WHAT, "lora_path")?,
    )
}

/// The request option `lora_request` (nil or absent: the base model).
pub fn lora_request(opts: Term) -> Result<Option<vllm_engine::lora::LoRARequest>> {
    require_map(opts, "request options")?;
    lookup(opts, "lora_request").map(lora_request_term).transpose()
}
