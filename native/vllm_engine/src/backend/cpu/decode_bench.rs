//! Timing report (`VLLM_CPU_TEAM=1 cargo test --release -p vllm_engine decode_sweep -- --ignored
//! --nocapture`; without the variable the "team" rows run on rayon too):
//! the matmuls of one SmolLM2-135M batch-1 decode step (30 layers of qkv, o, gate_up, down,
//! then the LM head) on random weights, float32 and Q4_1 (with a Q8_0 LM head, as the GGUF), run three ways: on the team, on
//! rayon from a thread outside its pool (the engine thread's case before the team), and on
//! one thread. Minimum over repetitions, so a loaded machine shows its best case.

use std::time::Instant;

use candle_core::quantized::GgmlDType;

use super::matmul::{PackedMatrix, WeightFormat};
use super::qmatmul_int8::Int8Matrix;

const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
];
const LAYERS: usize = 30;
const LM_HEAD: (usize, usize) = (49152, 576);

fn noise(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn q4_1_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let v = noise(blocks * 18, seed);
    let mut out = Vec::with_capacity(blocks * 20);
    for b in 0..blocks {
        out.extend_from_slice(&half::f16::from_f32(0.01 + v[b * 18].abs() * 0.01).to_le_bytes());
        out.extend_from_slice(&half::f16::from_f32(-0.08 * v[b * 18 + 1].abs()).to_le_bytes());
        for i in 0..16 {
            out.push(((v[b * 18 + 2 + i % 16] + 1.0) * 127.0) as u8);
        }
    }
    out
}

/// Q8_0 blocks (the LM head of the SmolLM2 Q4_1 GGUF): an f16 scale and 32 signed levels.
fn q8_0_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let v = noise(blocks * 33, seed);
    let mut out = Vec::with_capacity(blocks * 34);
    for b in 0..blocks {
        out.extend_from_slice(&half::f16::from_f32(0.01 + v[b * 33].abs() * 0.01).to_le_bytes());
        for i in 0..32 {
            out.push((v[b * 33 + 1 + i] * 127.0) as i8 as u8);
        }
    }
    out
}

enum M {
    F32(PackedMatrix),
    Q(Int8Matrix),
}

impl M {
    fn run(&self, x: &[f32], out: &mut [f32]) {
        match self {
            M::F32(w) => w.matmul(x, 1, out),
            M::Q(w) => w.forward(x, 1, out),
        }
    }
}

fn sweep(name: &str, mats: &[(usize, &M)], reps: usize) {
    let x = noise(1536, 7);
    let mut out = vec![0.0f32; LM_HEAD.0];
    for (label, setup) in [("team", 0), ("rayon", 1), ("1 thread", 2)] {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut best = vec![f64::MAX; SHAPES.len() + 1];
        let mut totals = Vec::new();
        for _ in 0..reps {
            let mut per = vec![0.0f64; SHAPES.len() + 1];
            let body = |per: &mut Vec<f64>, out: &mut [f32]| {
                for (kind, m) in mats {
                    let cols = match m {
                        M::F32(w) => w.cols(),
                        M::Q(_) => {
                            if *kind == 3 {
                                1536
                            } else {
                                576
                            }
                        }
                    };
                    let t = Instant::now();
                    m.run(&x[..cols], out);
                    per[*kind] += t.elapsed().as_secs_f64();
                }
            };
            match setup {
                0 => body(&mut per, &mut out),
                1 => {
                    let _held = super::team::hold();
                    body(&mut per, &mut out)
                }
                _ => one.install(|| body(&mut per, &mut out)),
            }
            totals.push(per.iter().sum::<f64>());
            for (b, p) in best.iter_mut().zip(&per) {
                *b = b.min(*p);
            }
        }
        totals.sort_by(f64::total_cmp);
        let names: Vec<&str> = SHAPES.iter().map(|s| s.0).chain(["lm_head"]).collect();
        let parts: Vec<String> = names
            .iter()
            .zip(&best)
            .map(|(n, b)| format!("{n} {:.2}", b * 1e3))
            .collect();
        println!(
            "{name} {label}: step min {:.2} ms, median {:.2} ms; per kind (min, ms): {}; load {}",
            totals[0] * 1e3,
            totals[totals.len() / 2] * 1e3,
            parts.join(", "),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split(' ')
                .next()
                .unwrap_or("?")
        );
    }
}

