//! Stop conditions and output kinds: stop strings (held back, truncated, across token
//! boundaries), stop token ids, EOS, min_tokens, max_tokens, context length.

mod engine_common;

use engine_common::*;
use vllm_engine::{FinishReason, OutputKind, RequestOutput, SamplingParams, StopReason};

/// The text after each prefix of `tokens`, as the engine would stream it.
fn texts(tokens: &[u32]) -> Vec<String> {
    let tok = tokenizer();
    (0..=tokens.len())
        .map(|n| tok.decode(&tokens[..n], true).unwrap())
        .collect()
}

/// A stop string made of the last 2 characters of the first `k` tokens' text and the
/// first 2 of the next token: it only appears across a token boundary.
fn boundary_stop(tokens: &[u32], k: usize) -> String {
    let t = texts(tokens);
    let (before, after) = (&t[k], &t[k + 1]);
    let start = before.char_indices().rev().nth(1).unwrap().0;
    let end = before.len()
        + after[before.len()..]
            .char_indices()
            .nth(2)
            .map_or(after.len() - before.len(), |(i, _)| i);
    after[start..end].to_string()
}

fn last(outs: &[RequestOutput]) -> &vllm_engine::CompletionOutput {
    &outs.last().unwrap().outputs[0]
}

#[test]
fn a_stop_string_across_tokens_truncates_the_text_and_is_never_streamed() {
    let h = engine();
    let p = prompt(7, 11);
    let reference = reference_greedy(&h.palette, &p, 40);
    let stop = boundary_stop(&reference, 6);
    let full = texts(&reference);
    let at = full[40].find(&stop).unwrap();
    let tokens_needed = full.iter().position(|t| t.contains(&stop)).unwrap();

    let mut params = SamplingParams::greedy(40);
    params.stop = vec!["never appears".into(), stop.clone()];
    let outs = collect(&submit(&h.engine, "stop", p.clone(), params.clone()));
    let fin = last(&outs);
    assert_eq!(fin.text, full[40][..at]);
    assert_eq!(fin.finish_reason, Some(FinishReason::Stop));
    assert_eq!(fin.stop_reason, Some(StopReason::Text(stop.clone())));
    assert_eq!(fin.token_ids, reference[..tokens_needed]);
    for o in &outs {
        assert!(
            fin.text.starts_with(&o.outputs[0].text),
            "streamed {:?} beyond the stop",
            o.outputs[0].text
        );
    }

    params.include_stop_str_in_output = true;
    params.output_kind = OutputKind::Delta;
    let outs = collect(&submit(&h.engine, "stop-incl", p, params));
    let streamed: String = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
    assert_eq!(streamed, full[40][..at + stop.len()]);
    assert_all_blocks_free(&h.engine);
}

#[test]
fn a_stop_token_ends_the_request_without_its_text() {
    let h = engine();
    let p = prompt(8, 9);
    let reference = reference_greedy(&h.palette, &p, 30);
    let stop_token = reference[5];
    let first = reference.iter().position(|&t| t == stop_token).unwrap();
    let mut params = SamplingParams::greedy(30);
    params.stop_token_ids = vec![stop_token];
    let outs = collect(&submit(&h.engine, "st", p, params));
    let fin = last(&outs);
    assert_eq!(fin.token_ids, reference[..=first]);
    assert_eq!(fin.finish_reason, Some(FinishReason::Stop));
    assert_eq!(fin.stop_reason, Some(StopReason::Token(stop_token)));
    assert_eq!(fin.text, texts(&reference)[first]);
    assert_all_blocks_free(&h.engine);
}

