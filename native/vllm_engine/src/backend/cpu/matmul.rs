//! Float32 `y = x Wᵀ` with the weight packed once, at load, into the layout the kernel
//! streams: panels of `PANEL` output columns, each stored k-major (for every input index
//! k, the panel's 32 weights side by side, 64-byte aligned). A microkernel keeps a block of
//! up to `MAX_ROWS` input rows × 32 outputs in registers and walks k once, so a decode
//! (one row) streams the weight exactly once and a batch reuses each loaded weight vector
//! for every row of the block.
//!
//! Every output value is one chain of fused multiply-adds over k in order (for bfloat16
//! weights on AVX512_BF16, of `vdpbf16ps` over k-pairs: matmul_bf16dot.rs), whatever the
//! number of rows, the block it falls in or the thread that computes it: a sequence gets
//! bit-identical results alone or batched.

use rayon::prelude::*;

/// Output columns per panel.
pub const PANEL: usize = 32;
/// Largest row block of the AVX-512 kernel (2 × 12 accumulators + 2 weights + 1 broadcast
/// of the 32 zmm registers).
const MAX_ROWS_AVX512: usize = 12;
/// AVX2 has 16 ymm registers: 2 rows × 4 accumulators + 4 weights + 1 broadcast.
const MAX_ROWS_AVX2: usize = 2;
/// Below this many multiply-adds a call stays on the calling thread.
const SERIAL_MAX_MACS: usize = 1 << 17;

/// 16 floats on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// 32 bfloat16 values (one panel row) on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct LineBf16(pub(crate) [u16; 32]);

/// How the weights are held: float32, or rounded to bfloat16 (half the bytes to stream;
/// with AVX512_BF16 the inputs are rounded too and multiplied in pairs by `vdpbf16ps`,
/// see matmul_bf16dot.rs; without it the kernels widen the weights and compute in float32).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WeightFormat {
    F32,
    Bf16,
}

enum Storage {
    /// Panel p, index k: lines 2 (p cols + k) and +1 hold W[32p .. 32p + 32][k].
    F32(Vec<Line>),
    /// Panel p, index k: line p cols + k holds W[32p .. 32p + 32][k].
    Bf16(Vec<LineBf16>),
    /// The k-pair panels of matmul_bf16dot.rs.
    Bf16Pairs(Vec<LineBf16>),
}

/// float32 → bfloat16, rounding to nearest even (NaN stays NaN).
pub(crate) fn to_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7FC0;
    }
    let bits = v.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

pub(crate) fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The instruction set the kernels use, detected once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    /// AVX-512 with the bfloat16 dot product (`vdpbf16ps`): bf16 weights take the
    /// dot-product kernel, everything else runs as on `Avx512`.
    Avx512Bf16,
    Avx512,
    Avx2,
    Scalar,
}

pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// A [rows, cols] float32 matrix (rows = output features) in panel layout.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// Rows past `rows` (to a whole panel) are zero.
    storage: Storage,
    isa: Isa,
}

impl PackedMatrix {
    /// Packs a row-major [rows, cols] matrix.
    pub fn pack(w: &[f32], rows: usize, cols: usize, format: WeightFormat) -> PackedMatrix {
        Self::pack_with(w, rows, cols, format, detected_isa())
    }

