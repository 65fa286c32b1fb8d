//! The device sampler (kernels/sampling.cu through `CausalLM::forward_sample`) against an
//! oracle built from the host sampler (`sampler::candidate_probs`, `processed_logits`),
//! on the same logits. On the CPU `forward_sample` answers None and the oracle itself
//! picks, so the invariants then check the host rules.

use vllm_engine::config::DType;
use vllm_engine::device_sampling::{penalty_tokens, DeviceSampleRow};
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::models::{CausalLM, ForwardBatch, SeqSlice};
use vllm_engine::sampler::{candidate_probs, processed_logits};
use vllm_engine::SamplingParams;

use crate::common::{read_json, u32s};

const BLOCK_SIZE: usize = 4;

struct Setup {
    model: Box<dyn CausalLM>,
    kv: PagedKvCache,
    prompt: Vec<u32>,
}

fn setup(copies: usize) -> Setup {
    let dir = crate::common::fixtures_dir().join("tiny/tiny_qwen3");
    let prompt = u32s(&read_json(dir.join("reference.json"))["prompt_token_ids"]);
    let (model, _) = load_causal_lm(&crate::args(dir, DType::F32)).expect("tiny_qwen3");
    let blocks = copies * prompt.len().div_ceil(BLOCK_SIZE);
    let kv = model.new_kv_cache(blocks, BLOCK_SIZE).expect("KV cache");
    Setup { model, kv, prompt }
}

/// `copies` copies of the prompt, each over its own blocks, prefilled in one step.
fn batch(prompt: &[u32], copies: usize) -> ForwardBatch {
    let per = prompt.len().div_ceil(BLOCK_SIZE);
    let mut b = ForwardBatch::default();
    for i in 0..copies {
        b.seqs.push(SeqSlice {
            query_start: b.token_ids.len(),
            query_len: prompt.len(),
            context_len: prompt.len(),
            // Reversed tables: no copy's blocks are contiguous.
            block_table: (0..per).rev().map(|j| (i * per + j) as u32).collect(),
            want_logits: true,
            logits_for_all_tokens: false,
            lora_slot: None,
        });
        b.token_ids.extend_from_slice(prompt);
        b.positions.extend(0..prompt.len());
    }
    b
}

fn row(f: impl FnOnce(&mut DeviceSampleRow)) -> DeviceSampleRow {
    let mut r = DeviceSampleRow {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        uniform: 0.5,
        penalty_tokens: Vec::new(),
    };
    f(&mut r);
    r
}

fn params_of(r: &DeviceSampleRow) -> SamplingParams {
    SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k as i32,
        top_p: r.top_p,
        min_p: r.min_p,
        repetition_penalty: r.repetition_penalty,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        ..Default::default()
    }
}

/// The context a row's penalty list describes (each distinct token once in the prompt
/// part, then `count` times in the output part): what `processed_logits` needs.
fn context_of(r: &DeviceSampleRow) -> (Vec<u32>, usize) {
    let prompt: Vec<u32> = r.penalty_tokens.iter().map(|&(t, _)| t).collect();
    let n = prompt.len();
    let mut context = prompt;
    for &(t, c) in &r.penalty_tokens {
        context.extend(std::iter::repeat_n(t, c as usize));
    }
    (context, n)
}

fn argmax(xs: &[f32]) -> u32 {
    vllm_engine::sampler::argmax(xs)
}

/// The host rules for one row: penalties, then greedy or the candidates of
/// `candidate_probs` walked in vocabulary order with the row's uniform.
fn oracle(logits: &[f32], r: &DeviceSampleRow) -> u32 {
    let params = params_of(r);
    let (context, n) = context_of(r);
    let work = processed_logits(logits, &params, &context, n, &[]);
    if params.is_greedy() {
        return argmax(&work);
    }
    let mut probs = candidate_probs(&work, &params);
    probs.sort_by_key(|&(id, _)| id);
    let mut acc = 0.0;
    for &(id, p) in &probs {
        acc += p;
        if (r.uniform as f64) < acc {
            return id;
        }
    }
    probs.last().map_or(0, |&(id, _)| id)
}

/// The host candidate set of a row (what any draw may return).
fn candidates(logits: &[f32], r: &DeviceSampleRow) -> Vec<(u32, f64)> {
    let params = params_of(r);
    let (context, n) = context_of(r);
    candidate_probs(&processed_logits(logits, &params, &context, n, &[]), &params)
}

/// Row i sampled with rows[i]: the device's picks (their reported raw logits checked), or
/// on the CPU the oracle's. Also returns the logits the picks came from.
fn sample(s: &mut Setup, rows: &[DeviceSampleRow]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let b = batch(&s.prompt, rows.len());
    let logits = s
        .model
        .forward(&b, &mut s.kv)
        .expect("forward")
        .to_vec2::<f32>()
        .expect("logits");
    match s.model.forward_sample(&b, &mut s.kv, rows).expect("forward_sample") {
        Some((ids, raw)) => {
            assert_eq!(ids.len(), rows.len());
            for ((&id, &v), l) in ids.iter().zip(&raw).zip(&logits) {
                assert!(
                    (v - l[id as usize]).abs() < 1e-4,
                    "reported logit {v} vs {}",
                    l[id as usize]
                );
            }
            (ids, logits)
        }
        None => {
            assert!(!crate::on_gpu(), "a GPU model must sample on the device");
            let ids = rows.iter().zip(&logits).map(|(r, l)| oracle(l, r)).collect();
            (ids, logits)
        }
    }
}

