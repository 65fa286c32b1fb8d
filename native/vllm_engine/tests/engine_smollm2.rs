//! The real model through the whole engine (Engine::new on the SmolLM2 GGUF): every
//! reference prompt submitted at once, streamed, detokenized and checked against the
//! HF transformers reference.

mod engine_common;

use engine_common::*;
use vllm_engine::{Engine, EngineArgs, FinishReason, OutputKind, SamplingParams, StopReason};

fn engine() -> Engine {
    let mut args = EngineArgs::new(smollm2_gguf());
    args.max_model_len = Some(512);
    args.max_num_seqs = Some(16);
    // A small budget so the prompts are prefilled in chunks beside other requests' decodes.
    args.max_num_batched_tokens = Some(24);
    Engine::new(args).unwrap_or_else(|e| panic!("cannot start the engine on SmolLM2: {e}"))
}

#[test]
fn all_reference_prompts_at_once_match_the_reference_and_stream_cleanly() {
    let engine = engine();
    let cases = smollm2_cases();
    let receivers: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut params = SamplingParams::greedy(c.greedy.len());
            params.logprobs = Some(5);
            // The reference runs past EOS and decodes special tokens.
            params.ignore_eos = true;
            params.skip_special_tokens = false;
            params.output_kind = if i % 2 == 1 {
                OutputKind::Delta
            } else {
                OutputKind::Cumulative
            };
            submit(&engine, &format!("case{i}"), c.prompt.clone(), params)
        })
        .collect();
    for (i, (rx, case)) in receivers.iter().zip(&cases).enumerate() {
        let outs = collect(rx);
        let (tokens, text, logprobs) = if i % 2 == 1 {
            let tokens: Vec<u32> = outs.iter().flat_map(|o| o.outputs[0].token_ids.clone()).collect();
            let text: String = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
            let lps: Vec<_> = outs
                .iter()
                .flat_map(|o| o.outputs[0].logprobs.clone().unwrap())
                .collect();
            (tokens, text, lps)
        } else {
            let fin = &outs.last().unwrap().outputs[0];
            (fin.token_ids.clone(), fin.text.clone(), fin.logprobs.clone().unwrap())
        };
        assert_eq!(tokens, case.greedy, "case {i}: greedy ids");
        assert_eq!(text, case.text, "case {i}: text");
        assert_eq!(
            outs.last().unwrap().outputs[0].finish_reason,
            Some(FinishReason::Length)
        );
        for (step, reference) in case.top.iter().enumerate() {
            for (rank, &(id, lp)) in reference.iter().enumerate() {
                let got = logprobs[step]
                    .iter()
                    .find(|l| l.token_id == id)
                    .unwrap_or_else(|| panic!("case {i} step {step}: token {id} missing from the top-5"));
                assert!(
                    (got.logprob as f64 - lp).abs() < 1e-3,
                    "case {i} step {step}: {} vs {lp}",
                    got.logprob
                );
                assert_eq!(got.rank, rank + 1, "case {i} step {step}: rank of {id}");
            }
        }
    }
    assert_all_blocks_free(&engine);
}

#[test]
fn a_stop_string_in_real_text_is_cut_and_never_streamed() {
    let engine = engine();
    let case = &smollm2_cases()[0];
    // ", the city of Nova Haven was ...": stop at "Nova".
    let mut params = SamplingParams::greedy(32);
    params.stop = vec![" Nova".to_string()];
    params.output_kind = OutputKind::Delta;
    let outs = collect(&submit(&engine, "stop", case.prompt.clone(), params));
    let streamed: String = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
    let expected = &case.text[..case.text.find(" Nova").expect("the reference text has Nova")];
    assert_eq!(streamed, expected);
    let fin = &outs.last().unwrap().outputs[0];
    assert_eq!(fin.stop_reason, Some(StopReason::Text(" Nova".into())));
    assert_all_blocks_free(&engine);
}

/// As vLLM's `kv_cache_dtype: "auto"`: a bfloat16 model keeps bfloat16 keys and values, so
/// the same KV memory holds twice the blocks the float32 cache of the default dtype does,
/// and a request through it frees every block. (Its outputs are checked against float32
/// in sampling_smollm2's bf16 test.)
#[test]
fn a_bf16_model_holds_twice_the_kv_blocks_in_the_same_memory() {
    let budget = 64 << 20;
    let start = |dtype| {
        let mut args = EngineArgs::new(smollm2_gguf());
        args.max_model_len = Some(512);
        args.kv_cache_memory_bytes = Some(budget);
        args.dtype = dtype;
        Engine::new(args).unwrap_or_else(|e| panic!("cannot start SmolLM2 ({dtype:?}): {e}"))
    };
    let f32_blocks = start(vllm_engine::config::DType::Auto).limits().num_blocks;
    let bf16 = start(vllm_engine::config::DType::BF16);
    let bf16_blocks = bf16.limits().num_blocks;
    // SmolLM2-135M: 30 layers, 3 kv heads of 64, blocks of 16 → 737,280 float32 bytes.
    let f32_block = vllm_engine::kv_cache::PagedKvCache::bytes_per_block(30, bf16.limits().block_size, 3, 64);
    assert_eq!(f32_blocks, budget / f32_block);
    assert_eq!(bf16_blocks, 2 * budget / f32_block);
    let case = &smollm2_cases()[0];
    let outs = collect(&submit(&bf16, "bf16", case.prompt.clone(), SamplingParams::greedy(4)));
    assert_eq!(final_tokens(&outs).len(), 4);
    assert_all_blocks_free(&bf16);
}
