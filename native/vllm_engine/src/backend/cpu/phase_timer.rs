//! `VLLM_STEP_TIMING=1`: wall time per phase of the CPU forward pass, summed over steps and
//! printed when the model is dropped, decode-only steps (one new token per sequence) apart
//! from steps that carry prompt tokens, and batched decode steps (≥ `BATCHED_SEQS`
//! sequences) apart from small ones. Off, a phase costs one branch on a cached flag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The phases of one decoder forward pass.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Embed,
    Norm,
    Qkv,
    Rotary,
    Attention,
    OProj,
    GateUp,
    Act,
    Down,
    Lora,
    LmHead,
}

const NAMES: [&str; 11] = [
    "embed",
    "norms",
    "qkv",
    "rotary+kv write",
    "attention",
    "o_proj",
    "gate_up",
    "silu*up",
    "down",
    "lora",
    "lm_head",
];

#[derive(Default)]
struct Bucket {
    nanos: [AtomicU64; 11],
    steps: AtomicU64,
    tokens: AtomicU64,
}

/// From this many sequences a decode-only step is counted as batched: its matmuls are
/// compute-bound, a small step's are bandwidth-bound, so the two are reported apart.
const BATCHED_SEQS: usize = 16;

pub struct PhaseTimes {
    decode: Bucket,
    batched_decode: Bucket,
    prefill: Bucket,
    /// The bucket of the step in progress: 0 prompt tokens, 1 decode, 2 batched decode.
    kind: std::sync::atomic::AtomicU8,
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VLLM_STEP_TIMING").is_some())
}

impl PhaseTimes {
    pub fn new() -> Option<PhaseTimes> {
        enabled().then(|| PhaseTimes {
            decode: Bucket::default(),
            batched_decode: Bucket::default(),
            prefill: Bucket::default(),
            kind: Default::default(),
        })
    }

    /// Starts a step of `tokens` new tokens over `seqs` sequences.
    pub fn step(&self, tokens: usize, seqs: usize) {
        let kind = match (tokens == seqs, seqs >= BATCHED_SEQS) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        self.kind.store(kind, Ordering::Relaxed);
        let b = self.bucket();
        b.steps.fetch_add(1, Ordering::Relaxed);
        b.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    fn bucket(&self) -> &Bucket {
        match self.kind.load(Ordering::Relaxed) {
            0 => &self.prefill,
            1 => &self.decode,
            _ => &self.batched_decode,
        }
    }

    pub fn add(&self, phase: Phase, since: Instant) {
        self.bucket().nanos[phase as usize].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn report(&self) -> String {
        format!(
            "{}\n{}\n{}",
            Self::report_bucket(
                &format!("decode-only steps of < {BATCHED_SEQS} sequences"),
                &self.decode
            ),
            Self::report_bucket(
                &format!("decode-only steps of >= {BATCHED_SEQS} sequences"),
                &self.batched_decode
            ),
            Self::report_bucket("steps with prompt tokens", &self.prefill)
        )
    }

    fn report_bucket(what: &str, b: &Bucket) -> String {
        let steps = b.steps.load(Ordering::Relaxed).max(1) as f64;
        let total: u64 = b.nanos.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        let mut s = format!(
            "forward phases, {what}: {} steps, {} tokens, {:.3} ms/step;",
            b.steps.load(Ordering::Relaxed),
            b.tokens.load(Ordering::Relaxed),
            total as f64 / steps / 1e6
        );
        for (name, n) in NAMES.iter().zip(&b.nanos) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                s += &format!(
                    " {name} {:.3} ms ({:.0}%)",
                    n as f64 / steps / 1e6,
                    100.0 * n as f64 / total.max(1) as f64
                );
            }
        }
        s
    }
}

/// Times `f` into `phase` when timing is on.
#[inline]
pub fn timed<R>(times: &Option<PhaseTimes>, phase: Phase, f: impl FnOnce() -> R) -> R {
    match times {
        Some(t) => {
            let start = Instant::now();
            let r = f();
            t.add(phase, start);
            r
        }
        None => f(),
    }
}
