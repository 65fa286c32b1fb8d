//! Prefix caching and chunked prefill with the real model (SmolLM2 GGUF, f32): reused
//! blocks must give exactly the ids a cold computation gives, and the HF reference.

mod engine_common;

use engine_common::*;
use vllm_engine::{Engine, EngineArgs, RequestOutput, SamplingParams};

fn case(name: &str) -> SmolLm2Case {
    smollm2_cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("fixture case")
}

fn engine(prefix_caching: bool, max_num_batched_tokens: Option<usize>) -> Engine {
    let mut args = EngineArgs::new(smollm2_gguf());
    args.max_model_len = Some(512);
    args.max_num_seqs = Some(16);
    args.enable_prefix_caching = prefix_caching;
    args.max_num_batched_tokens = max_num_batched_tokens;
    Engine::new(args).unwrap_or_else(|e| panic!("cannot start the engine on SmolLM2: {e}"))
}

fn greedy(max_tokens: usize) -> SamplingParams {
    let mut p = SamplingParams::greedy(max_tokens);
    p.ignore_eos = true;
    p
}

/// Submits every prompt at once; returns each one's final output.
fn run_all(engine: &Engine, tag: &str, prompts: &[(Vec<u32>, usize)]) -> Vec<RequestOutput> {
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, (p, n))| submit(engine, &format!("{tag}{i}"), p.clone(), greedy(*n)))
        .collect();
    receivers
        .iter()
        .map(|rx| collect(rx).pop().expect("a final output"))
        .collect()
}

#[test]
fn a_second_request_reuses_a_shared_200_token_prefix_with_identical_ids() {
    let long = case("long");
    let prefix = &long.prompt[..200];
    let a: Vec<u32> = [prefix, &case("story").prompt].concat();
    let b: Vec<u32> = [prefix, &case("capital").prompt].concat();

    let cached = engine(true, None);
    let first = run_all(&cached, "a", &[(a.clone(), 16)]).pop().unwrap();
    assert_eq!(first.num_cached_tokens, 0);
    let second = run_all(&cached, "b", &[(b.clone(), 16)]).pop().unwrap();
    assert!(
        second.num_cached_tokens >= 192,
        "only {} prompt tokens came from the cache",
        second.num_cached_tokens
    );
    let stats = cached.stats();
    assert_eq!(stats.prefix_cache_hits, second.num_cached_tokens as u64);
    assert_eq!(stats.prefix_cache_queries, (a.len() + b.len()) as u64);
    assert_all_blocks_free(&cached);
    drop(cached);

    let cold = engine(false, None);
    let reference = run_all(&cold, "b", &[(b, 16)]).pop().unwrap();
    assert_eq!(reference.num_cached_tokens, 0);
    assert_eq!(second.outputs[0].token_ids, reference.outputs[0].token_ids);
    assert_eq!(cold.stats().prefix_cache_queries, 0);
}

#[test]
fn the_fixtures_match_exactly_with_prefix_caching_on_and_off() {
    let cases = smollm2_cases();
    let prompts: Vec<(Vec<u32>, usize)> = cases.iter().map(|c| (c.prompt.clone(), c.greedy.len())).collect();
    for caching in [true, false] {
        let engine = engine(caching, Some(64));
        // The second pass finds every prompt's full blocks cached (when caching is on).
        for pass in 0..2 {
            let outs = run_all(&engine, &format!("p{pass}-"), &prompts);
            for (c, out) in cases.iter().zip(&outs) {
                assert_eq!(
                    out.outputs[0].token_ids, c.greedy,
                    "case {} (caching {caching}, pass {pass})",
                    c.name
                );
                let expected_hit = if caching && pass == 1 {
                    (c.prompt.len() - 1) / 16 * 16
                } else {
                    0
                };
                assert_eq!(
                    out.num_cached_tokens, expected_hit,
                    "case {} (caching {caching}, pass {pass})",
                    c.name
                );
            }
        }
        assert_all_blocks_free(&engine);
    }
}

#[test]
fn the_long_case_gives_the_same_ids_with_any_token_budget() {
    let long = case("long");
    for budget in [16, 64, 2048] {
        let engine = engine(false, Some(budget));
        let out = run_all(&engine, "long", &[(long.prompt.clone(), long.greedy.len())])
            .pop()
            .unwrap();
        assert_eq!(out.outputs[0].token_ids, long.greedy, "max_num_batched_tokens {budget}");
    }
}
