// Standalone check and timing of gemv_fused (kernels/ops.cu) against cuBLAS for the decode
// shapes of W3 (Qwen2.5-0.5B) and W1 (Qwen3-0.6B), bf16, 1..8 rows. Built and run on the GPU
// machine: nvcc -O3 -arch=sm_90 -std=c++17 gemv_bench.cu -lcublas -o gemv_bench
// Prints, per shape and row count: rel. L2 difference to the reference (cuBLAS, plus our
// separate norm / silu / residual kernels for the fused epilogues) and the median time per
// product over graph replays that rotate through one weight copy per layer.
#include "../../../kernels/ops.cu"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "check.cuh"
#include "device_compare.cuh"
#include "fill.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;

static cublasHandle_t blas;
static cudaStream_t st;

static void gemm(bf* y, const bf* x, const bf* w, int n, int out, int inner) {
    float a = 1.f, b = 0.f;
    CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, inner, &a, w, CUDA_R_16BF, inner, x, CUDA_R_16BF, inner, &b, y,
                    CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
}

static int pick_nr(int n) { return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8; }

// Mirrors ops.rs's launch_gemv_fused choice of geometry.
// y and x are bf16, or the float32 residual stream (x with norm_w; y with GEMV_ADD).
static void gemv(void* y, const void* x, const bf* w, const bf* norm_w, int n, int out, int inner, int mode) {
    const int VEC = 8;
    int chunks = inner / VEC;
    int passes = (chunks + GEMV_PASS_CHUNKS - 1) / GEMV_PASS_CHUNKS;
    int halves = mode == GEMV_SILU ? 2 : 1;
    int least = std::max(1, GEMV_WARPS / (halves * passes));
    int most = std::max(least, 1024 / (halves * passes));
    int rpb = std::min(std::max((out + 263) / 264, least), most);
    int nr = pick_nr(n);
    int items = rpb * halves * passes;
    size_t smem = (size_t)n * inner * 2 + (size_t)items * nr * 4;
    int blocks = (out + rpb - 1) / rpb;
    float eps = 1e-6f;
    switch (nr) {
    case 1: gemv_fused_r1_bf16<<<blocks, GEMV_THREADS, smem, st>>>(y, x, w, norm_w, n, out, inner, rpb, passes, mode, eps, GEMV_DEPTH); break;
    case 2: gemv_fused_r2_bf16<<<blocks, GEMV_THREADS, smem, st>>>(y, x, w, norm_w, n, out, inner, rpb, passes, mode, eps, GEMV_DEPTH); break;
    case 4: gemv_fused_r4_bf16<<<blocks, GEMV_THREADS, smem, st>>>(y, x, w, norm_w, n, out, inner, rpb, passes, mode, eps, GEMV_DEPTH); break;
    default: gemv_fused_r8_bf16<<<blocks, GEMV_THREADS, smem, st>>>(y, x, w, norm_w, n, out, inner, rpb, passes, mode, eps, GEMV_DEPTH); break;
    }
    CK(cudaGetLastError());
}

struct Shape {
    const char* name;
    int hidden, qkv, q, inter, vocab, layers;
};

