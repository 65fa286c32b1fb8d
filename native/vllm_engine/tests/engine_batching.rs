//! Continuous batching, chunked prefill and preemption: outputs must not depend on what
//! else runs, how prompts are chunked, or whether a request was preempted.

mod engine_common;

use std::time::Duration;

use engine_common::*;
use vllm_engine::{FinishReason, SamplingParams};

#[test]
fn a_solo_request_follows_the_model_through_the_paged_cache() {
    let h = engine();
    let p = prompt(1, 37);
    let outs = collect(&submit(&h.engine, "solo", p.clone(), SamplingParams::greedy(20)));
    assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, &p, 20));
    assert_eq!(
        outs.last().unwrap().outputs[0].finish_reason,
        Some(FinishReason::Length)
    );
    assert_all_blocks_free(&h.engine);
}

#[test]
fn requests_joining_while_others_run_get_their_solo_outputs() {
    let h = engine_with(
        args(),
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    let cases: Vec<(Vec<u32>, usize)> = (0..12)
        .map(|i| (prompt(i, 5 + 13 * i as usize), 10 + 3 * i as usize))
        .collect();
    let mut receivers = Vec::new();
    for (i, (p, n)) in cases.iter().enumerate() {
        receivers.push(submit(
            &h.engine,
            &format!("r{i}"),
            p.clone(),
            SamplingParams::greedy(*n),
        ));
        // Stagger arrivals so requests join a batch that is already decoding.
        if i % 3 == 2 {
            std::thread::sleep(Duration::from_millis(15));
        }
    }
    for (rx, (p, n)) in receivers.iter().zip(&cases) {
        let outs = collect(rx);
        assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, p, *n));
    }
    assert_all_blocks_free(&h.engine);
}

#[test]
fn chunked_prefill_gives_the_same_tokens_as_one_prefill() {
    let mut small_budget = args();
    small_budget.max_num_batched_tokens = Some(16);
    let chunked = engine_with(small_budget, FakeBehaviour::default());
    let mut whole = args();
    whole.enable_chunked_prefill = false;
    let unchunked = engine_with(whole, FakeBehaviour::default());
    let p = prompt(3, 150);
    let a = collect(&submit(&chunked.engine, "a", p.clone(), SamplingParams::greedy(12)));
    let b = collect(&submit(&unchunked.engine, "b", p.clone(), SamplingParams::greedy(12)));
    assert_eq!(final_tokens(&a), final_tokens(&b));
    assert_eq!(final_tokens(&a), reference_greedy(&chunked.palette, &p, 12));
    assert_all_blocks_free(&chunked.engine);
}

#[test]
fn preemption_under_a_tiny_cache_completes_every_request_unchanged() {
    let mut tiny = args();
    // 20 blocks of 4 tokens = 80 tokens for 8 requests that need 40 to 75 each.
    let per_block = vllm_engine::kv_cache::PagedKvCache::bytes_per_block(1, 4, 1, 1);
    tiny.kv_cache_memory_bytes = Some(20 * per_block);
    tiny.max_num_batched_tokens = Some(32);
    // Slow steps, so that all requests are in before the first ones finish.
    let h = engine_with(
        tiny,
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    assert_eq!(h.engine.stats().total_blocks, 20);
    let cases: Vec<(Vec<u32>, usize)> = (0..8).map(|i| (prompt(20 + i, 10 + 5 * i as usize), 30)).collect();
    let receivers: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (p, n))| submit(&h.engine, &format!("p{i}"), p.clone(), SamplingParams::greedy(*n)))
        .collect();
    for (rx, (p, n)) in receivers.iter().zip(&cases) {
        let outs = collect(rx);
        assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, p, *n));
        assert_eq!(
            outs.last().unwrap().outputs[0].finish_reason,
            Some(FinishReason::Length)
        );
    }
    assert!(h.engine.num_preemptions() > 0, "the cache was meant to run out");
    assert_all_blocks_free(&h.engine);
}

#[test]
fn max_num_seqs_limits_the_batch_but_everyone_finishes() {
    let mut few = args();
    few.max_num_seqs = Some(2);
    let h = engine_with(few, FakeBehaviour::default());
    let receivers: Vec<_> = (0..6)
        .map(|i| {
            submit(
                &h.engine,
                &format!("s{i}"),
                prompt(40 + i, 9),
                SamplingParams::greedy(8),
            )
        })
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        let outs = collect(rx);
        assert_eq!(
            final_tokens(&outs),
            reference_greedy(&h.palette, &prompt(40 + i as u32, 9), 8)
        );
    }
    assert_all_blocks_free(&h.engine);
}

#[test]
fn waiting_requests_are_admitted_by_priority_then_arrival() {
    let mut one_at_a_time = args();
    one_at_a_time.max_num_seqs = Some(1);
    one_at_a_time.scheduling_policy = vllm_engine::config::SchedulingPolicy::Priority;
    let h = engine_with(
        one_at_a_time,
        FakeBehaviour {
            step_delay: Some(Duration::from_millis(3)),
            ..Default::default()
        },
    );
    let first = submit(&h.engine, "first", prompt(50, 4), SamplingParams::greedy(10));
    wait_until("the first request runs", || h.engine.stats().num_running == 1);
    let add = |id: &str, priority: i32| {
        let (s, rx) = sink();
        let mut req = vllm_engine::EngineRequest::new(id, prompt(51, 4), SamplingParams::greedy(3));
        req.priority = priority;
        h.engine.add_request(req, s).unwrap();
        rx
    };
    let low = add("low", 5);
    let early = add("early", 0);
    let urgent = add("urgent", -1);
    let scheduled = |rx| collect(&rx).last().unwrap().metrics.first_scheduled_time.unwrap();
    let (t_first, t_low, t_early, t_urgent) = (scheduled(first), scheduled(low), scheduled(early), scheduled(urgent));
    let order = [t_first, t_urgent, t_early, t_low];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "first, urgent, early, low scheduled at {order:?}"
    );
    assert_all_blocks_free(&h.engine);
}
