//! Sampling statistics through the engine, on a fake model whose next-token distribution
//! is known and the same at every step: a seeded request's 2,000 tokens follow the softmax
//! of the logits (after temperature, min-p, top-k, top-p), and never leave the allowed set.

mod sampling_common;

use std::collections::HashMap;

use sampling_common::*;
use vllm_engine::SamplingParams;

const TOKENS: [u32; 6] = [300, 301, 302, 303, 304, 305];
const LOGITS: [f32; 6] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5];
const SAMPLES: usize = 2000;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(7),
        max_tokens: Some(SAMPLES),
        ignore_eos: true,
        detokenize: false,
        ..Default::default()
    };
    f(&mut p);
    p
}

/// The distribution sampling should follow: softmax over `kept` tokens of LOGITS / t.
fn expected(kept: &[usize], temperature: f32) -> Vec<f64> {
    let scaled: Vec<f32> = kept.iter().map(|&i| LOGITS[i] / temperature).collect();
    softmax(&scaled)
}

fn check(name: &str, tokens: &[u32], kept: &[usize], temperature: f32) {
    assert_eq!(tokens.len(), SAMPLES, "{name}: every step samples");
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_default() += 1;
    }
    let allowed: Vec<u32> = kept.iter().map(|&i| TOKENS[i]).collect();
    for t in counts.keys() {
        assert!(
            allowed.contains(t),
            "{name}: sampled {t}, outside the allowed set {allowed:?}"
        );
    }
    let observed: Vec<usize> = allowed.iter().map(|t| counts.get(t).copied().unwrap_or(0)).collect();
    let probs = expected(kept, temperature);
    if kept.len() > 1 {
        let stat = chi_square(&observed, &probs);
        let critical = CHI2_CRITICAL_P001[kept.len() - 2];
        assert!(
            stat < critical,
            "{name}: chi-square {stat:.2} >= {critical} (p < 0.001); observed {observed:?}, expected {probs:?}"
        );
    }
}

#[test]
fn seeded_samples_follow_the_softmax_and_stay_inside_top_k_top_p_min_p() {
    let engine = fixed_engine(TOKENS.to_vec(), LOGITS.to_vec());
    let probs = softmax(&LOGITS);
    // top_p 0.7: the most likely tokens until their mass reaches 0.7.
    let mut mass = 0.0;
    let top_p_set: Vec<usize> = (0..6)
        .take_while(|&i| {
            let before = mass;
            mass += probs[i];
            before < 0.7
        })
        .collect();
    // min_p 0.3: tokens at least 0.3 times as likely as the most likely one.
    let min_p_set: Vec<usize> = (0..6).filter(|&i| probs[i] >= 0.3 * probs[0]).collect();
    assert!(top_p_set.len() > 1 && top_p_set.len() < 6, "{top_p_set:?}");
    assert!(min_p_set.len() > 1 && min_p_set.len() < 6, "{min_p_set:?}");

    let cases: Vec<(&str, SamplingParams, Vec<usize>, f32)> = vec![
        ("temperature 1", params(|_| {}), (0..6).collect(), 1.0),
        (
            "temperature 0.5",
            params(|p| p.temperature = 0.5),
            (0..6).collect(),
            0.5,
        ),
        ("top_k 3", params(|p| p.top_k = 3), vec![0, 1, 2], 1.0),
        ("top_p 0.7", params(|p| p.top_p = 0.7), top_p_set, 1.0),
        ("min_p 0.3", params(|p| p.min_p = 0.3), min_p_set, 1.0),
        (
            "top_k 4 and top_p 0.95 at temperature 2",
            params(|p| {
                p.top_k = 4;
                p.top_p = 0.95;
                p.temperature = 2.0;
            }),
            // At temperature 2 the top 4 carry less than 0.95 of all: top_p keeps all 4.
            vec![0, 1, 2, 3],
            2.0,
        ),
    ];
    let receivers: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, p, _, _))| submit(&engine, &format!("r{i}"), vec![10, 11, 12, 13], p.clone()))
        .collect();
    for ((name, _, kept, t), rx) in cases.iter().zip(&receivers) {
        let outs = collect(rx);
        check(name, &final_tokens(&outs), kept, *t);
    }
}

#[test]
fn temperature_zero_is_greedy_and_a_different_seed_gives_different_samples() {
    let engine = fixed_engine(TOKENS.to_vec(), LOGITS.to_vec());
    let run = |id: &str, p: SamplingParams| final_tokens(&collect(&submit(&engine, id, vec![10, 11], p)));
    let greedy = run(
        "greedy",
        params(|p| {
            p.temperature = 0.0;
            p.max_tokens = Some(50);
        }),
    );
    assert!(greedy.iter().all(|&t| t == TOKENS[0]));
    let short = |seed: u64| {
        params(|p| {
            p.seed = Some(seed);
            p.max_tokens = Some(50);
        })
    };
    let a = run("a", short(1));
    assert_eq!(a, run("a again", short(1)));
    assert_ne!(a, run("b", short(2)));
}
