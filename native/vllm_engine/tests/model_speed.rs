//! Rough CPU timings of SmolLM2 (run with `--ignored --nocapture`); asserts nothing.

mod common;

use std::time::Instant;

use common::{step, BlockAllocator, TestSeq};
use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::loader::load_causal_lm;
use vllm_engine::EngineArgs;

#[test]
#[ignore = "timing report, not a check"]
fn smollm2_timings() {
    let start = Instant::now();
    let (model, config) = load_causal_lm(&EngineArgs::new(common::smollm2_gguf())).unwrap();
    println!("load: {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    let new_cache = || {
        PagedKvCache::new(
            config.num_hidden_layers,
            512,
            16,
            config.num_key_value_heads,
            config.head_dim,
        )
    };
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 37 % 5000).collect();

    let mut kv = new_cache();
    let mut alloc = BlockAllocator::new(512);
    let mut seqs = [TestSeq::new(&prompt)];
    let t = Instant::now();
    step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &[128]);
    println!("prefill 128 tokens: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let steps = 20;
    let t = Instant::now();
    for _ in 0..steps {
        seqs[0].tokens.push(42);
        step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &[1]);
    }
    println!(
        "decode batch 1 (context ~140): {:.1} ms/step",
        t.elapsed().as_secs_f64() * 1e3 / steps as f64
    );

    let mut kv = new_cache();
    let mut alloc = BlockAllocator::new(512);
    let mut seqs: Vec<TestSeq> = (0..32).map(|i| TestSeq::new(&prompt[i..i + 64])).collect();
    step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &[64; 32]);
    let t = Instant::now();
    for _ in 0..steps {
        seqs.iter_mut().for_each(|s| s.tokens.push(42));
        step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &[1; 32]);
    }
    println!(
        "decode batch 32 (context ~70): {:.1} ms/step",
        t.elapsed().as_secs_f64() * 1e3 / steps as f64
    );
}
