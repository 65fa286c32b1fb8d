//! Aborts (explicit, mid-prefill, mid-decode, queued) and gone receivers free every block,
//! end with exactly one final output, and leave the engine serving.

mod engine_common;

use std::time::Duration;

use engine_common::*;
use vllm_engine::{EngineRequest, FinishReason, OutputKind, SamplingParams};

fn slow() -> Harness {
    let mut a = args();
    a.max_num_batched_tokens = Some(8);
    engine_with(
        a,
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        },
    )
}

fn assert_aborted(outs: &[vllm_engine::RequestOutput]) {
    let last = outs.last().unwrap();
    assert!(last.finished);
    assert_eq!(last.outputs[0].finish_reason, Some(FinishReason::Abort));
    assert_eq!(outs.iter().filter(|o| o.finished).count(), 1);
}

#[test]
fn abort_mid_prefill_frees_every_block() {
    let h = slow();
    // 400 prompt tokens at 8 per step: ~50 steps of prefill.
    let rx = submit(&h.engine, "long", prompt(1, 400), SamplingParams::greedy(10));
    wait_until("the prefill has started", || {
        h.engine.stats().free_blocks < h.engine.stats().total_blocks
    });
    h.engine.abort("long");
    let outs = collect(&rx);
    assert_aborted(&outs);
    assert_eq!(outs.len(), 1, "no tokens were produced before the abort");
    assert!(outs[0].outputs[0].token_ids.is_empty());
    assert_all_blocks_free(&h.engine);
}

#[test]
fn abort_mid_decode_frees_every_block() {
    let h = slow();
    let mut params = SamplingParams::greedy(400);
    params.output_kind = OutputKind::Delta;
    let rx = submit(&h.engine, "dec", prompt(2, 6), params);
    let first = match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Event::Output(o) => o,
        Event::Fail(e) => panic!("{e:?}"),
    };
    assert!(!first.finished);
    h.engine.abort("dec");
    let mut outs = vec![first];
    outs.extend(collect(&rx));
    assert_aborted(&outs);
    let n: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    assert!((1..400).contains(&n), "aborted after {n} tokens");
    assert_all_blocks_free(&h.engine);
}

#[test]
fn aborting_a_queued_request_and_an_unknown_id_is_fine() {
    let mut a = args();
    a.max_num_seqs = Some(1);
    let h = engine_with(
        a,
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        },
    );
    let running = submit(&h.engine, "running", prompt(3, 5), SamplingParams::greedy(30));
    let queued = submit(&h.engine, "queued", prompt(4, 5), SamplingParams::greedy(30));
    h.engine.abort("queued");
    h.engine.abort("no-such-request");
    assert_aborted(&collect(&queued));
    let outs = collect(&running);
    assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, &prompt(3, 5), 30));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn a_gone_receiver_aborts_its_request_and_frees_blocks() {
    let h = slow();
    let rx = submit(&h.engine, "orphan", prompt(5, 6), SamplingParams::greedy(400));
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Event::Output(o) => assert!(!o.finished),
        Event::Fail(e) => panic!("{e:?}"),
    }
    drop(rx);
    wait_until("the orphan's blocks are free", || {
        let s = h.engine.stats();
        s.free_blocks == s.total_blocks && s.num_running == 0
    });
    // Its id is free again once the engine has forgotten it.
    wait_until("the id can be reused", || {
        let (s, _rx) = sink();
        h.engine
            .add_request(EngineRequest::new("orphan", prompt(6, 3), SamplingParams::greedy(1)), s)
            .is_ok()
    });
}

#[test]
fn shutdown_aborts_everything_in_flight_and_refuses_new_work() {
    let h = slow();
    let receivers: Vec<_> = (0..3)
        .map(|i| submit(&h.engine, &format!("s{i}"), prompt(i, 20), SamplingParams::greedy(300)))
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    h.engine.shutdown();
    h.engine.shutdown();
    for rx in &receivers {
        assert_aborted(&collect(rx));
    }
    let (s, _rx) = sink();
    let err = h
        .engine
        .add_request(EngineRequest::new("late", prompt(9, 3), SamplingParams::greedy(1)), s)
        .unwrap_err();
    assert_eq!(err.category, vllm_engine::ErrorCategory::EngineDead);
}
