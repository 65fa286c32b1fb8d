//! Stopping and detokenization through the engine on a model that speaks a fixed script:
//! stop strings across tokens are never partly streamed, split emoji never show U+FFFD,
//! the final text is decode(all ids), special tokens, stop tokens, EOS and min_tokens,
//! detokenize false, truncate_prompt_tokens, and request validation.

mod sampling_common;

use sampling_common::*;
use vllm_engine::{Engine, EngineRequest, ErrorCategory, FinishReason, OutputKind, SamplingParams, StopReason};

const PROMPT_LEN: usize = 4;

fn script_prompt() -> Vec<u32> {
    vec![10, 11, 12, 13]
}

fn encode(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap()
}

fn run(engine: &Engine, params: SamplingParams) -> Vec<vllm_engine::RequestOutput> {
    collect(&submit(engine, "r", script_prompt(), params))
}

fn params(max_tokens: usize, f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::greedy(max_tokens);
    f(&mut p);
    p
}

#[test]
fn a_stop_string_over_three_tokens_is_never_partly_streamed_in_delta_mode() {
    let script = encode(" the cat sat on the mat and more");
    let engine = script_engine(PROMPT_LEN, script.clone());
    for include in [false, true] {
        let outs = run(
            &engine,
            params(script.len(), |p| {
                p.stop = vec!["cat sat on".into()];
                p.output_kind = OutputKind::Delta;
                p.include_stop_str_in_output = include;
            }),
        );
        let want = if include { " the cat sat on" } else { " the " };
        let joined: String = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
        assert_eq!(joined, want);
        for o in &outs {
            let t = &o.outputs[0].text;
            if !include {
                assert!(
                    !t.contains('c') && !t.contains("sat"),
                    "streamed part of the stop string: {t:?}"
                );
            }
        }
        let fin = &outs.last().unwrap().outputs[0];
        assert_eq!(fin.finish_reason, Some(FinishReason::Stop));
        assert_eq!(fin.stop_reason, Some(StopReason::Text("cat sat on".into())));
    }
}

#[test]
fn emoji_split_over_tokens_never_produce_a_replacement_character() {
    let text = " crab 🦀🦀 done 😀 ok 👩‍👩‍👧 café";
    let script = encode(text);
    let tok = tokenizer();
    assert!(
        script
            .iter()
            .any(|&t| tok.decode(&[t], true).unwrap().contains('\u{FFFD}')),
        "the script should split some character over tokens"
    );
    let engine = script_engine(PROMPT_LEN, script.clone());
    let outs = run(&engine, params(script.len(), |p| p.output_kind = OutputKind::Delta));
    for o in &outs {
        assert!(!o.outputs[0].text.contains('\u{FFFD}'), "delta {:?}", o.outputs[0].text);
    }
    let joined: String = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
    assert_eq!(joined, text);
}

#[test]
fn the_final_text_is_decoding_all_ids_at_once() {
    let tok = tokenizer();
    let text = " Hello, world! 12345 naïve façade — 日本語のテキスト 🦀 <b>tags</b>\n\tend";
    let script = encode(text);
    let engine = script_engine(PROMPT_LEN, script.clone());
    for kind in [OutputKind::Cumulative, OutputKind::FinalOnly] {
        let outs = run(&engine, params(script.len(), |p| p.output_kind = kind));
        let fin = &outs.last().unwrap().outputs[0];
        assert_eq!(fin.token_ids, script);
        assert_eq!(fin.text, tok.decode(&fin.token_ids, true).unwrap());
        if kind == OutputKind::FinalOnly {
            assert_eq!(outs.len(), 1);
        }
    }
}

#[test]
fn special_tokens_are_skipped_or_kept_without_spaces_between_them() {
    let tok = tokenizer();
    let start = tok.token_to_id("<|im_start|>").unwrap();
    let endoftext = tok.token_to_id("<|endoftext|>").unwrap();
    let mut script = encode(" a");
    script.extend([start, endoftext]);
    script.extend(encode(" b"));
    let engine = script_engine(PROMPT_LEN, script.clone());
    let text = |skip: bool, spaces: bool| {
        let outs = run(
            &engine,
            params(script.len(), |p| {
                p.skip_special_tokens = skip;
                p.spaces_between_special_tokens = spaces;
            }),
        );
        outs.last().unwrap().outputs[0].text.clone()
    };
    assert_eq!(text(true, true), " a b");
    assert_eq!(text(false, false), " a<|im_start|><|endoftext|> b");
    // As vLLM's fast-tokenizer path: the text is the tokenizer's own decode.
    assert_eq!(text(false, true), tok.decode(&script, false).unwrap());
}

