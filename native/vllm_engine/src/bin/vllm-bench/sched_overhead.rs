//! Scheduler overhead per step without a model: `batch` requests decode while the
//! scheduler and the KV cache manager do their bookkeeping (what the engine core does
//! around a forward pass, minus the forward and the sampling).

use std::time::Instant;

use vllm_engine::config::SchedulingPolicy;
use vllm_engine::kv_cache::KvCacheManager;
use vllm_engine::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use vllm_engine::sequence::Sequence;
use vllm_engine::SamplingParams;

const PROMPT_LEN: usize = 128;
const STEPS: usize = 1000;
const BLOCK_SIZE: usize = 16;

pub fn run(batch: usize) -> Result<(), String> {
    for caching in [false, true] {
        for policy in [SchedulingPolicy::Fcfs, SchedulingPolicy::Priority] {
            let us = time_steps(batch, caching, policy)?;
            println!(
                "scheduler step, {batch} running, prefix caching {}, {policy:?}: {us:.1} us",
                if caching { "on " } else { "off" }
            );
        }
    }
    Ok(())
}

fn time_steps(batch: usize, caching: bool, policy: SchedulingPolicy) -> Result<f64, String> {
    let blocks = batch * (PROMPT_LEN + STEPS + BLOCK_SIZE).div_ceil(BLOCK_SIZE);
    let config = SchedulerConfig {
        max_num_seqs: batch,
        max_num_batched_tokens: batch * PROMPT_LEN,
        enable_chunked_prefill: true,
        policy,
    };
    let kv = KvCacheManager::new(blocks, BLOCK_SIZE).with_prefix_caching(caching);
    let mut s = Scheduler::new(config, kv);
    for i in 0..batch as u64 {
        let prompt = (0..PROMPT_LEN as u64)
            .map(|j| ((i * 7919 + j * 31) % 49_000) as u32)
            .collect();
        let seq = Sequence::new(
            i,
            format!("r{i}"),
            prompt,
            SamplingParams::greedy(STEPS + 10),
            1 << 20,
            0,
            i,
        );
        s.add(seq);
    }
    let prefill = s.schedule();
    complete(&mut s, &prefill);
    if s.num_running() != batch {
        return Err(format!("only {} of {batch} requests started", s.num_running()));
    }
    let start = Instant::now();
    for _ in 0..STEPS {
        let out = s.schedule();
        if out.scheduled.len() != batch {
            return Err(format!("a step scheduled {} of {batch} requests", out.scheduled.len()));
        }
        complete(&mut s, &out);
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / STEPS as f64)
}

/// What the engine core does after the forward pass: advance, append the sampled token.
fn complete(s: &mut Scheduler, out: &SchedulerOutput) {
    for x in &out.scheduled {
        if let Some(seq) = s.seq_mut(x.seq_id) {
            seq.num_computed_tokens += x.num_new_tokens;
            if seq.num_computed_tokens == seq.num_tokens() {
                let next = (seq.num_tokens() as u32 * 13) % 49_000;
                seq.token_ids.push(next);
            }
        }
    }
}