#[test]
#[ignore = "timing report"]
fn decode_sweep_f32() {
    let mut mats = Vec::new();
    for l in 0..LAYERS {
        for (kind, &(_, r, c)) in SHAPES.iter().enumerate() {
            mats.push((
                kind,
                M::F32(PackedMatrix::pack(
                    &noise(r * c, (l * 4 + kind) as u32),
                    r,
                    c,
                    WeightFormat::F32,
                )),
            ));
        }
    }
    mats.push((
        4,
        M::F32(PackedMatrix::pack(
            &noise(LM_HEAD.0 * LM_HEAD.1, 999),
            LM_HEAD.0,
            LM_HEAD.1,
            WeightFormat::F32,
        )),
    ));
    println!(
        "f32 weights: {:.0} MB",
        mats.iter()
            .map(|(_, m)| if let M::F32(w) = m { w.bytes() } else { 0 })
            .sum::<usize>() as f64
            / 1e6
    );
    let all: Vec<(usize, &M)> = mats.iter().map(|(k, m)| (*k, m)).collect();
    sweep("f32", &all, 12);
}

#[test]
#[ignore = "timing report"]
fn decode_sweep_q4_1() {
    let Some(isa) = super::int8_dot::DotIsa::detected() else {
        return;
    };
    let mut mats = Vec::new();
    let pack = |r, c, seed| Int8Matrix::pack(isa, GgmlDType::Q4_1, &q4_1_bytes(r, c, seed), r, c).unwrap();
    for l in 0..LAYERS {
        for (kind, &(_, r, c)) in SHAPES.iter().enumerate() {
            mats.push((kind, M::Q(pack(r, c, (l * 4 + kind) as u32))));
        }
    }
    let (r, c) = LM_HEAD;
    mats.push((
        4,
        M::Q(Int8Matrix::pack(isa, GgmlDType::Q8_0, &q8_0_bytes(r, c, 999), r, c).unwrap()),
    ));
    println!(
        "Q4_1 weights: {:.0} MB",
        mats.iter()
            .map(|(_, m)| if let M::Q(w) = m { w.bytes() } else { 0 })
            .sum::<usize>() as f64
            / 1e6
    );
    let all: Vec<(usize, &M)> = mats.iter().map(|(k, m)| (*k, m)).collect();
    sweep("Q4_1", &all, 20);
    // One layer's matrices (~3.6 MB, cache-resident) 30 times: the kernel's compute speed.
    let hot: Vec<(usize, &M)> = (0..LAYERS).flat_map(|_| all[..4].iter().copied()).collect();
    sweep("Q4_1 cache-resident layer", &hot, 20);
}

/// Plain streaming read of 256 MB (16 independent sums, AVX-512 when present): what one
/// thread can pull from memory right now, for comparison with the sweeps.
#[test]
#[ignore = "timing report"]
fn decode_sweep_read_probe() {
    let buf = noise(64 << 20, 3);
    struct Sum<'a>(&'a [f32]);
    impl super::simd::Kernel for Sum<'_> {
        type Output = f32;
        #[inline(always)]
        fn run(self) -> f32 {
            let mut acc = [0.0f32; 64];
            for c in self.0.chunks_exact(64) {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += v;
                }
            }
            acc.iter().sum()
        }
    }
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut best = f64::MAX;
        for _ in 0..8 {
            let t = Instant::now();
            let s: f32 = pool.install(|| {
                use rayon::prelude::*;
                buf.par_chunks(buf.len() / threads)
                    .map(|c| super::simd::run_vectorized(Sum(c)))
                    .sum()
            });
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(s);
        }
        println!(
            "read probe, {threads} thread(s): {:.1} GB/s (best of 8)",
            buf.len() as f64 * 4.0 / best / 1e9
        );
    }
}
