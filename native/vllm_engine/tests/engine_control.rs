//! Engine control between steps: sleep (KV memory released, requests aborted; new ones
//! wait), wake-up, ping, and the step profiler's Chrome trace.

mod engine_common;

use std::time::Duration;

use engine_common::*;
use vllm_engine::{ErrorCategory, FinishReason, SamplingParams};

#[test]
fn sleep_releases_the_kv_cache_and_holds_new_requests_until_wake_up() {
    let h = engine();
    let awake = h.engine.memory_usage();
    assert!(awake.kv_cache_bytes > 0);
    assert!(awake.weights_bytes > 0);
    assert_eq!(awake.sleep_level, 0);

    h.engine.sleep(1).unwrap();
    assert!(h.engine.is_sleeping());
    let asleep = h.engine.memory_usage();
    assert_eq!(asleep.kv_cache_bytes, 0);
    assert_eq!(asleep.weights_bytes, awake.weights_bytes);
    assert_eq!(asleep.sleep_level, 1);

    let p = prompt(3, 9);
    let rx = submit(&h.engine, "held", p.clone(), SamplingParams::greedy(6));
    std::thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "a request ran while the engine slept");

    h.engine.wake_up(true, true).unwrap();
    assert!(!h.engine.is_sleeping());
    assert_eq!(h.engine.memory_usage(), awake);
    let outs = collect(&rx);
    assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, &p, 6));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn sleep_aborts_requests_in_flight() {
    let h = engine_with(
        args(),
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        },
    );
    let rx = submit(&h.engine, "running", prompt(1, 8), SamplingParams::greedy(400));
    wait_until("the request runs", || h.engine.stats().num_running == 1);
    h.engine.sleep(1).unwrap();
    let outs = collect(&rx);
    assert_eq!(outs.last().unwrap().outputs[0].finish_reason, Some(FinishReason::Abort));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn a_failed_weight_reload_leaves_the_engine_asleep() {
    let h = engine();
    h.engine.sleep(2).unwrap();
    assert_eq!(h.engine.memory_usage().weights_bytes, 0);
    // The fake model has no file to reload from.
    let err = h.engine.wake_up(true, true).unwrap_err();
    assert_eq!(err.category, ErrorCategory::NotFound, "{err:?}");
    assert!(h.engine.is_sleeping());
    assert_eq!(h.engine.sleep(3).unwrap_err().category, ErrorCategory::Validation);
}

#[test]
fn ping_answers_until_shutdown() {
    let h = engine();
    h.engine.ping(Duration::from_secs(5)).unwrap();
    h.engine.shutdown();
    let err = h.engine.ping(Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.category, ErrorCategory::EngineDead);
}

#[test]
fn the_profiler_writes_one_event_per_phase_of_each_step() {
    let h = engine();
    h.engine.start_profile().unwrap();
    let rx = submit(&h.engine, "traced", prompt(2, 5), SamplingParams::greedy(4));
    collect(&rx);
    let path = std::env::temp_dir().join(format!("vllm-engine-control-{}/trace.json", std::process::id()));
    let summary = h.engine.stop_profile(&path).unwrap();
    // A 5-token prompt fits one prefill step; each of the 4 tokens is one step.
    assert_eq!(summary.num_steps, 4);
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for name in ["schedule", "forward", "sample", "detokenize"] {
        let n = events.iter().filter(|e| e["name"] == name && e["ph"] == "X").count();
        assert_eq!(n, 4, "{name}");
    }
    let prefill = events.iter().find(|e| e["name"] == "forward").unwrap();
    assert_eq!(prefill["args"]["num_tokens"], 5);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
