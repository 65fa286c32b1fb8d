//! backend/cuda/gemv_staged.rs's launch plans for W3's shapes (Qwen2.5-0.5B on an H200's
//! 132 SMs): a layer's products whole, the logits through the ring. No device needed; they
//! live here because this binary is the one built with `cuda` and run on the GPU machine.

use candle_core::DType;
use vllm_engine::backend::cuda::gemv_staged::plan;
use vllm_engine::backend::cuda::ops::GemvEpilogue;

const SMS: usize = 132;

#[test]
fn staged_plan_takes_a_layers_products_whole() {
    // gate_up: 2 × 4864 rows of 896; down: 896 rows of 4864.
    let gate_up = plan(DType::BF16, 4864, 896, GemvEpilogue::SiluMul, SMS, true).unwrap();
    assert_eq!((gate_up.rows_per_block, gate_up.blocks, gate_up.stages), (37, 132, 1));
    assert_eq!(gate_up.shared, (2 * 37 + 1) * 896 * 2);
    let down = plan(DType::BF16, 896, 4864, GemvEpilogue::AddTo, SMS, false).unwrap();
    assert_eq!((down.rows_per_block, down.stage_rows, down.stages), (7, 7, 1));
    // Too many rows for a block's shared memory: gemv_fused keeps them.
    assert_eq!(plan(DType::BF16, 14336, 4096, GemvEpilogue::SiluMul, SMS, true), None);
}

#[test]
fn staged_plan_streams_the_logits_beside_the_last_down_block() {
    let logits = plan(DType::BF16, 151936, 896, GemvEpilogue::StoreF32, SMS, true).unwrap();
    assert_eq!((logits.rows_per_block, logits.blocks), (1152, 132));
    assert_eq!((logits.stage_rows, logits.stages), (16, 5));
    let down = plan(DType::BF16, 896, 4864, GemvEpilogue::AddTo, SMS, false).unwrap();
    // Both blocks, and 1 KB the SM reserves for each, within an SM's 228 KB.
    assert!(logits.shared + down.shared + 2 * 1024 <= 228 * 1024);
    // A float32 lm_head gets two buffers; rows of 8 KB (Llama-8B) none worth having.
    assert_eq!(
        plan(DType::F32, 151936, 896, GemvEpilogue::StoreF32, SMS, true)
            .unwrap()
            .stages,
        2
    );
    assert_eq!(
        plan(DType::BF16, 128256, 4096, GemvEpilogue::StoreF32, SMS, false),
        None
    );
}

#[test]
fn staged_plan_declines_rows_the_norm_prologue_cannot_hold() {
    assert_eq!(plan(DType::BF16, 1024, 4096, GemvEpilogue::Store, SMS, true), None);
    assert!(plan(DType::BF16, 1024, 2048, GemvEpilogue::Store, SMS, true).is_some());
    // Not a whole number of 16-byte chunks.
    assert_eq!(plan(DType::BF16, 1024, 900, GemvEpilogue::Store, SMS, false), None);
}
