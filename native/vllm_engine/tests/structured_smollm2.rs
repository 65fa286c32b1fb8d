//! Structured outputs on the real model (SmolLM2 GGUF) at temperature 1: whatever the
//! seed, every output satisfies its JSON schema, regex or choice list; unconstrained
//! requests batched with constrained ones are unchanged; invalid constraints are
//! validation errors at request time.

mod common;
mod measure;

use common::smollm2_gguf;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use measure::{load_average, median, process_cpu_seconds};
use serde_json::{json, Value};
use vllm_engine::structured_output::StructuredOutputs;
use vllm_engine::tokenizer::ChatMessage;
use vllm_engine::{
    Engine, EngineArgs, EngineError, EngineRequest, ErrorCategory, FinishReason, OutputKind, OutputSink, RequestOutput,
    SamplingParams,
};

const SEEDS: u64 = 50;

fn engine() -> Engine {
    let mut args = EngineArgs::new(smollm2_gguf());
    args.max_model_len = Some(512);
    args.max_num_seqs = Some(64);
    Engine::new(args).unwrap_or_else(|e| panic!("cannot start the engine on SmolLM2: {e}"))
}

struct ChannelSink(Sender<Result<RequestOutput, EngineError>>);

impl OutputSink for ChannelSink {
    fn send(&mut self, output: RequestOutput) -> bool {
        self.0.send(Ok(output)).is_ok()
    }
    fn fail(&mut self, error: EngineError) {
        let _ = self.0.send(Err(error));
    }
}

fn chat_prompt(engine: &Engine, user: &str) -> Vec<u32> {
    let tok = engine.tokenizer();
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", user)], true, None)
        .expect("chat template");
    tok.encode(&text, false).expect("prompt encodes")
}

fn try_submit(
    engine: &Engine,
    id: &str,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<Receiver<Result<RequestOutput, EngineError>>, EngineError> {
    let (tx, rx) = unbounded();
    engine.add_request(EngineRequest::new(id, prompt, params), Box::new(ChannelSink(tx)))?;
    Ok(rx)
}

fn final_output(rx: &Receiver<Result<RequestOutput, EngineError>>) -> RequestOutput {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(o)) if o.finished => return o,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("request failed: {e}"),
            Err(e) => panic!("no final output in time: {e:?}"),
        }
    }
}

fn constrained(spec: StructuredOutputs, seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        max_tokens: Some(max_tokens),
        output_kind: OutputKind::FinalOnly,
        structured_outputs: Some(spec),
        ..Default::default()
    }
}

/// Runs one request per seed, all at once, and returns their texts (each must have
/// ended because its constraint was complete, not at max_tokens).
fn run_all_seeds(engine: &Engine, user: &str, spec: StructuredOutputs, max_tokens: usize) -> Vec<String> {
    let prompt = chat_prompt(engine, user);
    let receivers: Vec<_> = (0..SEEDS)
        .map(|seed| {
            try_submit(
                engine,
                &format!("{}-{seed}", spec.kind()),
                prompt.clone(),
                constrained(spec.clone(), seed, max_tokens),
            )
            .expect("request accepted")
        })
        .collect();
    receivers
        .iter()
        .enumerate()
        .map(|(seed, rx)| {
            let out = final_output(rx);
            let c = &out.outputs[0];
            assert_eq!(
                c.finish_reason,
                Some(FinishReason::Stop),
                "seed {seed} did not complete: {:?}",
                c.text
            );
            c.text.clone()
        })
        .collect()
}

/// The JSON Schema subset the tests use, checked strictly.
fn validate(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let fail = |m: String| Err(format!("{path}: {m} (value {value})"));
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        if !choices.contains(value) {
            return fail("not one of the enum".into());
        }
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        return Ok(());
    };
    match ty {
        "object" => {
            let Some(obj) = value.as_object() else {
                return fail("not an object".into());
            };
            let props = schema.get("properties").and_then(Value::as_object);
            for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                let key = key.as_str().unwrap_or_default();
                if !obj.contains_key(key) {
                    return fail(format!("missing required key {key}"));
                }
            }
            for (k, v) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => validate(sub, v, &format!("{path}.{k}"))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return fail(format!("unexpected key {k}"))
                    }
                    None => {}
                }
            }
        }
        "array" => {
            let Some(items) = value.as_array() else {
                return fail("not an array".into());
            };
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    return fail(format!("more than {max} items"));
                }
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    return fail(format!("fewer than {min} items"));
                }
            }
            for (i, item) in items.iter().enumerate() {
                validate(&schema["items"], item, &format!("{path}[{i}]"))?;
            }
        }
        "string" => {
            let Some(s) = value.as_str() else {
                return fail("not a string".into());
            };
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if s.chars().count() as u64 > max {
                    return fail(format!("longer than {max}"));
                }
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                if !regex::Regex::new(p).expect("test pattern compiles").is_match(s) {
                    return fail(format!("does not match {p}"));
                }
            }
        }
        "integer" | "number" => {
            let Some(n) = value.as_f64() else {
                return fail("not a number".into());
            };
            if ty == "integer" && !(value.is_i64() || value.is_u64()) {
                return fail("not an integer".into());
            }
            if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| n < m) {
                return fail("below minimum".into());
            }
            if schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| n > m) {
                return fail("above maximum".into());
            }
        }
        "boolean" if !value.is_boolean() => return fail("not a boolean".into()),
        _ => {}
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "score", "address"],
        "additionalProperties": false
    })
}

