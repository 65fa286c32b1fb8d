//! The one-row logits with their argmax fused in (gemv_staged::launch_logits_argmax, the
//! W3 decode graph's last launch) against the argmax of the logits it wrote: ties go to
//! the lowest id across blocks, and every launch leaves its counter ready for the next.

#[cfg(feature = "cuda")]
#[test]
fn fused_argmax_is_the_lowest_id_of_the_largest_logit_launch_after_launch() {
    use candle_core::{DType, Tensor};
    use vllm_engine::backend::cuda::{device_ptr, gemv_staged, Kernels};

    if !crate::on_gpu() {
        return;
    }
    let device = vllm_engine::backend::cuda::open_device(0).expect("GPU");
    let k = Kernels::load(&device).expect("kernels");
    let inner = 896;
    // 20,000 rows stream through the ring (its refill warp sits the argmax out); 1,000 fit whole.
    for out in [20_000usize, 1_000] {
        let x: Vec<f32> = (0..inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut w: Vec<f32> = (0..out * inner)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 4000.0)
            .collect();
        // Rows `a` < `b` in different blocks, equal and larger than the rest: a tie.
        let (a, b) = (out / 3, out - 2);
        for i in 0..inner {
            let v = x[i].signum() * 0.5;
            w[a * inner + i] = v;
            w[b * inner + i] = v;
        }
        let x = Tensor::from_vec(x, inner, &device).unwrap();
        let w = Tensor::from_vec(w, (out, inner), &device)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let norm = Tensor::ones(inner, DType::BF16, &device).unwrap();
        let logits = Tensor::zeros(out, DType::F32, &device).unwrap();
        let scratch = Tensor::zeros(gemv_staged::argmax_scratch_len(k.sms), DType::U32, &device).unwrap();
        let ptr = |t: &Tensor| device_ptr(t).unwrap();
        for launch in 0..3 {
            let argmax = Tensor::zeros(2, DType::U32, &device).unwrap();
            let ptrs = (ptr(&logits), ptr(&x), ptr(&w), ptr(&norm));
            let launched = gemv_staged::launch_logits_argmax(
                &k,
                DType::BF16,
                ptrs,
                1e-6,
                out,
                inner,
                (ptr(&argmax), ptr(&scratch), 0),
            );
            assert!(launched.unwrap(), "{out} rows: no staged plan");
            let got = argmax.to_vec1::<u32>().unwrap();
            let values = logits.to_vec1::<f32>().unwrap();
            let best = values.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let first = values.iter().position(|&v| v == best).unwrap();
            assert_eq!(first, a, "{out} rows: the planted tie is not the largest logit");
            assert_eq!(got, [a as u32, best.to_bits()], "{out} rows, launch {launch}");
        }
    }
}
