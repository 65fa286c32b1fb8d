//! Admission limits and engine death: max_waiting_requests refuses with ResourceExhausted
//! (and frees its slot when a request ends); a fault injected into the core thread fails
//! every request with EngineDead and tells the death listeners, once; step limits left
//! unset take the device's defaults.

mod engine_common;

use std::time::Duration;

use crossbeam_channel::unbounded;
use engine_common::*;
use vllm_engine::batch_size::BatchSize;
use vllm_engine::{EngineRequest, ErrorCategory, SamplingParams};

fn slow() -> FakeBehaviour {
    FakeBehaviour {
        step_delay: Some(Duration::from_millis(5)),
        ..Default::default()
    }
}

fn long() -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(400)
    }
}

#[test]
fn max_waiting_requests_bounds_the_requests_in_flight() {
    let mut a = args();
    a.max_num_seqs = Some(2);
    a.max_waiting_requests = Some(1);
    let h = engine_with(a, slow());
    let rxs: Vec<_> = (0..3)
        .map(|i| submit(&h.engine, &format!("r{i}"), prompt(i, 8), long()))
        .collect();
    let (s, _rx) = sink();
    let err = h
        .engine
        .add_request(EngineRequest::new("r3", prompt(3, 8), long()), s)
        .expect_err("a fourth request is over the limit");
    assert_eq!(err.category, ErrorCategory::ResourceExhausted);
    assert!(err.message.contains("max_waiting_requests"), "{}", err.message);

    // One ends: its slot is free again.
    h.engine.abort("r0");
    let outs = collect(&rxs[0]);
    assert!(outs.last().is_some_and(|o| o.finished));
    wait_until("r0 is forgotten", || {
        let (s, _rx) = sink();
        h.engine
            .add_request(EngineRequest::new("r4", prompt(4, 8), long()), s)
            .is_ok()
    });
    for id in ["r1", "r2", "r4"] {
        h.engine.abort(id);
    }
    wait_until("every block is free", || h.engine.stats().num_running == 0);
}

#[test]
fn an_injected_fault_kills_the_engine_and_tells_every_caller_and_listener() {
    let h = engine_with(args(), slow());
    let (died_tx, died_rx) = unbounded();
    let tx = died_tx.clone();
    h.engine.on_death(Box::new(move |why: &str| {
        let _ = tx.send(why.to_string());
    }));
    let rxs: Vec<_> = (0..4)
        .map(|i| submit(&h.engine, &format!("f{i}"), prompt(i, 8), long()))
        .collect();
    for rx in &rxs {
        // Each is running (has an output) before the fault.
        assert!(matches!(rx.recv_timeout(Duration::from_secs(10)), Ok(Event::Output(_))));
    }
    h.engine.inject_fault().expect("the fault fires");
    for rx in &rxs {
        let failed = loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Event::Output(o)) => assert!(!o.finished, "a final output instead of a failure"),
                Ok(Event::Fail(e)) => break e,
                Err(e) => panic!("no failure within 1 s: {e:?}"),
            }
        };
        assert_eq!(failed.category, ErrorCategory::EngineDead);
    }
    let why = died_rx
        .recv_timeout(Duration::from_secs(1))
        .expect("the listener hears");
    assert!(why.contains("fault injected"), "{why}");
    assert!(!h.engine.is_alive());
    let (s, _rx) = sink();
    let err = h
        .engine
        .add_request(EngineRequest::new("late", prompt(9, 8), long()), s)
        .expect_err("a dead engine takes no request");
    assert_eq!(err.category, ErrorCategory::EngineDead);
    // A listener added after the death hears at once; nobody hears twice.
    let tx = died_tx.clone();
    h.engine.on_death(Box::new(move |why: &str| {
        let _ = tx.send(format!("late: {why}"));
    }));
    assert!(died_rx
        .recv_timeout(Duration::from_secs(1))
        .is_ok_and(|w| w.starts_with("late")));
    assert!(died_rx.try_recv().is_err());
}

#[test]
fn unset_step_limits_take_the_devices_defaults_and_set_ones_win() {
    let limits = |h: &Harness| (h.engine.limits().max_num_seqs, h.engine.limits().max_num_batched_tokens);
    let mut a = args();
    a.max_num_seqs = None;
    a.max_num_batched_tokens = None;
    let cpu = engine_with(a.clone(), FakeBehaviour::default());
    assert_eq!(limits(&cpu), (256, 2048));

    let large_gpu = || FakeBehaviour {
        batch_defaults: Some(BatchSize::LARGE_GPU),
        ..Default::default()
    };
    let wide = engine_with(a.clone(), large_gpu());
    assert_eq!(limits(&wide), (1024, 16384));

    a.max_num_seqs = Some(8);
    a.max_num_batched_tokens = Some(100);
    let set = engine_with(a, large_gpu());
    assert_eq!(limits(&set), (8, 100));
}
