//! Weights asked into the L2 ahead of the kernels that read them (kernels/l2_prefetch.cuh;
//! plain logic, outside the `cuda` module so its tests run on every machine).
//! A captured small-batch decode step reads every weight matrix once, in a fixed order,
//! through a chain of short kernels; each kernel alone reads DRAM only while it runs (a
//! 17 MB product cold reaches ~1.6 TB/s of the H200's ~4). `WeightStream` lays the step's
//! matrices end to end and, at each product's launch, names the bytes from where the
//! last request stopped to `ahead` bytes past that product's end, so DRAM keeps streaming
//! through ramp-ups, tails and attention, and the products read the L2.

/// Must match L2_PREFETCH_PIECES in l2_prefetch.cuh.
pub const PIECES: usize = 4;

/// Address ranges one kernel prefetches (the kernel parameter `L2Prefetch`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L2Prefetch {
    pub ptr: [u64; PIECES],
    pub bytes: [u64; PIECES],
}

impl L2Prefetch {
    pub const NONE: L2Prefetch = L2Prefetch {
        ptr: [0; PIECES],
        bytes: [0; PIECES],
    };

    pub fn total(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// The step's weight matrices in launch order, and how far ahead of the product being
/// launched the L2 requests run.
pub struct WeightStream {
    /// (device address, bytes) per matrix, in the order the kernels read them.
    matrices: Vec<(u64, u64)>,
    /// Offset of each matrix in the stream (the sum of the sizes before it).
    starts: Vec<u64>,
    ahead: u64,
    /// Stream offset up to which requests have been issued.
    requested: u64,
}

impl WeightStream {
    /// `ahead` 0 asks for nothing.
    pub fn new(matrices: Vec<(u64, u64)>, ahead: u64) -> Self {
        let starts = matrices
            .iter()
            .scan(0u64, |at, &(_, bytes)| {
                let start = *at;
                *at += bytes;
                Some(start)
            })
            .collect();
        WeightStream {
            matrices,
            starts,
            ahead,
            requested: 0,
        }
    }

    /// What the launch of matrix `index`'s product asks for: the stream's bytes from where
    /// the requests stopped (at least that matrix's end: its own kernel reads it now) up to
    /// `ahead` past that end, cut at matrix boundaries into at most PIECES ranges (what does
    /// not fit waits for the next launch). Ranges are trimmed to 16-byte alignment.
    pub fn before(&mut self, index: usize) -> L2Prefetch {
        let mut pf = L2Prefetch::NONE;
        let Some(&(_, size)) = self.matrices.get(index) else {
            return pf;
        };
        if self.ahead == 0 {
            return pf;
        }
        let end = self.starts[index] + size;
        let target = end + self.ahead;
        let mut at = self.requested.max(end);
        let mut piece = 0;
        let mut m = index;
        while at < target && piece < PIECES && m < self.matrices.len() {
            let (ptr, bytes) = self.matrices[m];
            let (start, stop) = (self.starts[m], self.starts[m] + bytes);
            if at >= stop {
                m += 1;
                continue;
            }
            let from = at - start;
            let to = stop.min(target) - start;
            // 16-byte aligned start, length a multiple of 16 (weights are; this only guards).
            let (a, b) = (ptr + from, ptr + to);
            let (a16, b16) = (a.next_multiple_of(16), b & !15);
            if b16 > a16 {
                pf.ptr[piece] = a16;
                pf.bytes[piece] = b16 - a16;
                piece += 1;
            }
            at = start + to;
        }
        self.requested = self.requested.max(at);
        pf
    }
}

/// `VLLM_L2_AHEAD_MB`: how far ahead the captured decode prefetches weights (0: off).
pub fn ahead_from_env(default_mb: u64) -> u64 {
    std::env::var("VLLM_L2_AHEAD_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default_mb)
        << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three matrices of 100, 50 and 200 KB at separate addresses.
    fn stream(ahead: u64) -> WeightStream {
        WeightStream::new(
            vec![(1 << 30, 100 << 10), (2 << 30, 50 << 10), (3 << 30, 200 << 10)],
            ahead,
        )
    }

    #[test]
    fn nothing_is_asked_when_ahead_is_zero() {
        let mut s = stream(0);
        assert_eq!(s.before(0), L2Prefetch::NONE);
        assert_eq!(s.before(1), L2Prefetch::NONE);
    }

    #[test]
    fn each_launch_asks_for_the_bytes_past_its_own_matrix_once() {
        let mut s = stream(120 << 10);
        // Matrix 0 ends at 100 KB: ask 100..220 KB = all of matrix 1, 70 KB of matrix 2.
        let p0 = s.before(0);
        assert_eq!(p0.ptr[..2], [2 << 30, 3 << 30]);
        assert_eq!(p0.bytes[..2], [50 << 10, 70 << 10]);
        assert_eq!(p0.total(), 120 << 10);
        // Matrix 1 ends at 150 KB, target 270 KB: only 220..270 KB is new.
        let p1 = s.before(1);
        assert_eq!(p1.ptr[0], (3 << 30) + (70 << 10));
        assert_eq!(p1.total(), 50 << 10);
        // The last matrix: its kernel reads the rest itself, and the stream ends there.
        assert_eq!(s.before(2), L2Prefetch::NONE);
    }

    #[test]
    fn with_a_lookahead_past_the_next_matrix_every_later_byte_is_asked_exactly_once() {
        for ahead in [200u64 << 10, 300 << 10, 1 << 20] {
            let mut s = stream(ahead);
            let mut asked = Vec::new();
            for i in 0..3 {
                let pf = s.before(i);
                for p in 0..PIECES {
                    if pf.bytes[p] > 0 {
                        asked.push((pf.ptr[p], pf.bytes[p]));
                    }
                }
            }
            // Merge adjacent ranges per matrix and compare with matrices 1 and 2 whole.
            asked.sort();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (p, b) in asked {
                match merged.last_mut() {
                    Some(last) if last.0 + last.1 == p => last.1 += b,
                    _ => merged.push((p, b)),
                }
            }
            assert_eq!(merged, vec![(2 << 30, 50 << 10), (3 << 30, 200 << 10)], "ahead {ahead}");
        }
    }

    #[test]
    fn a_launch_asks_for_at_most_pieces_ranges_and_the_rest_waits() {
        let small: Vec<(u64, u64)> = (0..8).map(|i| ((i + 1) << 30, 1024)).collect();
        let mut s = WeightStream::new(small, 1 << 20);
        let p0 = s.before(0);
        assert!(p0.bytes.iter().all(|&b| b == 1024), "{p0:?}");
        assert_eq!(p0.ptr[0], 2 << 30);
        let p1 = s.before(1);
        assert_eq!(p1.ptr[0], 6 << 30, "continues after the four ranges asked before");
        assert_eq!(p1.total(), 3 * 1024);
    }

    #[test]
    fn an_index_past_the_end_asks_for_nothing() {
        assert_eq!(stream(1 << 20).before(7), L2Prefetch::NONE);
    }
}
