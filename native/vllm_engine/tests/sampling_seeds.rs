//! Seeds and parallel sampling through the engine: a seeded request gives the same text
//! alone and inside a full batch of other requests, different seeds differ, and n > 1
//! gives n indexed outputs, child i equal to a single request seeded with seed + i.

mod sampling_common;

use std::time::Duration;

use sampling_common::*;
use vllm_engine::{Engine, FinishReason, OutputKind, RequestOutput, SamplingParams, StopReason};

fn engine32() -> Harness {
    let mut a = args();
    a.max_num_seqs = Some(32);
    engine_with(a, FakeBehaviour::default())
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        seed: Some(seed),
        max_tokens: Some(24),
        temperature: 1.3,
        top_k: 3,
        ..Default::default()
    }
}

/// 31 requests that differ from `seeded` and from each other.
fn others(engine: &Engine) -> Vec<crossbeam_channel::Receiver<Event>> {
    (0..31u32)
        .map(|i| {
            let mut p = SamplingParams {
                max_tokens: Some(8 + (i as usize % 20)),
                temperature: [0.0, 0.7, 1.0, 1.5][i as usize % 4],
                top_p: [1.0, 0.9, 0.5][i as usize % 3],
                top_k: [0, 2, -1][i as usize % 3],
                min_p: [0.0, 0.1][i as usize % 2],
                presence_penalty: [0.0, 0.5, -0.5][i as usize % 3],
                frequency_penalty: [0.0, 0.3][i as usize % 2],
                repetition_penalty: [1.0, 1.2][i as usize % 2],
                seed: (i % 2 == 0).then_some(1000 + i as u64),
                logprobs: (i % 5 == 0).then_some(3),
                output_kind: [OutputKind::Cumulative, OutputKind::Delta, OutputKind::FinalOnly][i as usize % 3],
                ..Default::default()
            };
            if i % 7 == 0 {
                p.n = 2;
            }
            submit(engine, &format!("other{i}"), prompt(200 + i, 3 + i as usize % 17), p)
        })
        .collect()
}

fn text_and_tokens(outs: &[RequestOutput]) -> (String, Vec<u32>) {
    let o = &outs.last().unwrap().outputs[0];
    (o.text.clone(), o.token_ids.clone())
}

#[test]
fn a_seeded_request_gives_the_same_text_alone_and_in_a_batch_of_31_others() {
    let h = engine32();
    let p = prompt(77, 9);
    let alone = text_and_tokens(&collect(&submit(&h.engine, "alone", p.clone(), seeded(42))));
    assert!(!alone.0.is_empty());

    let crowd = others(&h.engine);
    let inside = submit(&h.engine, "inside", p.clone(), seeded(42));
    let inside = text_and_tokens(&collect(&inside));
    for rx in &crowd {
        collect(rx);
    }
    assert_eq!(alone, inside);

    let different = text_and_tokens(&collect(&submit(&h.engine, "different", p, seeded(43))));
    assert_ne!(alone.1, different.1, "another seed gives other tokens");
    assert_all_blocks_free(&h.engine);
}