#[test]
fn device_sampler_reduces_to_greedy_where_it_must() {
    let rows = vec![
        row(|r| r.temperature = 0.0),
        row(|r| r.temperature = 1e-6),
        row(|r| {
            r.top_k = 1;
            r.temperature = 3.0;
            r.uniform = 0.99;
        }),
        row(|r| {
            r.top_p = 1e-6;
            r.uniform = 0.99;
        }),
        row(|r| {
            r.min_p = 1.0;
            r.uniform = 0.7;
        }),
        row(|r| {
            r.top_k = 5;
            r.top_p = 1e-6;
            r.temperature = 2.0;
            r.uniform = 0.01;
        }),
    ];
    let mut s = setup(rows.len());
    let (ids, logits) = sample(&mut s, &rows);
    for (i, (id, l)) in ids.iter().zip(&logits).enumerate() {
        assert_eq!(*id, argmax(l), "row {i} must pick the argmax");
    }
}

#[test]
fn penalties_change_the_pick_as_the_host_sampler_does() {
    let mut s = setup(1);
    let (_, logits) = sample(&mut s, &[row(|r| r.temperature = 0.0)]);
    let l = &logits[0];
    let best = argmax(l);
    let mut order: Vec<u32> = (0..l.len() as u32).collect();
    order.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
    let second = order[1];
    // The prompt once, then the best token twice and the runner-up once in the output.
    let mut context = s.prompt.clone();
    context.extend([best, best, second]);
    let penalties = penalty_tokens(&context, s.prompt.len());
    let rows = vec![
        row(|r| r.temperature = 0.0),
        row(|r| {
            r.temperature = 0.0;
            r.repetition_penalty = 1.3;
            r.presence_penalty = 0.5;
            r.frequency_penalty = 2.0;
            r.penalty_tokens = penalties.clone();
        }),
        row(|r| {
            r.temperature = 0.0;
            r.repetition_penalty = 2.0;
            r.penalty_tokens = penalties.clone();
        }),
        row(|r| {
            r.temperature = 0.0;
            r.presence_penalty = -3.0;
            r.penalty_tokens = penalties.clone();
        }),
    ];
    let mut s = setup(rows.len());
    let (ids, logits) = sample(&mut s, &rows);
    assert_eq!(ids[0], argmax(&logits[0]), "no penalty: the argmax");
    let mut changed = 0;
    for i in 1..rows.len() {
        let params = params_of(&rows[i]);
        let expected = argmax(&processed_logits(&logits[i], &params, &context, s.prompt.len(), &[]));
        assert_eq!(ids[i], expected, "row {i}: the host sampler's pick on the same logits");
        changed += usize::from(ids[i] != argmax(&logits[i]));
    }
    assert!(changed >= 1, "the penalties changed no pick: the test shows nothing");
}

#[test]
fn draws_follow_the_filtered_distribution_and_repeat() {
    const PER_STEP: usize = 64;
    const DRAWS: usize = 1024;
    let filters = |r: &mut DeviceSampleRow| {
        r.temperature = 0.7;
        r.top_k = 40;
        r.top_p = 0.9;
        r.min_p = 0.01;
    };
    let mut s = setup(PER_STEP);
    let mut picks = Vec::with_capacity(DRAWS);
    let mut logits_seen = Vec::new();
    for chunk in 0..DRAWS / PER_STEP {
        // Stratified uniforms: the picks' histogram then matches the probabilities to 1/DRAWS.
        let rows: Vec<DeviceSampleRow> = (0..PER_STEP)
            .map(|j| {
                let u = ((chunk * PER_STEP + j) as f32 + 0.5) / DRAWS as f32;
                row(|r| {
                    filters(r);
                    r.uniform = u;
                })
            })
            .collect();
        let (ids, logits) = sample(&mut s, &rows);
        let again = sample(&mut s, &rows).0;
        assert_eq!(ids, again, "the same uniforms must give the same ids");
        for ((id, l), r) in ids.into_iter().zip(logits).zip(&rows) {
            picks.push((id, oracle(&l, r)));
            logits_seen.push(l);
        }
    }
    let reference = row(filters);
    let cands = candidates(&logits_seen[0], &reference);
    assert!(
        cands.len() > 3,
        "the filters left {} tokens: too few to test a draw",
        cands.len()
    );
    assert!(cands.len() <= 40, "top_k 40 kept {}", cands.len());
    let allowed: std::collections::HashMap<u32, f64> = cands.iter().copied().collect();
    let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for &(id, _) in &picks {
        assert!(allowed.contains_key(&id), "drew {id}, outside the filtered set");
        *counts.entry(id).or_default() += 1;
    }
    for (&id, &p) in &allowed {
        let freq = counts.get(&id).copied().unwrap_or(0) as f64 / DRAWS as f64;
        assert!(
            (freq - p).abs() < 0.01,
            "token {id}: drawn {freq:.4}, probability {p:.4}"
        );
    }
    let agree = picks.iter().filter(|(a, b)| a == b).count();
    assert!(
        agree * 100 >= DRAWS * 99,
        "device and host picks agree on {agree}/{DRAWS} draws"
    );
}