#[test]
fn every_seed_gives_json_that_validates_against_the_schema() {
    let engine = engine();
    let schema = person_schema();
    let texts = run_all_seeds(
        &engine,
        "Describe a person as JSON.",
        StructuredOutputs::Json(schema.to_string()),
        200,
    );
    for (seed, text) in texts.iter().enumerate() {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {text}"));
        validate(&schema, &value, "$").unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
    }
}

/// Any JSON object may run past max_tokens at temperature 1 (nothing bounds its size):
/// those that complete are objects, the others are cut-off objects.
#[test]
fn every_seed_gives_a_json_object_when_asked_for_any_object() {
    let engine = engine();
    let prompt = chat_prompt(&engine, "Give me a tiny JSON object with one key.");
    let receivers: Vec<_> = (0..SEEDS)
        .map(|seed| {
            try_submit(
                &engine,
                &format!("obj{seed}"),
                prompt.clone(),
                constrained(StructuredOutputs::JsonObject, seed, 64),
            )
            .expect("request accepted")
        })
        .collect();
    let mut complete = 0;
    for (seed, rx) in receivers.iter().enumerate() {
        let out = final_output(rx);
        let c = &out.outputs[0];
        if c.finish_reason == Some(FinishReason::Stop) {
            let value: Value =
                serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", c.text));
            assert!(value.is_object(), "seed {seed}: {value}");
            complete += 1;
        } else {
            assert!(c.text.trim_start().starts_with('{'), "seed {seed}: {:?}", c.text);
            assert!(
                serde_json::from_str::<Value>(&c.text).is_err(),
                "seed {seed} is complete yet did not stop"
            );
        }
    }
    println!("{complete} of {SEEDS} objects completed within 64 tokens");
}

#[test]
fn every_seed_matches_the_regex_and_picks_one_of_the_choices() {
    let engine = engine();
    let pattern = r"[A-Z][a-z]{2,8}-[0-9]{3}@(example|test)\.(com|org)";
    let texts = run_all_seeds(
        &engine,
        "Make up a user id.",
        StructuredOutputs::Regex(pattern.into()),
        40,
    );
    let full = regex::Regex::new(&format!("^(?:{pattern})$")).expect("test regex compiles");
    for (seed, text) in texts.iter().enumerate() {
        assert!(full.is_match(text), "seed {seed}: {text:?} does not match {pattern}");
    }

    let choices = vec![
        "positive".to_string(),
        "negative".to_string(),
        "neutral (mixed)".to_string(),
    ];
    let texts = run_all_seeds(
        &engine,
        "Is this review positive or negative? 'The food was cold.'",
        StructuredOutputs::Choice(choices.clone()),
        16,
    );
    for (seed, text) in texts.iter().enumerate() {
        assert!(choices.contains(text), "seed {seed}: {text:?} is not a choice");
    }
}

#[test]
fn a_lark_grammar_constrains_the_output() {
    let engine = engine();
    let grammar = r#"
        start: greeting " " name "!"
        greeting: "Hello" | "Hi"
        name: /[A-Z][a-z]{1,8}/
    "#;
    let texts = run_all_seeds(
        &engine,
        "Greet someone.",
        StructuredOutputs::Grammar(grammar.into()),
        24,
    );
    let full = regex::Regex::new(r"^(Hello|Hi) [A-Z][a-z]{1,8}!$").expect("test regex compiles");
    for (seed, text) in texts.iter().enumerate() {
        assert!(full.is_match(text), "seed {seed}: {text:?}");
    }
}

#[test]
fn unconstrained_requests_are_unchanged_by_constrained_neighbours() {
    let engine = engine();
    let prompts: Vec<Vec<u32>> = [
        "Tell me about cats.",
        "What is the capital of France?",
        "Count to five.",
    ]
    .iter()
    .map(|p| chat_prompt(&engine, p))
    .collect();
    let plain = SamplingParams {
        output_kind: OutputKind::FinalOnly,
        ..SamplingParams::greedy(24)
    };
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let rx = try_submit(&engine, &format!("solo{i}"), p.clone(), plain.clone()).expect("accepted");
            final_output(&rx).outputs[0].token_ids.clone()
        })
        .collect();

    let spec = StructuredOutputs::Json(person_schema().to_string());
    let mut receivers = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let c = try_submit(
            &engine,
            &format!("c{i}"),
            p.clone(),
            constrained(spec.clone(), i as u64, 200),
        );
        receivers.push((None, c.expect("accepted")));
        let u = try_submit(&engine, &format!("u{i}"), p.clone(), plain.clone()).expect("accepted");
        receivers.push((Some(i), u));
    }
    for (which, rx) in &receivers {
        let out = final_output(rx);
        match which {
            Some(i) => assert_eq!(out.outputs[0].token_ids, solo[*i], "unconstrained request {i} changed"),
            None => {
                let c = &out.outputs[0];
                let value: Value = serde_json::from_str(&c.text).unwrap_or_else(|e| {
                    panic!(
                        "constrained output is not JSON ({e}, {:?}): {:?}",
                        c.finish_reason, c.text
                    )
                });
                validate(&person_schema(), &value, "$").expect("constrained output validates");
            }
        }
    }
}

