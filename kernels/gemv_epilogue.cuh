// The epilogues of the one-row-product kernels (ops.cu's gemv_fused, gemv_staged.cu): what
// an output's sums become in y.
#pragma once
#include "common.cuh"

#define GEMV_STORE 0
#define GEMV_ADD 1
#define GEMV_SILU 2
#define GEMV_STORE_F32 3

// Element `at` of y from the sum of its weight row, s0, and for GEMV_SILU the sum of the
// up half's row, s1 (gate and up rounded to T first, as the unfused path stores them).
template <typename T>
__device__ __forceinline__ void gemv_epilogue(void* y, long long at, int mode, float s0, float s1) {
    if (mode == GEMV_STORE_F32) {
        static_cast<float*>(y)[at] = s0;
    } else if (mode == GEMV_STORE) {
        static_cast<T*>(y)[at] = from_f<T>(s0);
    } else if (mode == GEMV_ADD) {
        static_cast<float*>(y)[at] += round_t<T>(s0);
    } else {
        const float g = round_t<T>(s0), u = round_t<T>(s1);
        static_cast<T*>(y)[at] = from_f<T>(g / (1.f + expf(-g)) * u);
    }
}