#[test]
fn eos_stops_unless_ignored_or_before_min_tokens() {
    let p = prompt(9, 10);
    let h = engine_with(
        args(),
        FakeBehaviour {
            eos_at_context_len: Some(p.len() + 5),
            ..Default::default()
        },
    );
    let reference = reference_greedy(&h.palette, &p, 5);

    let outs = collect(&submit(&h.engine, "eos", p.clone(), SamplingParams::greedy(20)));
    let fin = last(&outs);
    assert_eq!(fin.token_ids, [reference.clone(), vec![EOS]].concat());
    assert_eq!(
        (fin.finish_reason, fin.stop_reason.clone()),
        (Some(FinishReason::Stop), None)
    );
    assert_eq!(fin.text, texts(&reference)[5], "the EOS text is not part of the output");

    let mut ignore = SamplingParams::greedy(20);
    ignore.ignore_eos = true;
    let fin = collect(&submit(&h.engine, "ignore", p.clone(), ignore));
    assert_eq!(last(&fin).token_ids.len(), 20);
    assert_eq!(last(&fin).finish_reason, Some(FinishReason::Length));

    let mut min = SamplingParams::greedy(12);
    min.min_tokens = 8;
    let fin = collect(&submit(&h.engine, "min", p, min));
    assert_eq!(last(&fin).token_ids.len(), 12);
    assert!(
        !last(&fin).token_ids.contains(&EOS),
        "EOS is suppressed before min_tokens"
    );
    assert_all_blocks_free(&h.engine);
}

#[test]
fn max_tokens_and_the_context_length_end_with_length() {
    let h = engine();
    let outs = collect(&submit(&h.engine, "max", prompt(10, 4), SamplingParams::greedy(7)));
    assert_eq!(last(&outs).token_ids.len(), 7);
    assert_eq!(last(&outs).finish_reason, Some(FinishReason::Length));

    // max_model_len is 512: a 500-token prompt without max_tokens gets 12 tokens.
    let mut unbounded = SamplingParams::greedy(1);
    unbounded.max_tokens = None;
    let p = prompt(11, 500);
    let outs = collect(&submit(&h.engine, "ctx", p.clone(), unbounded));
    assert_eq!(last(&outs).token_ids, reference_greedy(&h.palette, &p, 12));
    assert_eq!(last(&outs).finish_reason, Some(FinishReason::Length));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn cumulative_delta_and_final_only_carry_the_same_result() {
    let h = engine();
    let p = prompt(12, 8);
    let run = |kind: OutputKind, id: &str| {
        let mut params = SamplingParams::greedy(15);
        params.output_kind = kind;
        collect(&submit(&h.engine, id, p.clone(), params))
    };
    let cumulative = run(OutputKind::Cumulative, "c");
    let delta = run(OutputKind::Delta, "d");
    let final_only = run(OutputKind::FinalOnly, "f");
    let expected_tokens = reference_greedy(&h.palette, &p, 15);
    let expected_text = texts(&expected_tokens)[15].clone();

    assert_eq!(cumulative.len(), 15, "one output per generated token");
    for (i, o) in cumulative.iter().enumerate() {
        assert_eq!(o.outputs[0].token_ids, expected_tokens[..=i]);
        assert_eq!(o.finished, i == 14);
    }
    assert_eq!(last(&cumulative).text, expected_text);

    let tokens: Vec<u32> = delta.iter().flat_map(|o| o.outputs[0].token_ids.clone()).collect();
    let text: String = delta.iter().map(|o| o.outputs[0].text.as_str()).collect();
    assert_eq!(tokens, expected_tokens);
    assert_eq!(text, expected_text);
    assert!(delta.iter().all(|o| o.outputs[0].token_ids.len() == 1));

    assert_eq!(final_only.len(), 1);
    assert_eq!(last(&final_only).token_ids, expected_tokens);
    assert_eq!(last(&final_only).text, expected_text);
    let m = &final_only[0].metrics;
    assert!(m.first_token_time.is_some() && m.last_token_time >= m.first_token_time);
    assert!(m.arrival_time > 0.0 && m.first_token_time.unwrap() >= m.arrival_time);
    let scheduled = m.first_scheduled_time.expect("first_scheduled_time");
    assert!(scheduled >= m.arrival_time && scheduled <= m.first_token_time.unwrap());
    assert!(m.time_in_queue.unwrap() >= 0.0);
    assert!(m.finished_time.unwrap() >= m.last_token_time.unwrap());
}