#[test]
fn invalid_constraints_are_validation_errors_and_the_engine_keeps_serving() {
    let engine = engine();
    let prompt = chat_prompt(&engine, "Hi");
    let bad = [
        StructuredOutputs::Json("{not json".into()),
        StructuredOutputs::Json(r#"{"type": "object", "properties": {"a": {"type": "no-such-type"}}}"#.into()),
        StructuredOutputs::Regex("([a-z]".into()),
        StructuredOutputs::Choice(vec![]),
        StructuredOutputs::Grammar("start: undefined_rule".into()),
        StructuredOutputs::Grammar("this is not a grammar ::: %%".into()),
    ];
    for (i, spec) in bad.into_iter().enumerate() {
        let err = try_submit(
            &engine,
            &format!("bad{i}"),
            prompt.clone(),
            constrained(spec.clone(), 0, 8),
        )
        .err()
        .unwrap_or_else(|| panic!("{spec:?} was accepted"));
        assert_eq!(err.category, ErrorCategory::Validation, "{spec:?}: {err}");
    }
    let rx = try_submit(
        &engine,
        "ok",
        prompt,
        constrained(StructuredOutputs::Choice(vec!["yes".into(), "no".into()]), 1, 8),
    )
    .expect("a valid request after the bad ones");
    let out = final_output(&rx);
    let text = out.outputs[0].text.clone();
    assert!(text == "yes" || text == "no", "{text:?}");
}

/// 32 JSON-schema requests against 32 unconstrained ones of the same length, in the same
/// engine, alternating (unconstrained, constrained) three times so that a shared machine's
/// changing load hits both sides of each pair alike; prints each pair's ratio of output
/// tok/s (wall) and of output tokens per CPU-second of this process, and their medians.
/// `cargo test --release -p vllm_engine --test structured_smollm2 measure -- --ignored --nocapture`
#[test]
#[ignore = "measurement: run by hand on a quiet machine"]
fn measure_constrained_throughput() {
    const PAIRS: usize = 3;
    let engine = engine();
    let prompt = chat_prompt(&engine, "Describe a person as JSON.");
    let spec = StructuredOutputs::Json(person_schema().to_string());
    let run = |name: &str, constrain: bool| {
        let start = Instant::now();
        let cpu_start = process_cpu_seconds();
        let receivers: Vec<_> = (0..32u64)
            .map(|seed| {
                let mut params = constrained(spec.clone(), seed, 48);
                if !constrain {
                    params.structured_outputs = None;
                }
                // Every request runs all 48 steps either way (a JSON answer is mostly
                // still open by then), so both runs have the same batch sizes.
                params.ignore_eos = true;
                try_submit(&engine, &format!("{name}-{seed}"), prompt.clone(), params).expect("accepted")
            })
            .collect();
        let tokens: usize = receivers
            .iter()
            .map(|rx| final_output(rx).outputs[0].token_ids.len())
            .sum();
        let cpu = process_cpu_seconds() - cpu_start;
        (
            tokens,
            tokens as f64 / start.elapsed().as_secs_f64(),
            tokens as f64 / cpu,
        )
    };
    run("warm-up", true); // builds the token trie and llguidance's caches
    println!("load average before: {}", load_average());
    let (mut ratios, mut cpu_ratios, mut plains, mut guideds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..PAIRS {
        let (_, plain, plain_cpu) = run(&format!("plain{r}"), false);
        let (tokens, guided, guided_cpu) = run(&format!("json{r}"), true);
        println!(
            "pair {r}: unconstrained {plain:.1} tok/s, JSON schema {guided:.1} tok/s ({tokens} tokens), ratio {:.3}; per CPU-second {plain_cpu:.1} vs {guided_cpu:.1}, ratio {:.3}",
            guided / plain,
            guided_cpu / plain_cpu
        );
        ratios.push(guided / plain);
        cpu_ratios.push(guided_cpu / plain_cpu);
        plains.push(plain);
        guideds.push(guided);
    }
    println!(
        "structured outputs throughput (medians of {PAIRS}): unconstrained {:.1} tok/s, JSON schema {:.1} tok/s; ratio of pairs {:.3} (wall), {:.3} (CPU time); load average after: {}",
        median(&mut plains),
        median(&mut guideds),
        median(&mut ratios),
        median(&mut cpu_ratios),
        load_average()
    );
}
