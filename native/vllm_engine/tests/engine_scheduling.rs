//! Scheduling under pressure with the fake model (whose output depends on every token it
//! reads back through the block table): preemption, priorities, the prefix cache's
//! bookkeeping, reset_prefix_cache and the stats.

mod engine_common;

use std::time::Duration;

use engine_common::*;
use vllm_engine::config::SchedulingPolicy;
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::{EngineRequest, SamplingParams};

fn slow() -> FakeBehaviour {
    FakeBehaviour {
        step_delay: Some(Duration::from_millis(2)),
        ..Default::default()
    }
}

#[test]
fn sixty_four_requests_finish_unchanged_in_a_cache_too_small_for_them() {
    // 64 requests of 20 to 83 prompt tokens and 24 outputs; together ~4700 tokens.
    let cases: Vec<(Vec<u32>, usize)> = (0..64).map(|i| (prompt(300 + i, 20 + i as usize), 24)).collect();
    let run = |num_blocks: usize| {
        let mut a = args();
        a.max_num_seqs = Some(64);
        a.max_num_batched_tokens = Some(256);
        a.kv_cache_memory_bytes = Some(num_blocks * PagedKvCache::bytes_per_block(1, 4, 1, 1));
        let h = engine_with(a, slow());
        let receivers: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (p, n))| submit(&h.engine, &format!("r{i}"), p.clone(), SamplingParams::greedy(*n)))
            .collect();
        let outputs: Vec<Vec<u32>> = receivers.iter().map(|rx| final_tokens(&collect(rx))).collect();
        assert_all_blocks_free(&h.engine);
        (outputs, h.engine.stats().num_preemptions, h.palette)
    };
    // 120 blocks of 4 tokens: about a tenth of what all requests need at once.
    let (tight, preemptions, palette) = run(120);
    let (roomy, none, _) = run(2048);
    assert!(preemptions > 0, "the small cache was meant to force preemptions");
    assert_eq!(none, 0);
    assert_eq!(tight, roomy);
    for ((p, n), got) in cases.iter().zip(&tight) {
        assert_eq!(got, &reference_greedy(&palette, p, *n));
    }
}

#[test]
fn a_high_priority_request_submitted_last_finishes_before_earlier_low_priority_ones() {
    let mut a = args();
    a.scheduling_policy = SchedulingPolicy::Priority;
    a.max_num_seqs = Some(4);
    let h = engine_with(a, slow());
    let low: Vec<_> = (0..12)
        .map(|i| {
            let mut req = EngineRequest::new(format!("low{i}"), prompt(400 + i, 12), SamplingParams::greedy(40));
            req.priority = 10;
            let (s, rx) = sink();
            h.engine.add_request(req, s).unwrap();
            rx
        })
        .collect();
    wait_until("the low-priority requests run", || h.engine.stats().num_running == 4);
    let urgent_prompt = prompt(500, 12);
    let mut req = EngineRequest::new("urgent", urgent_prompt.clone(), SamplingParams::greedy(5));
    req.priority = -1;
    let (s, rx) = sink();
    h.engine.add_request(req, s).unwrap();

    let urgent = collect(&rx);
    let urgent_done = urgent.last().unwrap().metrics.finished_time.unwrap();
    assert_eq!(final_tokens(&urgent), reference_greedy(&h.palette, &urgent_prompt, 5));
    for (i, rx) in low.iter().enumerate() {
        let outs = collect(rx);
        let done = outs.last().unwrap().metrics.finished_time.unwrap();
        assert!(urgent_done < done, "low{i} finished before the urgent request");
        assert_eq!(
            final_tokens(&outs),
            reference_greedy(&h.palette, &prompt(400 + i as u32, 12), 40)
        );
    }
    assert!(
        h.engine.num_preemptions() > 0,
        "the urgent request should have taken a running one's seat"
    );
    assert_all_blocks_free(&h.engine);
}