    /// `pack` for the kernels of `isa`, which the CPU must have (tests force a narrower one;
    /// bf16 weights take the k-pair layout of matmul_bf16dot.rs only for `Avx512Bf16`).
    pub fn pack_with(w: &[f32], rows: usize, cols: usize, format: WeightFormat, isa: Isa) -> PackedMatrix {
        assert_eq!(w.len(), rows * cols, "packed matrix: data does not match its shape");
        let panels = rows.div_ceil(PANEL);
        let storage = match format {
            WeightFormat::F32 => {
                let mut lines = vec![Line([0.0; 16]); panels * cols * 2];
                lines.par_chunks_mut(cols * 2).enumerate().for_each(|(p, panel)| {
                    for j in 0..PANEL.min(rows - p * PANEL) {
                        let row = &w[(p * PANEL + j) * cols..(p * PANEL + j + 1) * cols];
                        for (k, &v) in row.iter().enumerate() {
                            panel[2 * k + j / 16].0[j % 16] = v;
                        }
                    }
                });
                Storage::F32(lines)
            }
            WeightFormat::Bf16 if isa == Isa::Avx512Bf16 => {
                Storage::Bf16Pairs(super::matmul_bf16dot::pack(w, rows, cols))
            }
            WeightFormat::Bf16 => {
                let mut lines = vec![LineBf16([0; 32]); panels * cols];
                lines.par_chunks_mut(cols).enumerate().for_each(|(p, panel)| {
                    for j in 0..PANEL.min(rows - p * PANEL) {
                        let row = &w[(p * PANEL + j) * cols..(p * PANEL + j + 1) * cols];
                        for (k, &v) in row.iter().enumerate() {
                            panel[k].0[j] = to_bf16(v);
                        }
                    }
                });
                Storage::Bf16(lines)
            }
        };
        PackedMatrix {
            rows,
            cols,
            storage,
            isa,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match self.storage {
            Storage::F32(_) => WeightFormat::F32,
            Storage::Bf16(_) | Storage::Bf16Pairs(_) => WeightFormat::Bf16,
        }
    }

    /// Whether the weights are in the k-pair layout of the bf16 dot product.
    #[cfg(test)]
    pub(crate) fn is_bf16_pairs(&self) -> bool {
        matches!(self.storage, Storage::Bf16Pairs(_))
    }

    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(l) => l.len() * std::mem::size_of::<Line>(),
            Storage::Bf16(l) | Storage::Bf16Pairs(l) => l.len() * std::mem::size_of::<LineBf16>(),
        }
    }

    /// Row `r` of the matrix as stored (an embedding lookup of a tied table).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (p, j) = (r / PANEL, r % PANEL);
        let k = self.cols;
        match &self.storage {
            Storage::F32(lines) => {
                let panel = &lines[p * k * 2..(p + 1) * k * 2];
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = panel[2 * kk + j / 16].0[j % 16];
                }
            }
            Storage::Bf16(lines) => {
                let panel = &lines[p * k..(p + 1) * k];
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = from_bf16(panel[kk].0[j]);
                }
            }
            Storage::Bf16Pairs(lines) => {
                for (kk, o) in out.iter_mut().enumerate().take(k) {
                    *o = super::matmul_bf16dot::weight(lines, k, r, kk);
                }
            }
        }
    }

    /// `out` ([m, rows], row-major) = x ([m, cols], row-major) Wᵀ.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(
            x.len() >= m * self.cols && out.len() >= m * self.rows,
            "packed matmul: buffers too small"
        );
        let out_ptr = SendPtr(out.as_mut_ptr());
        match &self.storage {
            #[cfg(target_arch = "x86_64")]
            Storage::Bf16Pairs(lines) => super::matmul_bf16dot::with_rounded_input(x, m, self.cols, |pairs| {
                // SAFETY: packed as pairs only when the CPU has AVX512_BF16 (`pack_with`'s
                // isa); tasks get disjoint panel ranges, so they write disjoint columns.
                for_panel_ranges(self.rows, self.cols, m, |p0, p1| unsafe {
                    let out = out_ptr;
                    super::matmul_bf16dot::panels(lines, self.rows, self.cols, pairs, m, p0, p1, out.0)
                })
            }),
            // SAFETY: tasks get disjoint panel ranges, so they write disjoint columns.
            _ => for_panel_ranges(self.rows, self.cols, m, |p0, p1| unsafe {
                self.panels(x, m, p0, p1, out_ptr)
            }),
        }
    }

    /// Computes panels p0..p1 for all m rows. Each panel stays in cache while every row
    /// block passes over it.
    unsafe fn panels(&self, x: &[f32], m: usize, p0: usize, p1: usize, out: SendPtr) {
        let k = self.cols;
        let max_rows = match self.isa {
            Isa::Avx512 | Isa::Avx512Bf16 => MAX_ROWS_AVX512,
            Isa::Avx2 => MAX_ROWS_AVX2,
            Isa::Scalar => 1,
        };
        for p in p0..p1 {
            let width = PANEL.min(self.rows - p * PANEL);
            let mut i = 0;
            while i < m {
                let rows = max_rows.min(m - i);
                let xb = x.as_ptr().add(i * k);
                let ob = out.0.add(i * self.rows + p * PANEL);
                match &self.storage {
                    Storage::F32(lines) => {
                        let panel = lines[p * k * 2..].as_ptr() as *const f32;
                        panel_block(self.isa, rows, xb, k, panel, ob, self.rows, width);
                    }
                    // `matmul` sends pairs to the dot product on x86-64; elsewhere (a
                    // forced ISA) they are multiplied as their bfloat16 weights widened.
                    Storage::Bf16Pairs(lines) => block_scalar(
                        rows,
                        xb,
                        k,
                        |kk, j| super::matmul_bf16dot::weight(lines, k, p * PANEL + j, kk),
                        ob,
                        self.rows,
                        width,
                    ),
                    Storage::Bf16(lines) => {
                        let panel = lines[p * k..].as_ptr() as *const u16;
                        match self.isa {
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx512 | Isa::Avx512Bf16 => {
                                super::matmul_x86::block_avx512_bf16(rows, xb, k, panel, ob, self.rows, width)
                            }
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx2 => super::matmul_x86::block_avx2_bf16(rows, xb, k, panel, ob, self.rows, width),
                            _ => block_scalar(
                                rows,
                                xb,
                                k,
                                |kk, j| from_bf16(*panel.add(kk * PANEL + j)),
                                ob,
                                self.rows,
                                width,
                            ),
                        }
                    }
                }
                i += rows;
            }
        }
    }
}

