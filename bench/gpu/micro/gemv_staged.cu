// Issue 7, session 14: can W3's one-row products stream their weights under the dependency
// hops? Today's gemv_fused (kernels/ops.cu) asks for its first weights before pdl_wait, but a
// product's blocks fill the SMs' registers (2 blocks of 256 threads an SM), so the next
// product's blocks cannot be resident, and its weights are not asked for, until this one's
// blocks retire. gemv_staged: one block of 512 threads an SM (64 registers: two such blocks
// fit beside each other, under the largest shared-memory carveout), each copies its
// rows of the weight whole into shared memory with bulk copies (cp.async.bulk, no registers
// held) before pdl_wait and calls pdl_launch_dependents at once, so the next product's blocks
// start their copies while this one waits for its input and computes.
// Checks gemv_staged against gemv_fused on every mode, then times W3's 24 layers of products
// (qkv with its norm, o_proj + residual, gate_up with its norm and SiLU, down + residual; no
// attention) as PDL launches in one CUDA graph, each form alone and each product alone.
// Build (development machine): nvcc -O3 -arch=sm_90 -std=c++17 gemv_staged.cu -o gemv_staged
#include "../../../kernels/ops.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "bulk_copy.cuh"
#include "check.cuh"
#include "fill.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;

#define STG_THREADS 512
#define STG_WARPS (STG_THREADS / 32)
// Bytes of one bulk copy (a block's rows go in several, so they proceed in parallel).
#define STG_PIECE (16u << 10)
// 16-byte chunks of a weight row a lane loads before summing them.
#ifndef STG_UNROLL
#define STG_UNROLL 2
#endif

// Block 0 of each staged launch stamps the global timer (ns) at its start, after pdl_wait,
// once its weights have landed, and at its end, in launch order (`stamp_next` counts).
#define STAMPS 128
__device__ unsigned stamp_next;
__device__ unsigned long long stamps[STAMPS][4];
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// y = epilogue(x' · wᵀ) for one input row, modes and x' as gemv_fused; a block computes
// rows row0..row0 + rpb (and, for GEMV_SILU, the same rows of the up half at + out).
template <int MODE>
__global__ void __launch_bounds__(STG_THREADS, 2)
    gemv_staged(void* y, const void* x, const bf* w, const bf* norm_w, int out, int inner, int rpb, float eps) {
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) uint64_t bar;
    __shared__ float red[STG_WARPS];
    constexpr int H = MODE == GEMV_SILU ? 2 : 1;
    const int row0 = blockIdx.x * rpb, rows = min(rpb, out - row0);
    bf* ws = reinterpret_cast<bf*>(sm);      // [H][rpb][inner]
    bf* xs = ws + (size_t)H * rpb * inner;  // [inner]
    __shared__ unsigned seq;
    const bool stamp = blockIdx.x == 0 && threadIdx.x == 0;
    if (stamp) {
        seq = atomicAdd(&stamp_next, 1);
        if (seq < STAMPS) stamps[seq][0] = now_ns();
    }
    const unsigned bytes = (unsigned)rows * inner * 2;
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
    const int chunks = inner / 8;
    if (norm_w) {
        // One float4 of h and the matching norm weights per thread (inner <= 4 * STG_THREADS);
        // the norm weights do not depend on the previous kernel.
        const int i = threadIdx.x * 4;
        float nwv[4] = {0.f, 0.f, 0.f, 0.f};
        if (i < inner)
            for (int e = 0; e < 4; e++) nwv[e] = to_f(norm_w[i + e]);
        pdl_launch_dependents();
        pdl_wait();
        if (stamp && seq < STAMPS) stamps[seq][1] = now_ns();
        float4 hv = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < inner) hv = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
        float ss = warp_sum(hv.x * hv.x + hv.y * hv.y + hv.z * hv.z + hv.w * hv.w);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float total = 0.f;
        for (int k = 0; k < STG_WARPS; k++) total += red[k];
        const float inv = rsqrtf(total / inner + eps);
        if (i < inner) {
            xs[i] = from_f<bf>(nwv[0] * (hv.x * inv));
            xs[i + 1] = from_f<bf>(nwv[1] * (hv.y * inv));
            xs[i + 2] = from_f<bf>(nwv[2] * (hv.z * inv));
            xs[i + 3] = from_f<bf>(nwv[3] * (hv.w * inv));
        }
    } else {
        pdl_launch_dependents();
        pdl_wait();
        if (stamp && seq < STAMPS) stamps[seq][1] = now_ns();
        for (int i = threadIdx.x; i < chunks; i += STG_THREADS)
            reinterpret_cast<uint4*>(xs)[i] = static_cast<const uint4*>(x)[i];
    }
    __syncthreads();
    while (!mbar_try(&bar, 0)) {
    }
    if (stamp && seq < STAMPS) stamps[seq][2] = now_ns();

    for (int r = warp; r < rows; r += STG_WARPS) {
        float acc[H][2];
#pragma unroll
        for (int h = 0; h < H; h++) acc[h][0] = acc[h][1] = 0.f;
        // STG_UNROLL chunks a lane in flight (c, c + 32, ...), each into its own accumulator.
        for (int c0 = lane; c0 < chunks; c0 += 32 * STG_UNROLL) {
            uint4 xr[STG_UNROLL], wr[H][STG_UNROLL];
#pragma unroll
            for (int u = 0; u < STG_UNROLL; u++) {
                const int c = c0 + 32 * u;
                const bool in = c < chunks;
                xr[u] = in ? reinterpret_cast<const uint4*>(xs)[c] : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int h = 0; h < H; h++)
                    wr[h][u] = in ? reinterpret_cast<const uint4*>(ws + ((size_t)h * rpb + r) * inner)[c] : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < STG_UNROLL; u++) {
                const bf* xv = reinterpret_cast<const bf*>(&xr[u]);
#pragma unroll
                for (int h = 0; h < H; h++) {
                    const bf* wv = reinterpret_cast<const bf*>(&wr[h][u]);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[h][u & 1] += to_f(wv[e]) * to_f(xv[e]);
                }
            }
        }
