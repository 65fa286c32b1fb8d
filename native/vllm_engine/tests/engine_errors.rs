//! Bad inputs get the right error category and the engine keeps serving; a crash inside a
//! step kills the engine cleanly (EngineDead), never the process.

mod engine_common;

use engine_common::*;
use vllm_engine::{EngineRequest, ErrorCategory, SamplingParams};

fn add(h: &Harness, id: &str, prompt: Vec<u32>, params: SamplingParams) -> Result<(), ErrorCategory> {
    let (s, _rx) = sink();
    h.engine
        .add_request(EngineRequest::new(id, prompt, params), s)
        .map_err(|e| {
            assert!(!e.message.is_empty());
            e.category
        })
}

#[test]
fn bad_requests_are_refused_and_the_engine_keeps_serving() {
    let mut a = args();
    let per_block = vllm_engine::kv_cache::PagedKvCache::bytes_per_block(1, 4, 1, 1);
    a.kv_cache_memory_bytes = Some(50 * per_block); // 200 tokens of cache, max_model_len 512
    let h = engine_with(a, FakeBehaviour::default());
    let ok = SamplingParams::greedy(5);
    use ErrorCategory::*;
    assert_eq!(add(&h, "empty", vec![], ok.clone()), Err(Validation));
    assert_eq!(add(&h, "oov", vec![5, VOCAB as u32], ok.clone()), Err(Validation));
    assert_eq!(add(&h, "too-long", prompt(1, 510), ok.clone()), Err(Validation));
    assert_eq!(
        add(
            &h,
            "no-room",
            prompt(1, 512),
            SamplingParams {
                max_tokens: None,
                ..ok.clone()
            }
        ),
        Err(Validation)
    );
    assert_eq!(add(&h, "cache", prompt(1, 300), ok.clone()), Err(ResourceExhausted));
    let bad = |f: fn(&mut SamplingParams)| {
        let mut p = ok.clone();
        f(&mut p);
        p
    };
    assert_eq!(
        add(&h, "t", prompt(1, 3), bad(|p| p.temperature = -1.0)),
        Err(Validation)
    );
    assert_eq!(add(&h, "p", prompt(1, 3), bad(|p| p.top_p = 0.0)), Err(Validation));
    assert_eq!(
        add(&h, "m", prompt(1, 3), bad(|p| p.max_tokens = Some(0))),
        Err(Validation)
    );

    let rx = submit(&h.engine, "dup", prompt(2, 4), SamplingParams::greedy(100));
    assert_eq!(add(&h, "dup", prompt(3, 4), ok.clone()), Err(Validation));
    h.engine.abort("dup");
    collect(&rx);

    let outs = collect(&submit(&h.engine, "dup", prompt(4, 4), ok));
    assert_eq!(final_tokens(&outs), reference_greedy(&h.palette, &prompt(4, 4), 5));
    assert_all_blocks_free(&h.engine);
}

#[test]
fn a_panic_in_a_step_fails_every_request_with_engine_dead() {
    let p = prompt(5, 6);
    let h = engine_with(
        args(),
        FakeBehaviour {
            panic_at_context_len: Some(p.len() + 3),
            ..Default::default()
        },
    );
    let quiet = prompt(6, 40);
    let bystander = submit(&h.engine, "bystander", quiet, SamplingParams::greedy(200));
    let victim = submit(&h.engine, "victim", p, SamplingParams::greedy(20));
    for rx in [&victim, &bystander] {
        let failure = loop {
            match rx.recv_timeout(std::time::Duration::from_secs(10)).expect("an answer") {
                Event::Output(o) => assert!(!o.finished),
                Event::Fail(e) => break e,
            }
        };
        assert_eq!(failure.category, ErrorCategory::EngineDead);
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(50)).is_err(),
            "nothing after fail"
        );
    }
    assert!(!h.engine.is_alive());
    assert_eq!(
        add(&h, "after", prompt(7, 3), SamplingParams::greedy(2)),
        Err(ErrorCategory::EngineDead)
    );
    h.engine.shutdown();
}
