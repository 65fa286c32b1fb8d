//! SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32) against HF transformers references,
//! one prompt at a time and all prompts batched together.

mod common;

use std::sync::{Mutex, OnceLock};

use common::{greedy, log_softmax, smollm2_cases, step, BlockAllocator, TestSeq};
use vllm_engine::config::ModelConfig;
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::models::CausalLM;
use vllm_engine::EngineArgs;

const BLOCK_SIZE: usize = 16;

type Model = (Box<dyn CausalLM>, ModelConfig);

/// Loaded once per test binary (dequantizing takes a few seconds).
fn model() -> &'static Mutex<Model> {
    static MODEL: OnceLock<Mutex<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let args = EngineArgs::new(common::smollm2_gguf());
        Mutex::new(load_causal_lm(&args).unwrap_or_else(|e| panic!("cannot load SmolLM2: {e}")))
    })
}

fn new_cache(config: &ModelConfig, num_blocks: usize) -> PagedKvCache {
    PagedKvCache::new(
        config.num_hidden_layers,
        num_blocks,
        BLOCK_SIZE,
        config.num_key_value_heads,
        config.head_dim,
    )
}

#[test]
fn smollm2_greedy_and_logprobs_match_reference() {
    let guard = model().lock().unwrap();
    let (model, config) = &*guard;
    let mut worst = 0.0f64;
    for case in smollm2_cases() {
        let mut kv = new_cache(config, 32);
        let mut alloc = BlockAllocator::new(32);
        let run = greedy(
            model.as_ref(),
            &mut kv,
            &mut alloc,
            &case.prompt,
            &[],
            case.greedy.len(),
        );
        assert_eq!(run.ids, case.greedy, "case {}: greedy ids", case.name);
        for (step, top) in case.top.iter().enumerate() {
            let logprobs = log_softmax(&run.logits[step]);
            for &(id, expected) in top {
                let got = logprobs[id as usize];
                worst = worst.max((got - expected).abs());
                assert!(
                    (got - expected).abs() < 1e-3,
                    "case {} step {step} token {id}: logprob {got} vs {expected}",
                    case.name
                );
            }
        }
    }
    eprintln!("largest top-5 logprob error: {worst:.2e}");
}

#[test]
fn smollm2_batched_prompts_with_interleaved_decodes_match_each_alone() {
    let guard = model().lock().unwrap();
    let (model, config) = &*guard;
    let cases = smollm2_cases();
    let mut kv = new_cache(config, 256);
    let mut alloc = BlockAllocator::new(256);
    let mut seqs: Vec<TestSeq> = cases.iter().map(|c| TestSeq::new(&c.prompt)).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    // Seq i joins at step i, so its prefill shares a batch with the others' decodes; long
    // prompts are prefilled in chunks of at most 64 tokens.
    let mut step_index = 0;
    while generated.iter().zip(&cases).any(|(g, c)| g.len() < c.greedy.len()) {
        let counts: Vec<usize> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i > step_index || generated[i].len() == cases[i].greedy.len() {
                    0
                } else {
                    (s.tokens.len() - s.cached).min(64)
                }
            })
            .collect();
        let logits = step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &counts);
        let mut rows = logits.into_iter();
        for (i, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let row = rows.next().unwrap();
            if seqs[i].cached == seqs[i].tokens.len() {
                let next = common::argmax(&row);
                generated[i].push(next);
                seqs[i].tokens.push(next);
            }
        }
        step_index += 1;
    }
    for (case, ids) in cases.iter().zip(&generated) {
        assert_eq!(ids, &case.greedy, "case {}: batched greedy ids", case.name);
    }
}

/// `dtype: "bfloat16"` on the CPU rounds the weights to bf16 (and, with AVX512_BF16, the
/// matmul inputs, multiplied by `vdpbf16ps` into float32 sums): the
/// first step of every case must still pick the reference token, with its top-5 logprobs
/// within the rounding's reach.
#[test]
fn smollm2_bf16_weights_follow_the_reference() {
    let mut args = EngineArgs::new(common::smollm2_gguf());
    args.dtype = vllm_engine::config::DType::BF16;
    let (model, config) = load_causal_lm(&args).unwrap_or_else(|e| panic!("cannot load SmolLM2: {e}"));
    let mut worst = 0.0f64;
    let mut agree = 0;
    let mut total = 0;
    for case in smollm2_cases() {
        let mut kv = new_cache(&config, 32);
        let mut alloc = BlockAllocator::new(32);
        let run = greedy(
            model.as_ref(),
            &mut kv,
            &mut alloc,
            &case.prompt,
            &[],
            case.greedy.len(),
        );
        // A reference whose top two are closer than bf16's reach (the fixtures' "digits":
        // 0.006 apart) may legitimately pick its second.
        let top = &case.top[0];
        if top[0].1 - top[1].1 < 0.1 {
            assert!(
                run.ids[0] == top[0].0 || run.ids[0] == top[1].0,
                "case {}: first greedy id {} is neither of the reference's two nearly tied ids",
                case.name,
                run.ids[0]
            );
        } else {
            assert_eq!(run.ids[0], case.greedy[0], "case {}: first greedy id", case.name);
        }
        agree += run.ids.iter().zip(&case.greedy).take_while(|(a, b)| a == b).count();
        total += case.greedy.len();
        let logprobs = log_softmax(&run.logits[0]);
        for &(id, expected) in &case.top[0] {
            worst = worst.max((logprobs[id as usize] - expected).abs());
        }
    }
    eprintln!("bf16 weights: {agree}/{total} greedy ids before the first divergence; worst step-0 top-5 logprob error {worst:.3}");
    assert!(worst < 0.15, "step-0 top-5 logprob error {worst}");
}
