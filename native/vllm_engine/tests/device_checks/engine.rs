//! The whole engine on the device: seeded sampling, decode graphs across sleep and
//! wake-up, and prefix caching, each against a reference that does not depend on them.

use vllm_engine::config::DType;
use vllm_engine::{Engine, SamplingParams};

use crate::common::{read_json, u32s};
use crate::engine_common::{assert_all_blocks_free, collect, final_tokens, submit, tokenizer_path};

fn tiny(name: &str) -> (std::path::PathBuf, Vec<u32>, Vec<u32>) {
    let dir = crate::common::fixtures_dir().join("tiny").join(name);
    let reference = read_json(dir.join("reference.json"));
    (
        dir,
        u32s(&reference["prompt_token_ids"]),
        u32s(&reference["greedy_token_ids"]),
    )
}

fn engine(dir: std::path::PathBuf, f: impl FnOnce(&mut vllm_engine::EngineArgs)) -> Engine {
    let mut a = crate::args(dir, DType::F32);
    a.tokenizer = Some(tokenizer_path());
    a.max_num_seqs = Some(8);
    a.block_size = 4;
    f(&mut a);
    Engine::new(a).unwrap_or_else(|e| panic!("engine: {e}"))
}

fn run(engine: &Engine, requests: &[(&str, Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    let receivers: Vec<_> = requests
        .iter()
        .map(|(id, prompt, p)| submit(engine, id, prompt.clone(), p.clone()))
        .collect();
    receivers.iter().map(|rx| final_tokens(&collect(rx))).collect()
}

fn sampled(seed: Option<u64>, n: usize) -> SamplingParams {
    let mut p = SamplingParams::greedy(n);
    p.temperature = 1.0;
    p.top_p = 0.95;
    p.top_k = 50;
    p.repetition_penalty = 1.1;
    p.seed = seed;
    p.ignore_eos = true;
    p
}

/// A seeded request gives the same ids alone and beside unseeded ones (graphs and eager);
/// another seed gives other ids.
#[test]
fn seeded_requests_repeat_whatever_the_batch() {
    let (dir, prompt, _) = tiny("tiny_qwen3");
    for enforce_eager in [false, true] {
        let e = engine(dir.clone(), |a| a.enforce_eager = enforce_eager);
        let alone = run(&e, &[("a", prompt.clone(), sampled(Some(11), 24))]).remove(0);
        let other: Vec<u32> = prompt.iter().rev().copied().collect();
        let crowd = run(
            &e,
            &[
                ("b", other.clone(), sampled(None, 30)),
                ("c", prompt.clone(), sampled(Some(11), 24)),
                ("d", prompt[..7].to_vec(), sampled(None, 9)),
                ("e", other, sampled(Some(5), 17)),
            ],
        );
        assert_eq!(crowd[1], alone, "seed 11 beside others, enforce_eager {enforce_eager}");
        let again = run(&e, &[("f", prompt.clone(), sampled(Some(11), 24))]).remove(0);
        assert_eq!(again, alone, "seed 11 a second time");
        let other_seed = run(&e, &[("g", prompt.clone(), sampled(Some(12), 24))]).remove(0);
        assert_ne!(other_seed, alone, "seeds 11 and 12 drew the same 24 tokens");
        assert_all_blocks_free(&e);
    }
}

/// Sleep (level 1: KV cache freed; level 2: weights too) and wake-up reallocate the cache
/// and capture the decode graphs again: the reference greedy ids, decoded through graphs.
#[test]
fn decode_graphs_are_captured_again_after_sleep_and_wake_up() {
    let (dir, prompt, expected) = tiny("tiny_llama");
    let e = engine(dir, |_| {});
    let greedy = || {
        let mut p = SamplingParams::greedy(expected.len());
        p.ignore_eos = true;
        p
    };
    let requests: Vec<(&str, Vec<u32>, SamplingParams)> = ["a", "b", "c"]
        .iter()
        .map(|id| (*id, prompt.clone(), greedy()))
        .collect();
    for phase in ["before sleeping", "after sleep(1)", "after sleep(2)"] {
        match phase {
            "after sleep(1)" => e.sleep(1).expect("sleep 1"),
            "after sleep(2)" => e.sleep(2).expect("sleep 2"),
            _ => {}
        }
        if phase != "before sleeping" {
            assert!(e.is_sleeping());
            e.wake_up(true, true).expect("wake up");
        }
        let replays = crate::graph_replays();
        for ids in run(&e, &requests) {
            assert_eq!(ids, expected, "{phase}");
        }
        if let (Some(before), Some(after)) = (replays, crate::graph_replays()) {
            assert!(
                after >= before + expected.len() as u64 - 1,
                "{phase}: {} decode steps ran through graphs, expected {}",
                after - before,
                expected.len() - 1
            );
        }
        assert_all_blocks_free(&e);
    }
}

/// The decode lookahead (on a GPU the captured graphs launch each greedy step before the
/// host has the one before): requests that stop at different steps, one arriving while the
/// others decode and a seeded sampled one between them give the ids each gives alone, and
/// on the GPU the lookahead's steps were really used.
#[test]
fn requests_finishing_and_arriving_mid_decode_keep_their_ids() {
    let (dir, prompt, expected) = tiny("tiny_qwen3");
    let greedy = |n: usize| {
        let mut p = SamplingParams::greedy(n);
        p.ignore_eos = true;
        p
    };
    let e = engine(dir, |_| {});
    let seeded = sampled(Some(7), 6);
    let seeded_alone = run(&e, &[("alone", prompt.clone(), seeded.clone())]).remove(0);
    let used = crate::lookahead_steps_used();
    // Lengths that end at different steps (rows drop out of the decode batch one by one).
    let lens = [expected.len(), expected.len() - 3, 5, expected.len() - 1, 2];
    let receivers: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| submit(&e, &format!("g{i}"), prompt.clone(), greedy(n)))
        .collect();
    // Once the first has a token, one more greedy request and the seeded one arrive.
    wait_for_a_token(&receivers[0]);
    let late = submit(&e, "late", prompt.clone(), greedy(expected.len() - 2));
    let late_seeded = submit(&e, "seeded", prompt.clone(), seeded);
    for (i, rx) in receivers.iter().enumerate() {
        assert_eq!(final_tokens(&collect(rx)), expected[..lens[i]], "g{i}");
    }
    assert_eq!(final_tokens(&collect(&late)), expected[..expected.len() - 2], "late");
    assert_eq!(final_tokens(&collect(&late_seeded)), seeded_alone, "seeded");
    if let (Some(before), Some(after)) = (used, crate::lookahead_steps_used()) {
        assert!(after > before, "no decode step came from a lookahead launch");
    }
    assert_all_blocks_free(&e);
}

/// Waits for a request's first output (cumulative outputs: `collect` still ends with all
/// of its tokens).
fn wait_for_a_token(rx: &crossbeam_channel::Receiver<crate::engine_common::Event>) {
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(crate::engine_common::Event::Output(o)) => assert!(!o.finished, "finished at its first token"),
        _ => panic!("no first output"),
    }
}