/// One row block (at most the ISA's row count) times one k × 32 float32 panel.
///
/// # Safety
/// As the microkernels: `x` holds rows × k floats, `panel` k × 32 floats (64-byte
/// aligned), `out` rows at stride `ldo` with `width` writable columns.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_block(
    isa: Isa,
    rows: usize,
    x: *const f32,
    k: usize,
    panel: *const f32,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => super::matmul_x86::block_avx512(rows, x, k, panel, out, ldo, width),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::matmul_x86::block_avx2(rows, x, k, panel, out, ldo, width),
        _ => block_scalar(rows, x, k, |kk, j| *panel.add(kk * PANEL + j), out, ldo, width),
    }
}

/// Runs `run(p0, p1)` over ranges of the 32-row panels of a [rows, cols] matrix that
/// cover it once, for a product of m input rows: on the calling thread for small
/// products, else a few ranges per thread.
pub(crate) fn for_panel_ranges(rows: usize, cols: usize, m: usize, run: impl Fn(usize, usize) + Sync) {
    let panels = rows.div_ceil(PANEL);
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * rows * cols <= SERIAL_MAX_MACS {
        run(0, panels);
        return;
    }
    // A few tasks per thread so a thread delayed by the OS does not hold up the rest.
    let tasks = (threads * 4).min(panels);
    super::team::for_each_rows(m, tasks, |t| run(t * panels / tasks, (t + 1) * panels / tasks));
}

/// A k × 32 float32 panel in the packed layout, filled at run time (weights decoded
/// from another format just before use).
pub(crate) struct PanelBuffer {
    lines: Vec<Line>,
    k: usize,
}

impl PanelBuffer {
    pub(crate) fn new(k: usize) -> Self {
        PanelBuffer {
            lines: vec![Line([0.0; 16]); 2 * k],
            k,
        }
    }

    /// Makes the panel k deep, keeping its allocation where it is large enough.
    pub(crate) fn set_depth(&mut self, k: usize) {
        self.lines.resize(2 * k, Line([0.0; 16]));
        self.k = k;
    }

    /// The panel as k × 32 floats: column j of depth kk at kk * 32 + j.
    pub(crate) fn as_mut_f32(&mut self) -> &mut [f32] {
        // SAFETY: `Line` is repr(C) [f32; 16]; 2k lines are 32k contiguous floats.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.lines.len() * 16) }
    }

