//! SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized) on the device against
//! fixtures/smollm2_reference.json (HF transformers, float32): float32 greedy ids of every
//! case through the engine, all cases batched; bfloat16 and float16 teacher-forced over
//! prompt + reference ids against float32 on the same device.

use vllm_engine::config::DType;
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::models::{CausalLM, ForwardBatch, SeqSlice};
use vllm_engine::{Engine, SamplingParams};

use crate::common::{log_softmax, smollm2_cases, smollm2_gguf, SmolLm2Case};
use crate::engine_common::{assert_all_blocks_free, collect, final_tokens, submit};

const BLOCK_SIZE: usize = 16;

/// Every case at once through the engine (decode graphs on): the reference's 32 greedy ids.
#[test]
fn smollm2_f32_greedy_ids_of_every_case_batched() {
    let mut a = crate::args(smollm2_gguf(), DType::F32);
    a.max_num_seqs = Some(16);
    let engine = Engine::new(a).unwrap_or_else(|e| panic!("SmolLM2: {e}"));
    let cases = smollm2_cases();
    let receivers: Vec<_> = cases
        .iter()
        .map(|c| {
            let mut p = SamplingParams::greedy(c.greedy.len());
            p.ignore_eos = true;
            submit(&engine, &c.name, c.prompt.clone(), p)
        })
        .collect();
    for (c, rx) in cases.iter().zip(&receivers) {
        assert_eq!(final_tokens(&collect(rx)), c.greedy, "case {}", c.name);
    }
    assert_all_blocks_free(&engine);
}

/// Logprob of each reference token at every position after the prompt, the whole
/// sequence fed in one step (teacher forcing), and whether it is the row's argmax.
fn teacher_forced(model: &dyn CausalLM, case: &SmolLm2Case) -> (Vec<f64>, Vec<bool>, Vec<Vec<f64>>) {
    let tokens: Vec<u32> = case.prompt.iter().chain(&case.greedy).copied().collect();
    let blocks = tokens.len().div_ceil(BLOCK_SIZE);
    let mut kv: PagedKvCache = model.new_kv_cache(blocks, BLOCK_SIZE).expect("KV cache");
    let batch = ForwardBatch {
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: tokens.len(),
            context_len: tokens.len(),
            block_table: (0..blocks as u32).rev().collect(),
            want_logits: true,
            logits_for_all_tokens: true,
            lora_slot: None,
        }],
        token_ids: tokens.clone(),
        positions: (0..tokens.len()).collect(),
        lookahead: false,
    };
    let rows = model
        .forward(&batch, &mut kv)
        .expect("forward")
        .to_vec2::<f32>()
        .expect("logits");
    assert_eq!(rows.len(), tokens.len());
    let first = case.prompt.len() - 1;
    let mut logprobs = Vec::new();
    let mut argmax_ok = Vec::new();
    let mut all = Vec::new();
    for (j, &reference) in case.greedy.iter().enumerate() {
        let row = &rows[first + j];
        let lp = log_softmax(row);
        logprobs.push(lp[reference as usize]);
        argmax_ok.push(crate::common::argmax(row) == reference);
        all.push(lp);
    }
    (logprobs, argmax_ok, all)
}

fn low_precision_tracks_f32(dtype: DType, label: &str) {
    let (f32_model, _) = load_causal_lm(&crate::args(smollm2_gguf(), DType::F32)).expect("SmolLM2 f32");
    let (low, _) = load_causal_lm(&crate::args(smollm2_gguf(), dtype)).expect("SmolLM2 low precision");
    let (mut worst_ref, mut worst, mut sum, mut n, mut agree) = (0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    for case in smollm2_cases() {
        let (lp32, ok32, all32) = teacher_forced(f32_model.as_ref(), &case);
        // float32 first: the reference's top-5 logprobs of the early steps, every argmax.
        for (step, top) in case.top.iter().enumerate() {
            for &(id, expected) in top {
                worst_ref = worst_ref.max((all32[step][id as usize] - expected).abs());
            }
        }
        assert!(
            ok32.iter().all(|&x| x),
            "case {}: float32 teacher-forced argmax",
            case.name
        );
        let (lp, ok, _) = teacher_forced(low.as_ref(), &case);
        for (a, b) in lp.iter().zip(&lp32) {
            let err = (a - b).abs();
            worst = worst.max(err);
            sum += err;
            n += 1;
        }
        agree += ok.iter().filter(|&&x| x).count();
    }
    let mean = sum / n as f64;
    let rate = agree as f64 / n as f64;
    eprintln!(
        "SmolLM2 {label}: reference-token logprob error vs float32 max {worst:.4}, mean {mean:.4}; argmax = reference at {agree}/{n} ({:.1}%); float32 vs HF top-5 max {worst_ref:.2e}",
        100.0 * rate
    );
    assert!(
        worst_ref < 1e-3,
        "float32 top-5 logprobs off the reference by {worst_ref}"
    );
    assert!(worst < 0.1, "{label}: a reference token's logprob is off by {worst}");
    assert!(mean < 0.03, "{label}: mean logprob error {mean}");
    assert!(rate >= 0.9, "{label}: argmax = reference at {:.1}%", 100.0 * rate);
}

#[test]
fn smollm2_bf16_teacher_forced_tracks_f32() {
    low_precision_tracks_f32(DType::BF16, "bfloat16");
}

#[test]
fn smollm2_f16_teacher_forced_tracks_f32() {
    low_precision_tracks_f32(DType::F16, "float16");
}
