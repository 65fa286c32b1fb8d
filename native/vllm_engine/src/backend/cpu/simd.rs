//! Vectorised elementwise helpers. The crate builds for baseline x86-64, so loops here are
//! written plainly and run inside `vectorized`, which compiles them a second time with
//! AVX-512 (or AVX2) enabled and picks the version the CPU has, once, at run time.

use std::sync::OnceLock;

use super::matmul::{detected_isa, Isa};

/// The vector unit the kernels use, detected once.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detected_isa)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for the widest vector unit present. Only for small closures: LLVM
/// must inline `f` into the wrapper for the wider instructions to apply.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    match isa() {
        // SAFETY: the features were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { with_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { with_avx2(f) },
        _ => f(),
    }
}

/// A computation large enough that a closure holding it would not be inlined into
/// `vectorized`'s wide copies (so it would run as baseline SSE code): implement `run` with
/// `#[inline(always)]` and call `run_vectorized`.
pub trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn kernel_avx512<K: Kernel>(k: K) -> K::Output {
    k.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<K: Kernel>(k: K) -> K::Output {
    k.run()
}

/// Runs `k` compiled for the widest vector unit present.
#[inline(always)]
pub fn run_vectorized<K: Kernel>(k: K) -> K::Output {
    match isa() {
        // SAFETY: the features were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { kernel_avx512(k) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { kernel_avx2(k) },
        _ => k.run(),
    }
}

/// e^x in float32 to about 2 ulp, branch-free so loops over it vectorise (Cephes' expf
/// polynomial on a range reduced by ln 2). Inputs are clamped to [-87, 88].
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23);
    e * scale
}

/// Dot product over two 16-lane accumulators (two AVX-512 registers, so consecutive
/// chunks do not wait on each other), summed as a tree.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (mut acc0, mut acc1) = ([0.0f32; 16], [0.0f32; 16]);
    let n32 = a.len().min(b.len()) / 32 * 32;
    for (x, y) in a[..n32].chunks_exact(32).zip(b[..n32].chunks_exact(32)) {
        // Fixed-size views: no bounds checks in the body, so it vectorises.
        let (Ok(x), Ok(y)) = (<&[f32; 32]>::try_from(x), <&[f32; 32]>::try_from(y)) else {
            continue;
        };
        for i in 0..16 {
            acc0[i] += x[i] * y[i];
            acc1[i] += x[16 + i] * y[16 + i];
        }
    }
    let tail: f32 = a[n32..].iter().zip(&b[n32..]).map(|(x, y)| x * y).sum();
    for i in 0..16 {
        acc0[i] += acc1[i];
    }
    hsum16(acc0) + tail
}

/// Sum of 16 lanes as a tree (halves added to halves).
#[inline(always)]
pub fn hsum16(mut v: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            v[i] += v[i + half];
        }
    }
    v[0]
}

/// Largest value (−∞ for none), over 16 lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for i in 0..16 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    m.iter().fold(tail, |a, &b| a.max(b))
}

/// Sum over 16 lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    hsum16(acc) + tail
}

/// y += a x.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0.0f64;
        for i in -86_900..88_000 {
            let x = i as f32 * 0.001;
            let (got, want) = (vectorized(|| exp(x)) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "relative error {worst}");
    }
}