    /// out[i, 0..width] = x[i, :] · panel columns, for i in 0..m (`x` is [m, k], `out`
    /// rows at stride `ldo`).
    ///
    /// # Safety
    /// `x` holds m × k floats; `out` m rows at stride `ldo` with `width` writable columns.
    pub(crate) unsafe fn product(&self, x: *const f32, m: usize, out: *mut f32, ldo: usize, width: usize) {
        let isa = super::simd::isa();
        let max_rows = match isa {
            Isa::Avx512 | Isa::Avx512Bf16 => MAX_ROWS_AVX512,
            Isa::Avx2 => MAX_ROWS_AVX2,
            Isa::Scalar => 1,
        };
        let panel = self.lines.as_ptr() as *const f32;
        let mut i = 0;
        while i < m {
            let rows = max_rows.min(m - i);
            panel_block(
                isa,
                rows,
                x.add(i * self.k),
                self.k,
                panel,
                out.add(i * ldo),
                ldo,
                width,
            );
            i += rows;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Portable kernel: same per-output order (k ascending, fused multiply-add) as the SIMD ones.
unsafe fn block_scalar(
    rows: usize,
    x: *const f32,
    k: usize,
    weight: impl Fn(usize, usize) -> f32,
    out: *mut f32,
    ldo: usize,
    width: usize,
) {
    for i in 0..rows {
        let mut acc = [0.0f32; PANEL];
        for kk in 0..k {
            let xv = *x.add(i * k + kk);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = xv.mul_add(weight(kk, j), *a);
            }
        }
        std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(i * ldo), width);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols)
                    .map(|k| x[i * cols + k] as f64 * w[r * cols + k] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    pub(crate) fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if detected_isa() == Isa::Avx512Bf16 {
                v.push(Isa::Avx512Bf16);
            }
        }
        v
    }

    #[test]
    fn every_kernel_matches_a_naive_matmul_and_is_batch_invariant() {
        for (rows, cols) in [(5, 3), (32, 16), (77, 129), (200, 576)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
                .collect();
            for (isa, format) in isas()
                .into_iter()
                .flat_map(|i| [(i, WeightFormat::F32), (i, WeightFormat::Bf16)])
            {
                let packed = PackedMatrix::pack_with(&w, rows, cols, format, isa);
                // The bf16 matrix is checked against its own rounded weights.
                let w: Vec<f32> = match format {
                    WeightFormat::F32 => w.clone(),
                    WeightFormat::Bf16 => w.iter().map(|&v| from_bf16(to_bf16(v))).collect(),
                };
                let mut alone: Option<Vec<f32>> = None;
                for m in [1, 2, 3, 13, 30] {
                    let x: Vec<f32> = (0..m * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                    let mut out = vec![f32::NAN; m * rows];
                    packed.matmul(&x, m, &mut out);
                    let expected = naive(&w, &x, m, rows, cols);
                    for (j, (a, b)) in out.iter().zip(&expected).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{isa:?} {format:?} [{rows},{cols}] m {m} at {j}: {a} vs {b}"
                        );
                    }
                    // Row 0 is the same input every time: bit-identical whatever m is.
                    match &alone {
                        Some(r) => assert_eq!(
                            &out[..rows],
                            &r[..],
                            "{isa:?} {format:?} m {m}: row 0 differs from m = 1"
                        ),
                        None => alone = Some(out[..rows].to_vec()),
                    }
                }
                let mut row = vec![0.0; cols];
                packed.row_into(rows - 1, &mut row);
                assert_eq!(row, w[(rows - 1) * cols..]);
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore = "timing report"]
    fn packed_matmul_speed() {
        for (rows, cols) in [(3072, 576), (576, 1536), (49152, 576)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 * 0.01).collect();
            // bf16 twice on a CPU with AVX512_BF16: the dot product, then widened to f32.
            let widen = detected_isa() == Isa::Avx512Bf16;
            for (format, isa) in [
                (WeightFormat::F32, detected_isa()),
                (WeightFormat::Bf16, detected_isa()),
                (WeightFormat::Bf16, if widen { Isa::Avx512 } else { detected_isa() }),
            ] {
                let packed = PackedMatrix::pack_with(&w, rows, cols, format, isa);
                for m in [1, 32, 128] {
                    let x: Vec<f32> = (0..m * cols).map(|i| (i % 7) as f32 * 0.1).collect();
                    let mut out = vec![0.0; m * rows];
                    packed.matmul(&x, m, &mut out);
                    let reps = 20;
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        packed.matmul(&x, m, &mut out);
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    println!(
                        "{format:?} {isa:?} [{rows}, {cols}] m {m}: {:.3} ms, {:.1} GFLOP/s, {:.1} GB/s of weights",
                        s * 1e3,
                        2.0 * (m * rows * cols) as f64 / s / 1e9,
                        packed.bytes() as f64 / s / 1e9
                    );
                }
            }
        }
    }
}