#[test]
fn fcfs_ignores_priority() {
    let mut a = args();
    a.max_num_seqs = Some(1);
    let h = engine_with(
        a,
        FakeBehaviour {
            // Slow steps (6 × 50 ms) so the first request is still running while the
            // urgent one is queued, even on a loaded machine.
            step_delay: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    );
    let first = submit(&h.engine, "first", prompt(600, 4), SamplingParams::greedy(6));
    wait_until("the first request runs", || h.engine.stats().num_running == 1);
    let mut req = EngineRequest::new("urgent", prompt(601, 4), SamplingParams::greedy(2));
    req.priority = -5;
    let (s, rx) = sink();
    h.engine.add_request(req, s).unwrap();
    // The urgent request waits its turn rather than taking the seat.
    wait_until("the urgent request is queued", || h.engine.stats().num_waiting == 1);
    let s = h.engine.stats();
    assert_eq!((s.num_running, s.num_preemptions), (1, 0));
    assert_eq!(
        final_tokens(&collect(&first)),
        reference_greedy(&h.palette, &prompt(600, 4), 6)
    );
    collect(&rx);
    assert_eq!(h.engine.num_preemptions(), 0);
}

#[test]
fn prefix_hits_are_reported_counted_and_correct() {
    let h = engine();
    let shared = prompt(700, 40);
    let a = [shared.clone(), prompt(701, 5)].concat();
    let b = [shared.clone(), prompt(702, 7)].concat();
    let out_a = collect(&submit(&h.engine, "a", a.clone(), SamplingParams::greedy(6)));
    let out_b = collect(&submit(&h.engine, "b", b.clone(), SamplingParams::greedy(6)));
    assert_eq!(out_a.last().unwrap().num_cached_tokens, 0);
    // Block size 4: the 40 shared tokens are 10 full blocks.
    assert!(out_b.iter().all(|o| o.num_cached_tokens == 40));
    assert_eq!(final_tokens(&out_b), reference_greedy(&h.palette, &b, 6));
    // The same prompt again: everything but the last token comes from the cache.
    let out_b2 = collect(&submit(&h.engine, "b2", b.clone(), SamplingParams::greedy(6)));
    assert_eq!(out_b2.last().unwrap().num_cached_tokens, (b.len() - 1) / 4 * 4);
    assert_eq!(final_tokens(&out_b2), final_tokens(&out_b));
    let s = h.engine.stats();
    assert_eq!(s.prefix_cache_requests, 3);
    assert_eq!(s.prefix_cache_queries, (a.len() + 2 * b.len()) as u64);
    assert_eq!(s.prefix_cache_hits, 40 + ((b.len() - 1) / 4 * 4) as u64);
    assert!(s.prefix_cache_hit_rate() > 0.5);
    assert_eq!(s.prompt_tokens_total, (a.len() + 2 * b.len()) as u64);
    assert_eq!(s.generation_tokens_total, 18);
    assert_eq!(s.kv_cache_usage, 0.0);
    assert!(h.engine.do_log_stats().contains("Prefix cache hit rate"));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn reset_prefix_cache_refuses_while_blocks_are_held_unless_told_to_preempt() {
    let h = engine_with(args(), slow());
    let p = prompt(800, 30);
    collect(&submit(&h.engine, "warm", p.clone(), SamplingParams::greedy(2)));
    let running = submit(&h.engine, "running", prompt(801, 30), SamplingParams::greedy(60));
    wait_until("a request holds blocks", || h.engine.stats().num_running == 1);
    assert!(!h.engine.reset_prefix_cache(false).unwrap());
    assert!(h.engine.reset_prefix_cache(true).unwrap());
    assert!(h.engine.num_preemptions() >= 1);
    // The preempted request recomputes and finishes unchanged.
    assert_eq!(
        final_tokens(&collect(&running)),
        reference_greedy(&h.palette, &prompt(801, 30), 60)
    );
    assert!(h.engine.reset_prefix_cache(false).unwrap());
    // Nothing cached any more.
    let again = collect(&submit(&h.engine, "again", p.clone(), SamplingParams::greedy(2)));
    assert_eq!(again.last().unwrap().num_cached_tokens, 0);
    assert_all_blocks_free(&h.engine);
    h.engine.shutdown();
    assert!(h.engine.reset_prefix_cache(false).is_err());
}

#[test]
fn prefix_caching_off_never_reports_hits() {
    let mut a = args();
    a.enable_prefix_caching = false;
    let h = engine_with(a, FakeBehaviour::default());
    let p = prompt(900, 30);
    for id in ["x", "y"] {
        let outs = collect(&submit(&h.engine, id, p.clone(), SamplingParams::greedy(3)));
        assert_eq!(outs.last().unwrap().num_cached_tokens, 0);
    }
    assert_eq!(h.engine.stats().prefix_cache_queries, 0);
}