/// Requests sharing a prompt prefix take its blocks from the prefix cache and give the
/// same ids as an engine without prefix caching.
#[test]
fn prefix_cache_hits_give_the_ids_of_a_cold_engine() {
    let (dir, prompt, _) = tiny("tiny_qwen2");
    let variants: Vec<Vec<u32>> = (0..4u32)
        .map(|i| {
            let mut p = prompt.clone();
            let last = p.len() - 1;
            p[last] = (p[last] + 1 + i) % 500;
            p.extend([7 + i, 40 + 3 * i]);
            p
        })
        .collect();
    let greedy = || {
        let mut p = SamplingParams::greedy(12);
        p.ignore_eos = true;
        p
    };
    let cold = engine(dir.clone(), |a| a.enable_prefix_caching = false);
    let expected: Vec<Vec<u32>> = variants
        .iter()
        .map(|v| run(&cold, &[("cold", v.clone(), greedy())]).remove(0))
        .collect();
    drop(cold);
    let warm = engine(dir, |_| {});
    // The first fills the cache; the others share all but the last blocks of the prompt.
    assert_eq!(run(&warm, &[("first", variants[0].clone(), greedy())])[0], expected[0]);
    let requests: Vec<(&str, Vec<u32>, SamplingParams)> = ["v1", "v2", "v3"]
        .iter()
        .zip(&variants[1..])
        .map(|(id, v)| (*id, v.clone(), greedy()))
        .collect();
    let receivers: Vec<_> = requests
        .iter()
        .map(|(id, p, s)| submit(&warm, id, p.clone(), s.clone()))
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        let outs = collect(rx);
        let last = outs.last().expect("an output");
        assert_eq!(final_tokens(&outs), expected[i + 1], "variant {}", i + 1);
        assert!(
            last.num_cached_tokens >= 4 * ((prompt.len() - 1) / 4),
            "variant {}: {} cached prompt tokens",
            i + 1,
            last.num_cached_tokens
        );
    }
    assert_all_blocks_free(&warm);
}
