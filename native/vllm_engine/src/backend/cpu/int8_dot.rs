//! The integer dot products under the int8 matmul kernels (qmatmul_int8.rs): sums of four
//! u8 × i8 products per 32-bit lane. AVX-512 VNNI does one in `vpdpbusd`; CPUs with
//! AVX-512BW but no VNNI (Skylake-SP and its server kin) get the same exact sums from
//! `vpmaddubsw` (pairs into i16) and `vpmaddwd` (pairs of those into i32), and CPUs with
//! only AVX2 (Zen 2/3, client cores) from the 256-bit forms (qmatmul_int8_avx2.rs).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// The instructions an int8 kernel is compiled for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DotIsa {
    Vnni,
    Avx512Bw,
    Avx2,
}

impl DotIsa {
    /// Fastest first.
    const ALL: [DotIsa; 3] = [DotIsa::Vnni, DotIsa::Avx512Bw, DotIsa::Avx2];

    /// Whether this CPU can run kernels of this kind (checked at run time).
    fn runs_here(self) -> bool {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c");
        match self {
            DotIsa::Vnni => avx512 && has!("avx512vnni"),
            DotIsa::Avx512Bw => avx512,
            DotIsa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
        }
    }

    /// The fastest this CPU has, if any; `VLLM_CPU_INT8=avx2|avx512bw|off` picks a lesser
    /// one (for comparisons; a kind the CPU lacks falls back to the fastest).
    pub fn detected() -> Option<DotIsa> {
        static CHOSEN: std::sync::OnceLock<Option<DotIsa>> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let fastest = DotIsa::ALL.into_iter().find(|isa| isa.runs_here());
            match std::env::var("VLLM_CPU_INT8").as_deref() {
                Ok("off") => None,
                Ok("avx512bw") if DotIsa::Avx512Bw.runs_here() => Some(DotIsa::Avx512Bw),
                Ok("avx2") if DotIsa::Avx2.runs_here() => Some(DotIsa::Avx2),
                _ => fastest,
            }
        })
    }

    /// Every kind this CPU can run (tests run each).
    pub fn runnable() -> Vec<DotIsa> {
        DotIsa::ALL.into_iter().filter(|isa| isa.runs_here()).collect()
    }
}

/// Lane sums of u8 levels times i8 inputs. Callers are compiled with the features of the
/// implementation they pick; these inline into them.
pub(super) trait Dot {
    /// Σ u·x per lane for 4-bit levels (u ≤ 15), two products summed.
    unsafe fn nibbles2(w0: __m512i, x0: __m512i, w1: __m512i, x1: __m512i) -> __m512i;
    /// Σ u·x per lane for 4-bit levels.
    unsafe fn nibbles(w: __m512i, x: __m512i) -> __m512i;
    /// Σ u·x per lane for any byte level (u ≤ 255).
    unsafe fn bytes(w: __m512i, x: __m512i) -> __m512i;
}

pub(super) struct Vnni;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn nibbles2(w0: __m512i, x0: __m512i, w1: __m512i, x1: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, x0), w1, x1)
    }

    #[inline(always)]
    unsafe fn nibbles(w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x)
    }

    #[inline(always)]
    unsafe fn bytes(w: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x)
    }
}

pub(super) struct Avx512Bw;

impl Dot for Avx512Bw {
    /// |x| ≤ 127 and u ≤ 15: four products stay within ±7,620, so the i16 sums are exact.
    #[inline(always)]
    unsafe fn nibbles2(w0: __m512i, x0: __m512i, w1: __m512i, x1: __m512i) -> __m512i {
        let pairs = _mm512_add_epi16(_mm512_maddubs_epi16(w0, x0), _mm512_maddubs_epi16(w1, x1));
        _mm512_madd_epi16(pairs, _mm512_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn nibbles(w: __m512i, x: __m512i) -> __m512i {
        _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1))
    }

    /// u = 2·(u >> 1) + (u & 1): each part's pair sums stay within ±32,258 (no saturation).
    #[inline(always)]
    unsafe fn bytes(w: __m512i, x: __m512i) -> __m512i {
        let half = _mm512_and_si512(_mm512_srli_epi16(w, 1), _mm512_set1_epi8(0x7F));
        let odd = _mm512_and_si512(w, _mm512_set1_epi8(1));
        let halves = _mm512_madd_epi16(_mm512_maddubs_epi16(half, x), _mm512_set1_epi16(2));
        let odds = _mm512_madd_epi16(_mm512_maddubs_epi16(odd, x), _mm512_set1_epi16(1));
        _mm512_add_epi32(halves, odds)
    }
}
