//! The model on the device `VLLM_TEST_DEVICE` names (default `cpu`; the GPU machine runs this
//! binary from a `cuda` build with `cuda`), in float32, through `CausalLM::new_kv_cache` so
//! the cache lives where the model does: batch invariance over interleaved prefill chunks
//! and decodes against the HF references of the tiny fixtures, and `load_format: dummy`.

mod engine_common;

use engine_common::model_files as common;

use common::{read_json, step, u32s, BlockAllocator, TestSeq};
use vllm_engine::config::{DType, Device, LoadFormat};
use vllm_engine::loader::load_causal_lm;
use vllm_engine::{EngineArgs, ErrorCategory};

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 96;

fn device() -> Device {
    let name = std::env::var("VLLM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Device::parse(&name).unwrap_or_else(|e| panic!("VLLM_TEST_DEVICE: {e}"))
}

fn args(path: std::path::PathBuf) -> EngineArgs {
    let mut args = EngineArgs::new(path);
    args.device = device();
    args.dtype = DType::F32;
    args
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "rows of different widths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Three copies of the fixture prompt, cut differently, run side by side (prefill chunks
/// of one beside decodes of another): each must give the reference logits at the end of
/// its prompt and then the reference greedy ids, as when run alone.
fn batch_invariance(name: &str) {
    let dir = common::fixtures_dir().join("tiny").join(name);
    let reference = read_json(dir.join("reference.json"));
    let prompt = u32s(&reference["prompt_token_ids"]);
    let expected_ids = u32s(&reference["greedy_token_ids"]);
    let expected: Vec<f32> = reference["last_logits"]
        .as_array()
        .expect("last_logits")
        .iter()
        .map(|x| x.as_f64().expect("a logit") as f32)
        .collect();
    let (model, _) = load_causal_lm(&args(dir)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut kv = model.new_kv_cache(NUM_BLOCKS, BLOCK_SIZE).expect("KV cache");
    let mut alloc = BlockAllocator::new(NUM_BLOCKS);
    let mut seqs = vec![TestSeq::new(&prompt), TestSeq::new(&prompt), TestSeq::new(&prompt)];
    // Prefill schedules (tokens per step) for each sequence; 0 = sits the step out.
    let schedules: [&[usize]; 3] = [&[24], &[0, 7, 9, 8], &[5, 0, 19]];
    let mut produced: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let mut next_chunk = [0usize; 3];
    for step_no in 0.. {
        assert!(step_no < 200, "{name}: the schedule does not finish");
        let counts: Vec<usize> = (0..3)
            .map(|i| {
                let left = seqs[i].tokens.len() - seqs[i].cached;
                if seqs[i].cached < prompt.len() {
                    let n = schedules[i].get(next_chunk[i]).copied().unwrap_or(left);
                    next_chunk[i] += 1;
                    n.min(left)
                } else if produced[i].len() < expected_ids.len() {
                    1
                } else {
                    0
                }
            })
            .collect();
        if counts.iter().all(|&n| n == 0) {
            break;
        }
        let rows = step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &counts);
        let mut rows = rows.into_iter();
        for i in 0..3 {
            if counts[i] == 0 {
                continue;
            }
            let row = rows.next().expect("a row per participating seq");
            if seqs[i].cached < seqs[i].tokens.len() {
                continue; // mid-prompt chunk: its logits predict a known token
            }
            if seqs[i].cached == prompt.len() {
                let d = max_diff(&row, &expected);
                assert!(d < 1e-3, "{name} seq {i}: last prompt logits differ by {d}");
            }
            let next = common::argmax(&row);
            produced[i].push(next);
            seqs[i].tokens.push(next);
        }
    }
    for (i, ids) in produced.iter().enumerate() {
        assert_eq!(ids, &expected_ids, "{name} seq {i}: greedy ids");
    }
}

#[test]
fn tiny_llama_batch_invariance() {
    batch_invariance("tiny_llama");
}

#[test]
fn tiny_qwen2_batch_invariance() {
    batch_invariance("tiny_qwen2");
}

#[test]
fn tiny_qwen3_batch_invariance() {
    batch_invariance("tiny_qwen3");
}

#[test]
fn tiny_mistral_batch_invariance() {
    batch_invariance("tiny_mistral");
}

/// The whole engine on the device: five copies of the fixture prompt submitted together
/// (a decode batch of 5, which the captured decode pads to 8 rows; copies 2-5 take the
/// first one's prompt blocks from the prefix cache), twice, then the same with
/// `enforce_eager`. Every copy must give HF's greedy ids both ways.
fn engine_greedy_matches_reference(name: &str) {
    let dir = common::fixtures_dir().join("tiny").join(name);
    let reference = read_json(dir.join("reference.json"));
    let prompt = u32s(&reference["prompt_token_ids"]);
    let expected = u32s(&reference["greedy_token_ids"]);
    for enforce_eager in [false, true] {
        let mut a = args(dir.clone());
        a.tokenizer = Some(engine_common::tokenizer_path());
        a.max_num_seqs = Some(8);
        a.block_size = BLOCK_SIZE;
        a.enforce_eager = enforce_eager;
        let engine = vllm_engine::Engine::new(a).unwrap_or_else(|e| panic!("{name}: {e}"));
        for pass in 0..2 {
            let receivers: Vec<_> = (0..5)
                .map(|i| {
                    let mut p = vllm_engine::SamplingParams::greedy(expected.len());
                    p.ignore_eos = true;
                    engine_common::submit(&engine, &format!("{pass}-{i}"), prompt.clone(), p)
                })
                .collect();
            for (i, rx) in receivers.iter().enumerate() {
                let got = engine_common::final_tokens(&engine_common::collect(rx));
                assert_eq!(
                    got, expected,
                    "{name}: copy {i}, pass {pass}, enforce_eager {enforce_eager}"
                );
            }
        }
        engine_common::assert_all_blocks_free(&engine);
    }
}

#[test]
fn tiny_llama_engine_greedy_with_and_without_graphs() {
    engine_greedy_matches_reference("tiny_llama");
}

#[test]
fn tiny_qwen2_engine_greedy_with_and_without_graphs() {
    engine_greedy_matches_reference("tiny_qwen2");
}

#[test]
fn tiny_qwen3_engine_greedy_with_and_without_graphs() {
    engine_greedy_matches_reference("tiny_qwen3");
}

#[test]
fn tiny_mistral_engine_greedy_with_and_without_graphs() {
    engine_greedy_matches_reference("tiny_mistral");
}

#[test]
fn dummy_weights_from_a_config_file_run() {
    let config = common::fixtures_dir().join("tiny/tiny_qwen3/config.json");
    let mut a = args(config);
    a.load_format = LoadFormat::Dummy;
    let (model, config) = load_causal_lm(&a).expect("dummy load");
    let mut kv = model.new_kv_cache(8, BLOCK_SIZE).expect("KV cache");
    let mut alloc = BlockAllocator::new(8);
    let mut seqs = vec![TestSeq::new(&[1, 2, 3, 4, 5, 6, 7])];
    let rows = step(model.as_ref(), &mut kv, &mut alloc, &mut seqs, &[7]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), config.vocab_size);
    assert!(rows[0].iter().all(|x| x.is_finite()), "dummy logits are finite");
}

#[test]
fn dummy_load_of_a_missing_config_is_not_found() {
    let mut a = args("/nonexistent/config.json".into());
    a.load_format = LoadFormat::Dummy;
    let err = load_causal_lm(&a).err().expect("a missing config must fail");
    assert_eq!(err.category, ErrorCategory::NotFound);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cpu_build_refuses_cuda_clearly() {
    let mut a = EngineArgs::new(common::fixtures_dir().join("tiny/tiny_llama"));
    a.device = Device::Cuda(0);
    let err = a.validate().expect_err("cuda without the feature must fail");
    assert_eq!(err.category, ErrorCategory::Unsupported);
    assert!(err.message.contains("cuda"), "{}", err.message);
}

#[test]
fn device_and_load_format_parse_like_vllm() {
    assert_eq!(Device::parse("cpu").ok(), Some(Device::Cpu));
    assert_eq!(Device::parse("cuda").ok(), Some(Device::Cuda(0)));
    assert_eq!(Device::parse("cuda:3").ok(), Some(Device::Cuda(3)));
    for bad in ["cuda:", "cuda:x", "tpu", ""] {
        assert_eq!(
            Device::parse(bad).err().map(|e| e.category),
            Some(ErrorCategory::Validation),
            "{bad:?}"
        );
    }
    assert_eq!(LoadFormat::parse("dummy").ok(), Some(LoadFormat::Dummy));
    assert_eq!(LoadFormat::parse("auto").ok(), Some(LoadFormat::Auto));
    assert!(LoadFormat::parse("pt").is_err());
}
