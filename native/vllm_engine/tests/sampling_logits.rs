//! The logits processors at the sampler level: penalties, logit_bias, allowed_token_ids,
//! bad words and suppressed tokens change the logits exactly as their definitions say,
//! and the chosen token follows.

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vllm_engine::sampler::{candidate_probs, processed_logits, Sampler};
use vllm_engine::SamplingParams;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::greedy(1);
    f(&mut p);
    p
}

const LOGITS: [f32; 8] = [1.0, 2.0, -1.0, 3.0, 0.5, -2.0, 2.5, 0.0];

fn greedy_pick(p: &SamplingParams, context: &[u32], num_prompt: usize) -> u32 {
    Sampler::new(0)
        .sample(&LOGITS, p, context, num_prompt, &[], None)
        .token_id
}

#[test]
fn repetition_penalty_covers_prompt_and_output_and_divides_or_multiplies_by_sign() {
    // Prompt [1, 2], output [3]: all three are penalised, positive logits divided,
    // negative ones multiplied.
    let p = params(|p| p.repetition_penalty = 2.0);
    let got = processed_logits(&LOGITS, &p, &[1, 2, 3], 2, &[]);
    let mut want = LOGITS;
    want[1] = 2.0 / 2.0;
    want[2] = -2.0; // -1 * 2
    want[3] = 3.0 / 2.0;
    assert_eq!(got, want);
    // Token 3 was the argmax; penalised, token 6 wins.
    assert_eq!(greedy_pick(&p, &[1, 2, 3], 2), 6);
}

#[test]
fn presence_and_frequency_penalties_count_output_tokens_only() {
    // Prompt [3, 6, 6], output [6, 1, 6]: counts over the output only (6 twice, 1 once).
    let p = params(|p| {
        p.presence_penalty = 0.5;
        p.frequency_penalty = 0.25;
    });
    let got = processed_logits(&LOGITS, &p, &[3, 6, 6, 6, 1, 6], 3, &[]);
    let mut want = LOGITS;
    want[6] = 2.5 - 0.5 - 2.0 * 0.25;
    want[1] = 2.0 - 0.5 - 0.25;
    assert_eq!(got, want);
    assert_eq!(
        greedy_pick(&p, &[3, 6, 6, 6, 1, 6], 3),
        3,
        "token 3 only appears in the prompt"
    );

    // Negative penalties reward repetition: token 6 (2.5 + 1.0) now beats token 3.
    let p = params(|p| p.presence_penalty = -1.0);
    assert_eq!(greedy_pick(&p, &[0, 6], 1), 6);
}

#[test]
fn logit_bias_is_added_and_clamped_to_100() {
    let p = params(|p| {
        p.logit_bias.insert(5, 6.0);
        p.logit_bias.insert(0, -1000.0);
    });
    let got = processed_logits(&LOGITS, &p, &[], 0, &[]);
    let mut want = LOGITS;
    want[5] = -2.0 + 6.0;
    want[0] = 1.0 - 100.0;
    assert_eq!(got, want);
    assert_eq!(greedy_pick(&p, &[], 0), 5);
}

#[test]
fn allowed_token_ids_ban_every_other_token_even_when_sampling() {
    let p = params(|p| p.allowed_token_ids = Some(vec![0, 2, 7]));
    let got = processed_logits(&LOGITS, &p, &[], 0, &[]);
    for (i, (&g, &l)) in got.iter().zip(&LOGITS).enumerate() {
        if [0, 2, 7].contains(&i) {
            assert_eq!(g, l);
        } else {
            assert_eq!(g, f32::NEG_INFINITY, "token {i}");
        }
    }
    assert_eq!(greedy_pick(&p, &[], 0), 0);
    let mut sampling = p.clone();
    sampling.temperature = 1.0;
    let mut s = Sampler::new(3);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..500 {
        let t = s.sample(&LOGITS, &sampling, &[], 0, &[], Some(&mut rng)).token_id;
        assert!([0, 2, 7].contains(&t), "sampled {t}");
    }
}

#[test]
fn bad_words_ban_their_last_token_only_after_their_prefix_in_the_output() {
    let p = params(|p| p.bad_words_token_ids = vec![vec![3], vec![4, 6]]);
    // Single-token word: always banned.
    let got = processed_logits(&LOGITS, &p, &[9, 9], 2, &[]);
    assert_eq!(got[3], f32::NEG_INFINITY);
    assert_eq!(got[6], LOGITS[6], "prefix 4 not generated yet");
    // Output ends with 4: 6 is banned too.
    let got = processed_logits(&LOGITS, &p, &[9, 4], 1, &[]);
    assert_eq!(got[6], f32::NEG_INFINITY);
    assert_eq!(greedy_pick(&p, &[9, 4], 1), 1);
    // The prefix in the prompt does not count (vLLM looks at output tokens).
    let got = processed_logits(&LOGITS, &p, &[9, 4], 2, &[]);
    assert_eq!(got[6], LOGITS[6]);
}

#[test]
fn suppressed_tokens_are_banned_and_processors_apply_in_vllms_order() {
    // logit_bias before the repetition penalty: (3 + 2) / 2.
    let p = params(|p| {
        p.logit_bias.insert(3, 2.0);
        p.repetition_penalty = 2.0;
    });
    let got = processed_logits(&LOGITS, &p, &[3], 1, &[6]);
    assert_eq!(got[3], 2.5);
    assert_eq!(got[6], f32::NEG_INFINITY);
    assert_eq!(Sampler::new(0).sample(&LOGITS, &p, &[3], 1, &[6], None).token_id, 3);
}