#[test]
fn stop_token_ids_eos_ignore_eos_and_min_tokens() {
    let mut script = encode(" one two three");
    let three = *script.last().unwrap();
    script.push(EOS);
    let engine = script_engine(PROMPT_LEN, script.clone());

    // A stop token: its text is left out unless include_stop_str_in_output.
    for include in [false, true] {
        let outs = run(
            &engine,
            params(20, |p| {
                p.stop_token_ids = vec![three];
                p.include_stop_str_in_output = include;
            }),
        );
        let fin = &outs.last().unwrap().outputs[0];
        assert_eq!(fin.finish_reason, Some(FinishReason::Stop));
        assert_eq!(fin.stop_reason, Some(StopReason::Token(three)));
        assert_eq!(fin.text, if include { " one two three" } else { " one two" });
    }
    // EOS: stop with no stop_reason.
    let outs = run(&engine, params(20, |_| {}));
    let fin = &outs.last().unwrap().outputs[0];
    assert_eq!(
        (fin.finish_reason, fin.stop_reason.clone()),
        (Some(FinishReason::Stop), None)
    );
    assert_eq!(fin.token_ids.last(), Some(&EOS));
    assert_eq!(fin.text, " one two three");
    // ignore_eos: runs to max_tokens (the script repeats EOS).
    let outs = run(&engine, params(9, |p| p.ignore_eos = true));
    let fin = &outs.last().unwrap().outputs[0];
    assert_eq!(fin.finish_reason, Some(FinishReason::Length));
    assert_eq!(fin.token_ids.len(), 9);
    // min_tokens: EOS and stop tokens are masked until reached.
    let outs = run(
        &engine,
        params(30, |p| {
            p.min_tokens = 7;
            p.stop_token_ids = vec![three];
        }),
    );
    let fin = &outs.last().unwrap().outputs[0];
    assert!(fin.token_ids.len() >= 7, "{:?}", fin.token_ids);
    assert!(!fin.token_ids[..6].contains(&EOS) && !fin.token_ids[..6].contains(&three));
    assert_eq!(fin.finish_reason, Some(FinishReason::Stop));
}

#[test]
fn detokenize_false_gives_ids_without_text() {
    let script = encode(" one two three");
    let engine = script_engine(PROMPT_LEN, script.clone());
    let outs = run(
        &engine,
        params(3, |p| {
            p.detokenize = false;
            p.logprobs = Some(1);
        }),
    );
    let fin = &outs.last().unwrap().outputs[0];
    assert_eq!(fin.token_ids, script[..3]);
    assert_eq!(fin.text, "");
    assert!(fin.logprobs.as_ref().unwrap()[0][0].decoded_token.is_none());
    let (s, _rx) = sink();
    let p = params(3, |p| {
        p.detokenize = false;
        p.stop = vec!["two".into()];
    });
    let err = engine
        .add_request(EngineRequest::new("x", script_prompt(), p), s)
        .unwrap_err();
    assert_eq!(err.category, ErrorCategory::Validation);
}

#[test]
fn truncate_prompt_tokens_keeps_the_last_tokens() {
    let script = encode(" one two three");
    let engine = script_engine(PROMPT_LEN, script.clone());
    let long: Vec<u32> = (100..110).collect();
    let outs = collect(&submit(
        &engine,
        "t",
        long.clone(),
        params(3, |p| p.truncate_prompt_tokens = Some(PROMPT_LEN as i64)),
    ));
    let o = outs.last().unwrap();
    assert_eq!(o.prompt_token_ids, long[6..]);
    // The model saw a prompt of PROMPT_LEN tokens: the script starts from its beginning.
    assert_eq!(o.outputs[0].token_ids, script[..3]);
    // -1: up to the context length, so a short prompt stays whole.
    let outs = collect(&submit(
        &engine,
        "t2",
        long.clone(),
        params(2, |p| p.truncate_prompt_tokens = Some(-1)),
    ));
    assert_eq!(outs.last().unwrap().prompt_token_ids, long);
}

#[test]
fn bad_words_through_the_engine_are_never_generated() {
    let cat = encode(" cat")[0];
    let dog = encode(" dog")[0];
    let engine = fixed_engine(vec![cat, dog], vec![5.0, 0.0]);
    let outs = collect(&submit(
        &engine,
        "bw",
        vec![10, 11],
        params(5, |p| p.bad_words = vec!["cat".into()]),
    ));
    assert_eq!(outs.last().unwrap().outputs[0].token_ids, vec![dog; 5]);
}

#[test]
fn invalid_sampling_fields_are_validation_errors_naming_the_field() {
    let engine = script_engine(PROMPT_LEN, encode(" a"));
    let bad: Vec<(&str, SamplingParams)> = vec![
        (
            "logit_bias",
            params(1, |p| {
                p.logit_bias.insert(VOCAB as u32, 1.0);
            }),
        ),
        (
            "allowed_token_ids",
            params(1, |p| p.allowed_token_ids = Some(vec![5, VOCAB as u32 + 3])),
        ),
        ("allowed_token_ids", params(1, |p| p.allowed_token_ids = Some(vec![]))),
        ("stop_token_ids", params(1, |p| p.stop_token_ids = vec![u32::MAX])),
        ("bad_words", params(1, |p| p.bad_words = vec!["  ".into()])),
        ("logprobs", params(1, |p| p.logprobs = Some(21))),
        ("prompt_logprobs", params(1, |p| p.prompt_logprobs = Some(50))),
        (
            "truncate_prompt_tokens",
            params(1, |p| p.truncate_prompt_tokens = Some(0)),
        ),
        (
            "logit_bias",
            params(1, |p| {
                p.logit_bias.insert(3, f32::NAN);
            }),
        ),
    ];
    for (field, p) in bad {
        let (s, _rx) = sink();
        let err = engine
            .add_request(EngineRequest::new("bad", script_prompt(), p), s)
            .unwrap_err();
        assert_eq!(err.category, ErrorCategory::Validation, "{field}: {err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}
