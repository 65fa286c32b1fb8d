// The micro-benchmarks' launches as the engine makes them, on one stream `st`: programmatic
// dependent launch (backend/cuda/pdl.rs), and gemv_fused (kernels/ops.cu, included before
// this) at one bf16 row with ops.rs's launch geometry.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

#include "check.cuh"

static cudaStream_t st;

template <typename... Exp, typename... Act>
static void launch_pdl(void (*k)(Exp...), dim3 grid, int block, size_t smem, Act... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k, ((Exp)args)...));
}

static void gemv_one_row(void* y, const void* x, const __nv_bfloat16* w, const __nv_bfloat16* norm_w, int out, int inner,
                         int mode, float eps) {
    const int chunks = inner / 8;
    const int passes = (chunks + GEMV_PASS_CHUNKS - 1) / GEMV_PASS_CHUNKS;
    const int halves = mode == GEMV_SILU ? 2 : 1;
    const int least = std::max(1, GEMV_WARPS / (halves * passes));
    const int most = std::max(least, 1024 / (halves * passes));
    const int rpb = std::min(std::max((out + 263) / 264, least), most);
    const int items = rpb * halves * passes;
    const size_t smem = (size_t)inner * 2 + (size_t)items * 4;
    launch_pdl(gemv_fused_r1_bf16, (out + rpb - 1) / rpb, GEMV_THREADS, smem, y, x, w, norm_w, 1, out, inner, rpb, passes,
               mode, eps, GEMV_DEPTH);
}