#[test]
fn candidate_sets_of_top_k_top_p_and_min_p() {
    let ids = |p: SamplingParams| {
        let mut v: Vec<u32> = candidate_probs(&LOGITS, &p).iter().map(|&(t, _)| t).collect();
        v.sort();
        v
    };
    let sampling = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    };
    assert_eq!(ids(sampling(|p| p.top_k = 2)), vec![3, 6]);
    // Probabilities (softmax of LOGITS): 3 ≈ 0.44, 6 ≈ 0.27, 1 ≈ 0.16.
    assert_eq!(ids(sampling(|p| p.top_p = 0.7)), vec![3, 6]);
    assert_eq!(ids(sampling(|p| p.top_p = 0.75)), vec![1, 3, 6]);
    // min_p 0.5: at least half the top probability (e^-0.5 ≈ 0.61 for token 6, e^-1 for token 1).
    assert_eq!(ids(sampling(|p| p.min_p = 0.5)), vec![3, 6]);
    let probs = candidate_probs(&LOGITS, &sampling(|p| p.top_k = 2));
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    assert!((total - 1.0).abs() < 1e-9);
    let (p3, p6) = (probs[0].1, probs[1].1);
    assert!(
        (p3 / p6 - 0.5f64.exp()).abs() < 1e-6,
        "renormalised softmax over the kept tokens"
    );
}

#[test]
fn a_tiny_temperature_is_greedy() {
    let p = params(|p| p.temperature = 1e-6);
    assert!(p.is_greedy());
    assert_eq!(greedy_pick(&p, &[], 0), 3);
}

#[test]
fn top_p_over_a_large_flat_vocabulary_keeps_the_exact_smallest_set() {
    // 5,000 tokens: a few likely ones and a long flat tail, so the kept set must grow past
    // the first sorted head.
    let logits: Vec<f32> = (0..5000)
        .map(|i| if i % 1000 == 7 { 5.0 } else { (i % 13) as f32 * 0.01 })
        .collect();
    for top_p in [0.05, 0.5, 0.9, 0.999] {
        let p = SamplingParams {
            top_p,
            ..Default::default()
        };
        let got = candidate_probs(&logits, &p);
        // Reference: sort everything.
        let mut all: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, (l as f64).exp())).collect();
        let total: f64 = all.iter().map(|x| x.1).sum();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let n = all
            .iter()
            .position(|x| {
                mass += x.1 / total;
                mass >= top_p as f64 * (1.0 - 1e-6)
            })
            .unwrap()
            + 1;
        assert_eq!(got.len(), n, "top_p {top_p}");
        let want: Vec<u32> = all[..n].iter().map(|x| x.0 as u32).collect();
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), want, "top_p {top_p}");
    }
}

#[test]
fn a_prepared_batch_samples_exactly_as_row_by_row() {
    use vllm_engine::sampler::{prepare_batch, SampleRow};
    let vocab = 49152;
    let rows: Vec<Vec<f32>> = (0..32)
        .map(|r| {
            (0..vocab)
                .map(|i| (((i * 7919 + r * 104729) % 1000) as f32) / 150.0)
                .collect()
        })
        .collect();
    let params: Vec<SamplingParams> = (0..32)
        .map(|r| SamplingParams {
            top_p: [1.0, 0.9, 0.5][r % 3],
            top_k: [0, 50][r % 2],
            temperature: [0.0, 0.8, 1.2][r % 3],
            repetition_penalty: 1.1,
            logprobs: (r % 4 == 0).then_some(3),
            ..Default::default()
        })
        .collect();
    let context: Vec<u32> = (0..200).map(|i| i * 31 % vocab as u32).collect();
    let start = std::time::Instant::now();
    let mut one = Sampler::new(9);
    let mut rngs: Vec<ChaCha8Rng> = (0..32).map(ChaCha8Rng::seed_from_u64).collect();
    let expected: Vec<_> = (0..32)
        .map(|r| {
            let rng = (r % 2 == 0).then(|| &mut rngs[r]);
            one.sample(&rows[r], &params[r], &context, 100, &[], rng)
        })
        .collect();
    let row_by_row = start.elapsed();

    let mut batch = Sampler::new(9);
    let mut rngs: Vec<ChaCha8Rng> = (0..32).map(ChaCha8Rng::seed_from_u64).collect();
    let inputs: Vec<SampleRow> = (0..32)
        .map(|r| SampleRow {
            logits: &rows[r],
            params: &params[r],
            context: &context,
            num_prompt_tokens: 100,
            suppressed: &[],
        })
        .collect();
    // Warm the thread pool first: its start-up is not the sampler's cost.
    let _ = prepare_batch(&inputs[..2]);
    let start = std::time::Instant::now();
    let prepared = prepare_batch(&inputs);
    let got: Vec<_> = prepared
        .into_iter()
        .enumerate()
        .map(|(r, p)| {
            let rng = (r % 2 == 0).then(|| &mut rngs[r]);
            batch.draw(&rows[r], &params[r], p, rng)
        })
        .collect();
    let batched = start.elapsed();
    assert_eq!(got, expected);
    eprintln!("32 rows of {vocab}: row by row {row_by_row:?}, batched {batched:?}");
}
