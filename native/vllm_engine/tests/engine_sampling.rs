//! Sampling through the engine: seeds make outputs reproducible whatever else is in the
//! batch, and logprobs come from the model's raw logits.

mod engine_common;

use engine_common::*;
use vllm_engine::SamplingParams;

fn seeded(seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        seed,
        max_tokens: Some(30),
        temperature: 1.0,
        ..Default::default()
    }
}

#[test]
fn a_seeded_request_samples_the_same_alone_and_in_a_crowd() {
    let h = engine();
    let p = prompt(30, 12);
    let alone = final_tokens(&collect(&submit(&h.engine, "alone", p.clone(), seeded(Some(1234)))));
    assert_ne!(
        alone,
        reference_greedy(&h.palette, &p, 30),
        "temperature 1 should leave the argmax sometimes"
    );

    let crowd: Vec<_> = (0..6)
        .map(|i| {
            let params = if i % 2 == 0 { seeded(None) } else { seeded(Some(i)) };
            submit(
                &h.engine,
                &format!("crowd{i}"),
                prompt(31 + i as u32, 5 + i as usize),
                params,
            )
        })
        .collect();
    let again = final_tokens(&collect(&submit(&h.engine, "again", p.clone(), seeded(Some(1234)))));
    for rx in &crowd {
        collect(rx);
    }
    assert_eq!(alone, again);
    let other = final_tokens(&collect(&submit(&h.engine, "other", p, seeded(Some(99)))));
    assert_ne!(alone, other);
}

#[test]
fn unseeded_requests_follow_the_engine_seed() {
    let p = prompt(40, 12);
    let run = |seed: u64| {
        let mut a = args();
        a.seed = seed;
        let h = engine_with(a, FakeBehaviour::default());
        final_tokens(&collect(&submit(&h.engine, "x", p.clone(), seeded(None))))
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn logprobs_are_log_softmax_of_the_raw_logits() {
    let h = engine();
    let mut params = SamplingParams::greedy(6);
    params.logprobs = Some(2);
    params.temperature = 0.0;
    let outs = collect(&submit(&h.engine, "lp", prompt(41, 7), params));
    let fin = &outs.last().unwrap().outputs[0];
    let logprobs = fin.logprobs.as_ref().unwrap();
    assert_eq!(logprobs.len(), 6);
    // The fake model's logits: 10, 8, 7 and -20 for the rest of the vocabulary.
    let rest = (VOCAB - 3) as f64 * (-30f64).exp();
    let lse = 10.0 + (1.0 + (-2f64).exp() + (-3f64).exp() + rest).ln();
    for (step, token) in logprobs.iter().zip(&fin.token_ids) {
        assert_eq!(step.len(), 2, "sampled token (top-1) plus one alternative");
        assert_eq!((step[0].token_id, step[0].rank), (*token, 1));
        assert!((step[0].logprob as f64 - (10.0 - lse)).abs() < 1e-4);
        assert_eq!(step[1].rank, 2);
        assert!((step[1].logprob as f64 - (8.0 - lse)).abs() < 1e-4);
        assert!(step[0].decoded_token.is_some());
    }
    let cumulative = fin.cumulative_logprob.unwrap();
    assert!((cumulative - 6.0 * (10.0 - lse)).abs() < 1e-3);
}