#[test]
fn n_3_gives_three_indexed_outputs_each_the_single_run_with_seed_plus_index() {
    let h = engine32();
    let p = prompt(78, 10);
    let mut params = seeded(500);
    params.n = 3;
    params.logprobs = Some(1);
    let outs = collect(&submit(&h.engine, "n3", p.clone(), params.clone()));
    let fin = outs.last().unwrap();
    assert_eq!(fin.outputs.len(), 3);
    for (i, o) in fin.outputs.iter().enumerate() {
        assert_eq!(o.index, i);
        assert_eq!(o.finish_reason, Some(FinishReason::Length));
        let mut single = seeded(500 + i as u64);
        single.logprobs = Some(1);
        let alone = collect(&submit(&h.engine, &format!("single{i}"), p.clone(), single));
        let a = &alone.last().unwrap().outputs[0];
        assert_eq!((&o.text, &o.token_ids), (&a.text, &a.token_ids), "child {i}");
        assert_eq!(o.cumulative_logprob, a.cumulative_logprob);
    }
    assert_ne!(fin.outputs[0].token_ids, fin.outputs[1].token_ids);
    // Every streamed output carries all three children, and only the last is finished.
    for o in &outs[..outs.len() - 1] {
        assert!(!o.finished);
        assert_eq!(o.outputs.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
    assert_all_blocks_free(&h.engine);
}

#[test]
fn n_2_deltas_add_up_to_the_cumulative_outputs() {
    let h = engine32();
    let p = prompt(79, 6);
    let mut params = seeded(9);
    params.n = 2;
    let cumulative = collect(&submit(&h.engine, "cum", p.clone(), params.clone()));
    params.output_kind = OutputKind::Delta;
    let deltas = collect(&submit(&h.engine, "delta", p, params));
    let fin = &cumulative.last().unwrap().outputs;
    for (i, want) in fin.iter().enumerate() {
        let text: String = deltas.iter().map(|o| o.outputs[i].text.as_str()).collect();
        let tokens: Vec<u32> = deltas.iter().flat_map(|o| o.outputs[i].token_ids.clone()).collect();
        assert_eq!((text, tokens), (want.text.clone(), want.token_ids.clone()));
    }
}

#[test]
fn children_stop_at_different_times_by_stop_string_or_stop_token() {
    let tok = tokenizer();
    let word = |w: &str| tok.encode(w, false).unwrap()[0];
    let (the, cat, dog) = (word(" the"), word(" cat"), word(" dog"));
    let engine = fixed_engine(vec![the, cat, dog], vec![2.0, 0.0, 0.0]);
    for (kind, stop_string) in [(OutputKind::Cumulative, true), (OutputKind::Delta, false)] {
        let mut params = SamplingParams {
            n: 5,
            seed: Some(3),
            max_tokens: Some(200),
            output_kind: kind,
            ..Default::default()
        };
        if stop_string {
            params.stop = vec![" cat".into()];
        } else {
            params.stop_token_ids = vec![cat];
        }
        let outs = collect(&submit(&engine, "mixed", vec![10, 11, 12], params));
        let mut lengths = Vec::new();
        for i in 0..5 {
            let tokens: Vec<u32> = if kind == OutputKind::Delta {
                outs.iter().flat_map(|o| o.outputs[i].token_ids.clone()).collect()
            } else {
                outs.last().unwrap().outputs[i].token_ids.clone()
            };
            let o = &outs.last().unwrap().outputs[i];
            assert_eq!(o.finish_reason, Some(FinishReason::Stop), "child {i}");
            let want = if stop_string {
                StopReason::Text(" cat".into())
            } else {
                StopReason::Token(cat)
            };
            assert_eq!(o.stop_reason, Some(want));
            assert_eq!(tokens.last(), Some(&cat), "child {i} ends at its first cat");
            assert!(!tokens[..tokens.len() - 1].contains(&cat));
            if stop_string {
                assert!(!o.text.contains("cat"), "{:?}", o.text);
            }
            lengths.push(tokens.len());
        }
        lengths.sort();
        assert_ne!(
            lengths.first(),
            lengths.last(),
            "children should stop at different steps"
        );
    }
    assert_all_blocks_free(&engine);
}

#[test]
fn abort_ends_every_child() {
    let mut a = args();
    a.max_num_seqs = Some(32);
    let h = engine_with(
        a,
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        },
    );
    let mut params = seeded(1);
    params.n = 4;
    params.max_tokens = Some(400);
    let rx = submit(&h.engine, "long", prompt(80, 5), params);
    wait_until("some tokens", || h.engine.stats().num_running == 4);
    std::thread::sleep(Duration::from_millis(30));
    h.engine.abort("long");
    let outs = collect(&rx);
    let fin = outs.last().unwrap();
    assert_eq!(fin.outputs.len(), 4);
    for o in &fin.outputs {
        assert_eq!(o.finish_reason, Some(FinishReason::Abort));
    }
    wait_until("blocks free", || {
        h.engine.stats().free_blocks == h.engine.stats().total_blocks
    });
    assert_all_blocks_free(&h.engine);
}

#[test]
fn n_is_validated() {
    let h = engine();
    for n in [0, 129] {
        let (s, _rx) = sink();
        let params = SamplingParams {
            n,
            ..Default::default()
        };
        let err = h
            .engine
            .add_request(vllm_engine::EngineRequest::new("bad", prompt(1, 3), params), s)
            .unwrap_err();
        assert!(err.to_string().contains("n must be"), "{err}");
    }
}

#[test]
fn n_4_final_only_is_one_output_with_every_child() {
    let h = engine32();
    let mut params = seeded(21);
    params.n = 4;
    params.output_kind = OutputKind::FinalOnly;
    let outs = collect(&submit(&h.engine, "final", prompt(81, 7), params));
    assert_eq!(outs.len(), 1);
    let fin = &outs[0];
    assert!(fin.finished);
    assert_eq!(
        fin.outputs.iter().map(|o| o.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(fin
        .outputs
        .iter()
        .all(|o| o.token_ids.len() == 24 && !o.text.is_empty()));
}
