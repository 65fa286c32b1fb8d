//! Which algorithm a matrix product takes, decided once per (shape, rows bucket) from
//! measured times (backend/cuda/gemm_lt.rs measures them on the device). Plain logic, so
//! it is tested without a GPU.

/// Rows below this take the old path: their products are launch- and bandwidth-bound, and
/// the captured decode (cuBLAS GemmEx) serves them anyway.
pub const MIN_ROWS: usize = 16;

/// An algorithm must beat the current path (GemmEx) by this fraction to replace it, so that
/// noise between equal candidates keeps the old choice.
pub const MARGIN: f32 = 0.03;

/// The rows a product is tuned at for a batch of `rows`: every batch in a bucket takes the
/// algorithm measured at the bucket's top. Powers of two up to 128, multiples of 128 up to
/// 1,024 (decode widths, where a tile row more or less changes the waves), then 1.5× and 2×
/// steps (prompt chunks, compute-bound, where the best algorithm changes slowly).
pub fn rows_bucket(rows: usize) -> usize {
    if rows <= 128 {
        rows.max(MIN_ROWS).next_power_of_two()
    } else if rows <= 1024 {
        rows.div_ceil(128) * 128
    } else {
        let pow = rows.next_power_of_two();
        let three_quarters = pow / 4 * 3;
        if rows <= three_quarters {
            three_quarters
        } else {
            pow
        }
    }
}

/// Every bucket a batch of `MIN_ROWS..=max_rows` rows can fall in, ascending.
pub fn buckets_up_to(max_rows: usize) -> Vec<usize> {
    let mut buckets = Vec::new();
    if max_rows < MIN_ROWS {
        return buckets;
    }
    let last = rows_bucket(max_rows);
    let mut rows = MIN_ROWS;
    loop {
        let b = rows_bucket(rows);
        buckets.push(b);
        if b >= last {
            return buckets;
        }
        rows = b + 1;
    }
}

/// The choice for one (shape, bucket): `None` keeps GemmEx, `Some(i)` takes candidate i
/// (the index in the heuristic's list). `candidates` holds (index, µs) of those that ran;
/// the fastest wins if it beats GemmEx by MARGIN, the heuristic's order breaking ties.
pub fn pick(gemm_ex_us: f32, candidates: &[(usize, f32)]) -> Option<usize> {
    let best = candidates
        .iter()
        .filter(|(_, t)| t.is_finite() && *t > 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
    let beats = !gemm_ex_us.is_finite() || best.1 < gemm_ex_us * (1.0 - MARGIN);
    beats.then_some(best.0)
}

/// `VLLM_GEMM_LT`: "0" keeps every product on GemmEx (the path before cuBLASLt, to
/// compare); anything else, or unset, tunes.
pub fn enabled(var: Option<&str>) -> bool {
    var.is_none_or(|v| v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_rows_count_from_above() {
        for rows in MIN_ROWS..=20_000 {
            let b = rows_bucket(rows);
            assert!(b >= rows, "{rows} rows in bucket {b}");
            // A bucket is its own bucket (tuning at b serves b).
            assert_eq!(rows_bucket(b), b, "bucket {b} of {rows}");
            // Tuned at most at twice the batch's rows.
            assert!(b <= rows * 2, "{rows} rows tuned at {b}");
        }
    }

    #[test]
    fn buckets_at_decode_and_prompt_widths() {
        assert_eq!(rows_bucket(1), 16);
        assert_eq!(rows_bucket(17), 32);
        assert_eq!(rows_bucket(128), 128);
        assert_eq!(rows_bucket(129), 256);
        assert_eq!(rows_bucket(1000), 1024);
        assert_eq!(rows_bucket(600), 640);
        assert_eq!(rows_bucket(1025), 1536);
        assert_eq!(rows_bucket(1537), 2048);
        assert_eq!(rows_bucket(13_200), 16_384);
        assert_eq!(rows_bucket(12_288), 12_288);
    }

    #[test]
    fn buckets_up_to_lists_each_bucket_once_in_order() {
        let list = buckets_up_to(16_384);
        assert_eq!(
            list,
            vec![16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384]
        );
        // Every rows count's bucket is listed.
        for rows in MIN_ROWS..=16_384 {
            assert!(list.contains(&rows_bucket(rows)), "{rows}");
        }
        assert_eq!(buckets_up_to(8), Vec::<usize>::new());
        assert_eq!(buckets_up_to(100), vec![16, 32, 64, 128]);
        assert_eq!(*buckets_up_to(9000).last().unwrap(), 12_288);
    }

    #[test]
    fn pick_needs_a_clear_win_over_gemm_ex() {
        // 2% faster: noise, GemmEx stays.
        assert_eq!(pick(100.0, &[(0, 98.0), (1, 99.0)]), None);
        // 10% faster: taken.
        assert_eq!(pick(100.0, &[(0, 99.0), (3, 90.0)]), Some(3));
        // Nothing ran: GemmEx.
        assert_eq!(pick(100.0, &[]), None);
        // Failed timings (not finite, zero) never win.
        assert_eq!(pick(100.0, &[(0, f32::NAN), (1, 0.0), (2, f32::INFINITY)]), None);
    }

    #[test]
    fn pick_breaks_ties_by_heuristic_order() {
        assert_eq!(pick(100.0, &[(5, 80.0), (2, 80.0), (7, 85.0)]), Some(2));
    }

    #[test]
    fn pick_takes_the_fastest_when_gemm_ex_failed() {
        assert_eq!(pick(f32::NAN, &[(0, 120.0), (1, 110.0)]), Some(1));
    }

    #[test]
    fn env_switch() {
        assert!(enabled(None));
        assert!(enabled(Some("1")));
        assert!(!enabled(Some("0")));
    }
}