int main() {
    CK(cudaStreamCreate(&st));
    CB(cublasCreate(&blas));
    CB(cublasSetStream(blas, st));
    void* ws;
    CK(cudaMalloc(&ws, 32 << 20));
    CB(cublasSetWorkspace(blas, ws, 32 << 20));
    Shape shapes[] = {{"w3", 896, 1152, 896, 4864, 151936, 24}, {"w1", 1024, 4096, 2048, 3072, 151936, 28}};
    bool ok = true;
    for (auto& s : shapes) {
        const int L = s.layers;
        size_t per_layer = (size_t)s.qkv * s.hidden + (size_t)s.hidden * s.q + 2ull * s.inter * s.hidden + (size_t)s.hidden * s.inter;
        bf* wts;
        CK(cudaMalloc(&wts, (per_layer * L + (size_t)s.vocab * s.hidden) * 2));
        fill<<<4096, 256, 0, st>>>(wts, per_layer * L + (size_t)s.vocab * s.hidden, 7, 0.05f);
        auto W = [&](int l, int which) -> bf* {
            bf* p = wts + per_layer * l;
            size_t o[4] = {0, (size_t)s.qkv * s.hidden, (size_t)s.qkv * s.hidden + (size_t)s.hidden * s.q,
                           (size_t)s.qkv * s.hidden + (size_t)s.hidden * s.q + 2ull * s.inter * s.hidden};
            return p + o[which];
        };
        bf* lm = wts + per_layer * L;
        const int maxw = std::max({s.qkv, s.q, 2 * s.inter, s.vocab});
        bf *x, *y, *y2, *nw, *tmp;
        float *h, *h2;  // the residual stream, float32 as in the engine
        CK(cudaMalloc(&x, 8 * maxw * 2));
        CK(cudaMalloc(&y, 8ull * maxw * 2));
        CK(cudaMalloc(&y2, 8ull * maxw * 2));
        CK(cudaMalloc(&h, 8 * s.hidden * 4));
        CK(cudaMalloc(&h2, 8 * s.hidden * 4));
        CK(cudaMalloc(&nw, s.hidden * 2));
        CK(cudaMalloc(&tmp, 8ull * maxw * 2));
        fill<<<64, 256, 0, st>>>(x, 8 * maxw, 11, 1.f);
        fill<<<64, 256, 0, st>>>(nw, s.hidden, 13, 1.f);
        for (int n : {1, 2}) {
            // Correctness against cuBLAS (+ our separate kernels for the fused epilogues).
            struct Op { const char* name; int which; int out, inner; } ops[] = {
                {"qkv", 0, s.qkv, s.hidden}, {"o", 1, s.hidden, s.q}, {"gate_up", 2, 2 * s.inter, s.hidden},
                {"down", 3, s.hidden, s.inter}, {"lm_head", 4, s.vocab, s.hidden}};
            for (auto& op : ops) {
                bf* w = op.which == 4 ? lm : W(0, op.which);
                if ((size_t)n * op.inner * 2 + 64 * 4 > 48 * 1024) continue;
                gemm(y2, x, w, n, op.out, op.inner);
                CK(cudaMemsetAsync(y, 0xff, (size_t)n * op.out * 2, st));
                gemv(y, x, w, nullptr, n, op.out, op.inner, GEMV_STORE);
                double e = rel(y, y2, (size_t)n * op.out);
                ok &= e < 1e-2;
                printf("check %s n=%d %-8s store rel %.2e\n", s.name, n, op.name, e);
            }
            // Fused norm prologue (qkv): x' = rmsnorm(h) * nw.
            fill<<<64, 256, 0, st>>>(h, n * s.hidden, 17 + n, 2.f);
            add_rms_norm_bf16<<<n, 256, 0, st>>>(h, nullptr, nw, tmp, s.hidden, 1e-6f);
            gemm(y2, tmp, W(0, 0), n, s.qkv, s.hidden);
            CK(cudaMemsetAsync(y, 0xff, (size_t)n * s.qkv * 2, st));
            gemv(y, h, W(0, 0), nw, n, s.qkv, s.hidden, GEMV_STORE);
            double e1 = rel(y, y2, (size_t)n * s.qkv);
            // Norm + silu (gate_up).
            gemm(tmp + 8 * s.hidden, tmp, W(0, 2), n, 2 * s.inter, s.hidden);
            silu_mul_bf16<<<256, 256, 0, st>>>(y2, tmp + 8 * s.hidden, s.inter, (long long)n * s.inter);
            CK(cudaMemsetAsync(y, 0xff, (size_t)n * s.inter * 2, st));
            gemv(y, h, W(0, 2), nw, n, s.inter, s.hidden, GEMV_SILU);
            double e2 = rel(y, y2, (size_t)n * s.inter);
            // Residual add (down): h += act · downᵀ.
            double e3 = -1;
            if ((size_t)n * s.inter * 2 + 64 * 4 <= 48 * 1024) {
                CK(cudaMemcpyAsync(h2, h, (size_t)n * s.hidden * 4, cudaMemcpyDeviceToDevice, st));
                gemm(tmp, x, W(0, 3), n, s.hidden, s.inter);
                add_rms_norm_bf16<<<n, 256, 0, st>>>(h2, tmp, nw, y2, s.hidden, 1e-6f);
                gemv(h, x, W(0, 3), nullptr, n, s.hidden, s.inter, GEMV_ADD);
                e3 = rel(h, h2, (size_t)n * s.hidden);
            }
            CK(cudaStreamSynchronize(st));
            ok &= e1 < 1e-2 && e2 < 2e-2 && e3 < 1e-2;
            printf("check %s n=%d fused: norm+qkv %.2e, norm+gate_up+silu %.2e, down+residual %.2e\n", s.name, n, e1, e2, e3);

            // Timing: per product kind, L launches rotating over the layers' weights.
            printf("time %s n=%d (us per product, median of 30 graph replays):\n", s.name, n);
            for (auto& op : ops) {
                if (op.which == 4) continue;
                float tb = time_graph(st, [&] { for (int l = 0; l < L; l++) gemm(y, x, W(l, op.which), n, op.out, op.inner); }) * 1e3f / L;
                float tg = -1;
                if ((size_t)n * op.inner * 2 + 64 * 4 <= 48 * 1024)
                    tg = time_graph(st, [&] { for (int l = 0; l < L; l++) gemv(y, x, W(l, op.which), nullptr, n, op.out, op.inner, GEMV_STORE); }) * 1e3f / L;
                double mb = (double)op.out * op.inner * 2 / 1e6;
                printf("  %-8s %6.2f MB  cublas %7.2f  gemv %7.2f\n", op.name, mb, tb, tg);
            }
            {
                float tb = time_graph(st, [&] { gemm(y, x, lm, n, s.vocab, s.hidden); }) * 1e3f;
                float tg = time_graph(st, [&] { gemv(y, x, lm, nullptr, n, s.vocab, s.hidden, GEMV_STORE); }) * 1e3f;
                printf("  lm_head  %6.1f MB  cublas %7.2f  gemv %7.2f\n", (double)s.vocab * s.hidden * 2 / 1e6, tb, tg);
            }
            // A whole step's products: cuBLAS + separate norm/silu vs the fused sequence.
            if ((size_t)n * s.inter * 2 + 64 * 4 <= 48 * 1024) {
                float tb = time_graph(st, [&] {
                    for (int l = 0; l < L; l++) {
                        add_rms_norm_bf16<<<n, 256, 0, st>>>(h, y2, nw, tmp, s.hidden, 1e-6f);
                        gemm(y, tmp, W(l, 0), n, s.qkv, s.hidden);
                        gemm(y2, x, W(l, 1), n, s.hidden, s.q);
                        add_rms_norm_bf16<<<n, 256, 0, st>>>(h, y2, nw, tmp, s.hidden, 1e-6f);
                        gemm(y, tmp, W(l, 2), n, 2 * s.inter, s.hidden);
                        silu_mul_bf16<<<256, 256, 0, st>>>(tmp, y, s.inter, (long long)n * s.inter);
                        gemm(y2, tmp, W(l, 3), n, s.hidden, s.inter);
                    }
                    add_rms_norm_bf16<<<n, 256, 0, st>>>(h, y2, nw, tmp, s.hidden, 1e-6f);
                    gemm(y, tmp, lm, n, s.vocab, s.hidden);
                }) * 1e3f;
                float tg = time_graph(st, [&] {
                    for (int l = 0; l < L; l++) {
                        gemv(y, h, W(l, 0), nw, n, s.qkv, s.hidden, GEMV_STORE);
                        gemv(h, x, W(l, 1), nullptr, n, s.hidden, s.q, GEMV_ADD);
                        gemv(tmp, h, W(l, 2), nw, n, s.inter, s.hidden, GEMV_SILU);
                        gemv(h, tmp, W(l, 3), nullptr, n, s.hidden, s.inter, GEMV_ADD);
                    }
                    gemv(y, h, lm, nw, n, s.vocab, s.hidden, GEMV_STORE);
                }) * 1e3f;
                double mb = (per_layer * L + (double)s.vocab * s.hidden) * 2 / 1e6;
                printf("  step %s n=%d: products+norms+silu cublas %.1f us, fused gemv %.1f us (%.0f MB: %.2f TB/s)\n", s.name, n,
                       tb, tg, mb, mb / 1e6 / (tg * 1e-6));
            }
        }
        CK(cudaFree(wts));
        for (bf* p : {x, y, y2, nw, tmp}) CK(cudaFree(p));
        for (float* p : {h, h2}) CK(cudaFree(p));
    }
    CK(cudaDeviceSynchronize());
    printf("gemv_bench: %s\n", ok ? "all checks PASS" : "some check FAILED");
    return ok ? 0 : 1;
}
