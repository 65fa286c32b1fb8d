// kernels/gemv_staged.cu (included before this) launched as backend/cuda/gemv_staged.rs
// plans it, one bf16 row, on pdl_launch.cuh's stream: the micro-benchmarks' `staged`.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "check.cuh"
#include "pdl_launch.cuh"

static int sms;

template <typename K>
static void staged_launch(K kernel, bool* set, int halves, void* y, const void* x, const __nv_bfloat16* w,
                          const __nv_bfloat16* norm_w, int out, int inner) {
    // backend/cuda/gemv_staged.rs's plan: a block's rows whole, else 16-row stages in 144 KB.
    int rpb = (out + sms - 1) / sms, stage_rows = rpb, stages = 1;
    if (((size_t)halves * rpb + 1) * inner * 2 > (160u << 10)) {
        const char* sr = getenv("STG_ROWS");
        const char* kb = getenv("STG_KB");
        stage_rows = sr ? atoi(sr) : 16;
        const unsigned limit = (kb ? atoi(kb) : 144) << 10;
        stages = std::min<int>(STG_MAX_STAGES, (limit - inner * 2) / (halves * stage_rows * inner * 2));
    }
    size_t smem = ((size_t)stages * halves * stage_rows + 1) * inner * 2;
    // tile_sums' partials (gate_up).
    if (STG_TENSOR && halves == 2) smem += (size_t)STG_WARPS * 16 * ((halves * rpb + 15) / 16) * 4;
    if (!*set) {
        CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 << 10));
        // Kernels share an SM only under one L1 / shared-memory split: all take the largest.
        CK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
        *set = true;
    }
    launch_pdl(kernel, (out + rpb - 1) / rpb, STG_THREADS, smem, y, x, w, norm_w, out, inner, rpb, stage_rows, stages,
               1e-6f);
}

// kernels/gemv_staged.cu with backend/cuda/gemv_staged.rs's geometry.
static void staged(void* y, const void* x, const __nv_bfloat16* w, const __nv_bfloat16* norm_w, int out, int inner,
                   int mode) {
    static bool set[4];
    if (mode == GEMV_STORE) staged_launch(gemv_staged_store_bf16, &set[0], 1, y, x, w, norm_w, out, inner);
    else if (mode == GEMV_ADD) staged_launch(gemv_staged_add_bf16, &set[1], 1, y, x, w, norm_w, out, inner);
    else if (mode == GEMV_SILU) staged_launch(gemv_staged_silu_bf16, &set[2], 2, y, x, w, norm_w, out, inner);
    else staged_launch(gemv_staged_logits_bf16, &set[3], 1, y, x, w, norm_w, out, inner);
}