#pragma unroll
        for (int h = 0; h < H; h++) acc[h][0] = warp_sum(acc[h][0] + acc[h][1]);
        if (lane == 0) {
            const int o = row0 + r;
            if (MODE == GEMV_STORE) {
                static_cast<bf*>(y)[o] = from_f<bf>(acc[0][0]);
            } else if (MODE == GEMV_ADD) {
                static_cast<float*>(y)[o] += round_t<bf>(acc[0][0]);
            } else {
                const float g = round_t<bf>(acc[0][0]), u = round_t<bf>(acc[H - 1][0]);
                static_cast<bf*>(y)[o] = from_f<bf>(g / (1.f + expf(-g)) * u);
            }
        }
    }
    if (stamp && seq < STAMPS) stamps[seq][3] = now_ns();
}

static cudaStream_t st;
static int sms;

template <typename... Exp, typename... Act>
static void launch_pdl(void (*k)(Exp...), int grid, int block, size_t smem, Act... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
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

// gemv_fused at one row with ops.rs's geometry (as gemv_bench.cu and persistent_chain.cu).
static void fused(void* y, const void* x, const bf* w, const bf* norm_w, int out, int inner, int mode) {
    const int chunks = inner / 8;
    const int passes = (chunks + GEMV_PASS_CHUNKS - 1) / GEMV_PASS_CHUNKS;
    const int halves = mode == GEMV_SILU ? 2 : 1;
    const int least = std::max(1, GEMV_WARPS / (halves * passes));
    const int most = std::max(least, 1024 / (halves * passes));
    const int rpb = std::min(std::max((out + 263) / 264, least), most);
    const int items = rpb * halves * passes;
    const size_t smem = (size_t)inner * 2 + (size_t)items * 4;
    launch_pdl(gemv_fused_r1_bf16, (out + rpb - 1) / rpb, GEMV_THREADS, smem, y, x, w, norm_w, 1, out, inner, rpb, passes,
               mode, 1e-6f, GEMV_DEPTH);
}

template <int MODE>
static void staged_mode(void* y, const void* x, const bf* w, const bf* norm_w, int out, int inner) {
    const int halves = MODE == GEMV_SILU ? 2 : 1;
    const int rpb = (out + sms - 1) / sms;
    const size_t smem = ((size_t)halves * rpb + 1) * inner * 2;
    static bool set = false;
    if (!set) {
        CK(cudaFuncSetAttribute(gemv_staged<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 << 10));
        // Kernels share an SM only under one L1 / shared-memory split: all take the largest.
        CK(cudaFuncSetAttribute(gemv_staged<MODE>, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
        set = true;
    }
    launch_pdl(gemv_staged<MODE>, (out + rpb - 1) / rpb, STG_THREADS, smem, y, x, w, norm_w, out, inner, rpb, 1e-6f);
}

static void staged(void* y, const void* x, const bf* w, const bf* norm_w, int out, int inner, int mode) {
    if (mode == GEMV_STORE) staged_mode<GEMV_STORE>(y, x, w, norm_w, out, inner);
    else if (mode == GEMV_ADD) staged_mode<GEMV_ADD>(y, x, w, norm_w, out, inner);
    else staged_mode<GEMV_SILU>(y, x, w, norm_w, out, inner);
}

typedef void (*Gemv)(void*, const void*, const bf*, const bf*, int, int, int);

template <typename E> static std::vector<float> host(const E* d, size_t n) {
    std::vector<E> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(E), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = (float)h[i];
    return f;
}

template <typename E> static double rel(const E* a, const E* b, size_t n) {
    auto x = host(a, n), y = host(b, n);
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(x[i])) return INFINITY;
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += y[i] * y[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

template <typename F> static float time_graph(F body, int reps = 30) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    body();
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 3; i++) CK(cudaGraphLaunch(ge, st));
    const float ms = time_runs(st, reps, [&](int) { CK(cudaGraphLaunch(ge, st)); }).median_ms;
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return ms;
}

int main() {
    CK(cudaStreamCreate(&st));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int HID = 896, QKV = 1152, INTER = 4864, L = 24;
    const size_t per_layer = (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID + (size_t)HID * INTER;
    bf* wts;
    CK(cudaMalloc(&wts, per_layer * L * 2));
    fill<<<4096, 256, 0, st>>>(wts, per_layer * L, 7, 0.05f);
    auto W = [&](int l, int which) -> bf* {
        const size_t o[4] = {0, (size_t)QKV * HID, (size_t)QKV * HID + (size_t)HID * HID,
                             (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID};
        return wts + per_layer * l + o[which];
    };
    bf *qkv, *qkv2, *act, *act2, *nw;
    float *h, *h2, *h0;
    CK(cudaMalloc(&qkv, QKV * 2));
    CK(cudaMalloc(&qkv2, QKV * 2));
    CK(cudaMalloc(&act, INTER * 2));
    CK(cudaMalloc(&act2, INTER * 2));
    CK(cudaMalloc(&nw, HID * 2));
    CK(cudaMalloc(&h, HID * 4));
    CK(cudaMalloc(&h2, HID * 4));
    CK(cudaMalloc(&h0, HID * 4));
    fill<<<64, 256, 0, st>>>(h0, HID, 17, 2.f);
    fill<<<64, 256, 0, st>>>(nw, HID, 13, 1.f);
    fill<<<64, 256, 0, st>>>(act, INTER, 11, 1.f);
    fill<<<64, 256, 0, st>>>(qkv, QKV, 19, 1.f);

    // Checks: every mode of gemv_staged against gemv_fused from the same inputs.
    bool ok = true;
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(qkv2, h, W(0, 0), nw, QKV, HID, GEMV_STORE);
    staged(qkv, h, W(0, 0), nw, QKV, HID, GEMV_STORE);
    const double e_qkv = rel(qkv, qkv2, QKV);
    fused(act2, h, W(0, 2), nw, INTER, HID, GEMV_SILU);
    staged(act, h, W(0, 2), nw, INTER, HID, GEMV_SILU);
    const double e_gu = rel(act, act2, INTER);
    CK(cudaMemcpyAsync(h2, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(h2, act, W(0, 3), nullptr, HID, INTER, GEMV_ADD);
    staged(h, act, W(0, 3), nullptr, HID, INTER, GEMV_ADD);
    const double e_down = rel(h, h2, HID);
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    CK(cudaMemcpyAsync(h2, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    fused(h2, qkv, W(0, 1), nullptr, HID, HID, GEMV_ADD);
    staged(h, qkv, W(0, 1), nullptr, HID, HID, GEMV_ADD);
    const double e_o = rel(h, h2, HID);
    CK(cudaStreamSynchronize(st));
    // Sums in another order: a few bf16 roundings of the outputs may flip.
    ok = e_qkv < 5e-3 && e_gu < 5e-3 && e_down < 1e-3 && e_o < 1e-3;
    printf("check staged vs fused: norm+qkv %.2e, norm+gate_up+silu %.2e, down+residual %.2e, o+residual %.2e: %s\n", e_qkv,
           e_gu, e_down, e_o, ok ? "PASS" : "FAIL");

    struct Op { const char* name; int which, out, inner, mode; bool norm; } ops[] = {
        {"qkv", 0, QKV, HID, GEMV_STORE, true}, {"o", 1, HID, HID, GEMV_ADD, false},
        {"gate_up", 2, INTER, HID, GEMV_SILU, true}, {"down", 3, HID, INTER, GEMV_ADD, false}};
    auto run_op = [&](Gemv g, const Op& op, int l) {
        void* y = op.which == 0 ? (void*)qkv : op.which == 2 ? (void*)act : (void*)h;
        const void* x = op.norm ? (const void*)h : op.which == 1 ? (const void*)qkv : (const void*)act;
        g(y, x, W(l, op.which), op.norm ? nw : nullptr, op.out, op.inner, op.mode);
    };
    const double layer_mb = per_layer * 2 / 1e6;
    printf("time (us, median of 30 graph replays; W3 shapes, %d SMs, one row):\n", sms);
    const Gemv forms[2] = {fused, staged};
    const char* names[2] = {"fused", "staged"};
    for (auto& op : ops) {
        float t[2];
        for (int f = 0; f < 2; f++) t[f] = time_graph([&] { for (int l = 0; l < L; l++) run_op(forms[f], op, l); }) * 1e3f / L;
        const double mb = (double)op.out * (op.mode == GEMV_SILU ? 2 : 1) * op.inner * 2 / 1e6;
        printf("  %-8s %6.2f MB alone, 24 in a row: fused %6.2f  staged %6.2f\n", op.name, mb, t[0], t[1]);
    }
    for (int f = 0; f < 2; f++) {
        CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
        const float ms = time_graph([&] {
            for (int l = 0; l < L; l++)
                for (auto& op : ops) run_op(forms[f], op, l);
        });
        printf("  chain of 24 layers (qkv, o, gate_up, down), %s: %.1f us = %.2f us a layer (%.2f TB/s)\n", names[f], ms * 1e3f,
               ms * 1e3f / L, layer_mb * L / 1e6 / (ms * 1e-3));
    }
    // One replay of 4 staged layers, stamped: when block 0 of each launch started, passed
    // pdl_wait, had its weights, and ended, relative to the first launch's start (us).
    {
        const unsigned zero = 0;
        CK(cudaMemcpyToSymbol(stamp_next, &zero, 4));
        for (int l = 0; l < 4; l++)
            for (auto& op : ops) run_op(staged, op, l);
        CK(cudaStreamSynchronize(st));
        unsigned long long t[16][4];
        CK(cudaMemcpyFromSymbol(t, stamps, sizeof(t)));
        printf("staged launches, block 0 (us from the first start): start / past pdl_wait / weights in / end\n");
        for (int k = 0; k < 16; k++)
            printf("  %-8s %7.2f %7.2f %7.2f %7.2f\n", ops[k % 4].name, (t[k][0] - t[0][0]) / 1e3, (t[k][1] - t[0][0]) / 1e3,
                   (t[k][2] - t[0][0]) / 1e3, (t[k][3] - t[0][0]) / 1e3);
    }
    printf("gemv_staged: %s\n", ok ? "all checks PASS" : "some check FAILED");
    return ok ? 0 : 1;
}
