// One-row decode products whose blocks stage their weight rows whole in shared memory
// (issue 7, W3; backend/cuda/gemv_staged.rs; bench/gpu/micro/gemv_staged.cu measured it).
// gemv_fused (ops.cu) keeps its weights in registers, two 256-thread blocks filling an SM's
// register file, so the next product's blocks cannot be resident, and cannot ask for their
// weights, before this product's blocks retire: the weight stream stops at every hop.
// Here a launch is one block of 512 threads an SM at 64 registers (two such blocks fit
// beside each other, every launch asking for the largest shared-memory carveout), and each
// block, before pdl_wait:
//   1. copies its rows of the weight (and, for SiLU, the same rows of the up half) into
//      shared memory with bulk copies on one mbarrier (no registers held), and the norm
//      weights into registers;
//   2. calls pdl_launch_dependents, so the next product's blocks start their copies while
//      this one waits for its input;
// then builds x' in shared memory (the norm: one float4 of the residual a thread), waits
// for its copies and computes one weight row a warp, two 16-byte chunks a lane in flight.
// Epilogues and roundings as gemv_fused's n = 1 (gemv_epilogue.cuh); the sums run in another
// order, so an output may differ from gemv_fused's in its last bit.
#include "bulk_copy.cuh"
#include "common.cuh"
#include "gemv_epilogue.cuh"
#include "pdl.cuh"

#define STG_THREADS 512
#define STG_WARPS (STG_THREADS / 32)
// Bytes of one bulk copy (a block's rows go in several, so they proceed in parallel).
#define STG_PIECE (16u << 10)

// y = epilogue(x' · wᵀ) for one input row; x' = RMSNorm(x) * norm_w (x the float32 residual
// stream, inner <= 4 * STG_THREADS) when norm_w is given, else x. A block computes rows
// row0..row0 + rpb of w (and, for GEMV_SILU, the same rows of the up half at + out). Dynamic
// shared memory: (halves * rpb + 1) * inner * sizeof(T) bytes (the launcher checks).
template <typename T, int MODE>
__device__ void gemv_staged(void* y, const void* x, const T* w, const T* norm_w, int out, int inner, int rpb, float eps) {
    extern __shared__ __align__(128) unsigned char stg_smem[];
    __shared__ __align__(8) uint64_t bar;
    __shared__ float red[STG_WARPS];
    constexpr int H = MODE == GEMV_SILU ? 2 : 1;
    constexpr int VEC = 16 / sizeof(T);
    const int row0 = blockIdx.x * rpb, rows = min(rpb, out - row0);
    T* ws = reinterpret_cast<T*>(stg_smem);  // [H][rpb][inner]
    T* xs = ws + (size_t)H * rpb * inner;    // [inner]
    const unsigned bytes = (unsigned)rows * inner * sizeof(T);
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        mbar_expect_tx(&bar, H * bytes);
        for (int h = 0; h < H; h++) {
            const char* src = reinterpret_cast<const char*>(w + ((size_t)h * out + row0) * inner);
            char* dst = reinterpret_cast<char*>(ws + (size_t)h * rpb * inner);
            for (unsigned o = 0; o < bytes; o += STG_PIECE) bulk_g2s(dst + o, src + o, min(STG_PIECE, bytes - o), &bar);
        }
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = inner / VEC;
    if (norm_w) {
        // The norm weights do not depend on the previous kernel.
        const int i = threadIdx.x * 4;
        float nw[4] = {0.f, 0.f, 0.f, 0.f};
        if (i < inner)
            for (int e = 0; e < 4; e++) nw[e] = to_f(norm_w[i + e]);
        pdl_launch_dependents();
        pdl_wait();
        float4 h = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < inner) h = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
        const float ss = warp_sum(h.x * h.x + h.y * h.y + h.z * h.z + h.w * h.w);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float total = 0.f;
        for (int k = 0; k < STG_WARPS; k++) total += red[k];
        const float inv = rsqrtf(total / inner + eps);
        if (i < inner) {
            xs[i] = from_f<T>(nw[0] * (h.x * inv));
            xs[i + 1] = from_f<T>(nw[1] * (h.y * inv));
            xs[i + 2] = from_f<T>(nw[2] * (h.z * inv));
            xs[i + 3] = from_f<T>(nw[3] * (h.w * inv));
        }
    } else {
        pdl_launch_dependents();
        pdl_wait();
        for (int i = threadIdx.x; i < chunks; i += STG_THREADS)
            reinterpret_cast<uint4*>(xs)[i] = static_cast<const uint4*>(x)[i];
    }
    __syncthreads();
    while (!mbar_try(&bar, 0)) {
    }

    for (int r = warp; r < rows; r += STG_WARPS) {
        float acc[H][2];
#pragma unroll
        for (int h = 0; h < H; h++) acc[h][0] = acc[h][1] = 0.f;
        // Two chunks a lane in flight (c and c + 32), each into its own accumulator.
        for (int c0 = lane; c0 < chunks; c0 += 64) {
            uint4 xr[2], wr[H][2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int c = c0 + 32 * u;
                const bool in = c < chunks;
                xr[u] = in ? reinterpret_cast<const uint4*>(xs)[c] : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int h = 0; h < H; h++)
                    wr[h][u] = in ? reinterpret_cast<const uint4*>(ws + ((size_t)h * rpb + r) * inner)[c] : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const T* xv = reinterpret_cast<const T*>(&xr[u]);
#pragma unroll
                for (int h = 0; h < H; h++) {
                    const T* wv = reinterpret_cast<const T*>(&wr[h][u]);
#pragma unroll
                    for (int e = 0; e < VEC; e++) acc[h][u] += to_f(wv[e]) * to_f(xv[e]);
                }
            }
        }
#pragma unroll
        for (int h = 0; h < H; h++) acc[h][0] = warp_sum(acc[h][0] + acc[h][1]);
        if (lane == 0) gemv_epilogue<T>(y, row0 + r, MODE, acc[0][0], acc[H - 1][0]);
    }
}

#define INSTANTIATE_STAGED(SUFFIX, T, NAME, MODE)                                                                       \
    extern "C" __global__ void __launch_bounds__(STG_THREADS, 2) gemv_staged_##NAME##_##SUFFIX(                        \
        void* y, const void* x, const T* w, const T* norm_w, int out, int inner, int rpb, float eps) {                 \
        gemv_staged<T, MODE>(y, x, w, norm_w, out, inner, rpb, eps);                                                   \
    }
#define INSTANTIATE_STAGED_MODES(SUFFIX, T)                                                                             \
    INSTANTIATE_STAGED(SUFFIX, T, store, GEMV_STORE)                                                                    \
    INSTANTIATE_STAGED(SUFFIX, T, add, GEMV_ADD)                                                                        \
    INSTANTIATE_STAGED(SUFFIX, T, silu, GEMV_SILU)

INSTANTIATE_STAGED_MODES(f32, float)
INSTANTIATE_STAGED_MODES(bf16, __nv_bfloat16)
INSTANTIATE_STAGED_MODES(f16, __half)
