// W1's decode products (Qwen3-0.6B, bf16; `gemm_bench w2`: Llama-3.1-8B's, for W2) at the
// batch sizes of its run: the engine's
// cuBLAS call (GemmEx, y = x·Wᵀ, float32 sums, default tensor-op algorithm) against every
// algorithm cuBLASLt's heuristic offers for the same product (up to 16, split-K ones
// included), each timed over graph replays of 28 launches that rotate through 28 weight
// copies (one per layer, so L2 holds none), median of 15 replays.
// Build (development machine): nvcc -O3 -arch=sm_90 -std=c++17 gemm_bench.cu -lcublasLt -lcublas -o gemm_bench
// Prints per (product, rows): GemmEx µs, heuristic #0 µs, best µs (its index, split-K
// count), the weights' read time at 4 TB/s; then per rows the sum over one step's products
// (layers × qkv, o, gate_up, down) for GemmEx and for the best algorithms.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.cuh"

typedef __nv_bfloat16 bf;
const int LAYERS = 28;
const size_t WS = 32 << 20;

__global__ void fill(bf* p, long long n, unsigned seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13;
        h *= 0x5bd1e995u;
        h ^= h >> 15;
        p[i] = __float2bfloat16(((h & 0xffffff) / 16777216.f - 0.5f) * 0.1f);
    }
}

// Median µs per product of `launch(layer)` captured 28 times (one per layer) in a graph.
template <typename F>
static float time_graph(cudaStream_t s, F launch) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < LAYERS; l++) launch(l);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < 15; i++) {
        CK(cudaEventRecord(a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ts.push_back(ms);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2] * 1e3f / LAYERS;
}

int main(int argc, char** argv) {
    struct Shape {
        const char* name;
        int inner, out;
    };
    const bool w2 = argc > 1 && std::string(argv[1]) == "w2";
    const Shape w1_shapes[] = {{"qkv", 1024, 4096}, {"o", 2048, 1024}, {"gate_up", 1024, 6144}, {"down", 3072, 1024}};
    const Shape w2_shapes[] = {{"qkv", 4096, 6144}, {"o", 4096, 4096}, {"gate_up", 4096, 28672}, {"down", 14336, 4096}};
    const Shape* shapes = w2 ? w2_shapes : w1_shapes;
    const int model_layers = w2 ? 32 : 28;
    const int rows_list[] = {8, 16, 32, 64, 96, 128, 192, 256};
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    cublasHandle_t blas;
    CB(cublasCreate(&blas));
    CB(cublasSetStream(blas, s));
    void* ws;
    CK(cudaMalloc(&ws, WS));
    CB(cublasSetWorkspace(blas, ws, WS));
    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs; cuBLAS %d\n", prop.name, prop.multiProcessorCount, (int)cublasLtGetVersion());
    const int NR = sizeof(rows_list) / sizeof(rows_list[0]);
    std::vector<float> step_ex(NR, 0.f), step_best(NR, 0.f);
    for (int si = 0; si < 4; si++) {
        const Shape& sh = shapes[si];
        const long long wn = (long long)sh.inner * sh.out;
        std::vector<bf*> w(LAYERS);
        for (int l = 0; l < LAYERS; l++) {
            CK(cudaMalloc(&w[l], wn * sizeof(bf)));
            fill<<<2048, 256>>>(w[l], wn, 17 + l);
        }
        bf *x, *y;
        CK(cudaMalloc(&x, (size_t)256 * sh.inner * sizeof(bf)));
        CK(cudaMalloc(&y, (size_t)256 * sh.out * sizeof(bf)));
        fill<<<256, 256>>>(x, 256LL * sh.inner, 5);
        CK(cudaDeviceSynchronize());
        for (int ri = 0; ri < NR; ri++) {
            const int n = rows_list[ri];
            const int m = sh.out, k = sh.inner;
            const float alpha = 1.f, beta = 0.f;
            // The engine's call (blas.rs): column-major yᵀ[out, n] = W[out, inner] · xᵀ.
            const float t_ex = time_graph(s, [&](int l) {
                CB(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w[l], CUDA_R_16BF, k,
                                              wn, x, CUDA_R_16BF, k, (long long)n * k, &beta, y, CUDA_R_16BF, m,
                                              (long long)n * m, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
            });
            cublasLtMatmulDesc_t op;
            CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
            cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
            CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
            CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
            cublasLtMatrixLayout_t la, lb, lc;
            CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, m, k));
            CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, k));
            CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, m, n, m));
            cublasLtMatmulPreference_t pref;
            CB(cublasLtMatmulPreferenceCreate(&pref));
            size_t wsb = WS;
            CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
            cublasLtMatmulHeuristicResult_t res[16];
            int nres = 0;
            CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 16, res, &nres));
            float t0 = -1, best = 1e30f;
            int best_i = -1, best_split = 0;
            for (int i = 0; i < nres; i++) {
                if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
                const float t = time_graph(s, [&](int l) {
                    CB(cublasLtMatmul(lt, op, &alpha, w[l], la, x, lb, &beta, y, lc, y, lc, &res[i].algo, ws, WS, s));
                });
                if (i == 0) t0 = t;
                if (t < best) {
                    best = t;
                    best_i = i;
                    int split = 0;
                    size_t got = 0;
                    cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split,
                                                         sizeof(split), &got);
                    best_split = split;
                }
            }
            CK(cudaGetLastError());
            const float floor_us = (float)(wn * 2) / 4e12f * 1e6f;
            printf("%-8s rows %3d: GemmEx %7.2f us, Lt #0 %7.2f us, best of %2d %7.2f us (#%d, split-K %d); weights at 4 TB/s %5.2f us\n",
                   sh.name, n, t_ex, t0, nres, best, best_i, best_split, floor_us);
            step_ex[ri] += t_ex * model_layers;
            step_best[ri] += std::min(best, t_ex) * model_layers;
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(op);
        }
        for (int l = 0; l < LAYERS; l++) CK(cudaFree(w[l]));
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    for (int ri = 0; ri < NR; ri++)
        printf("gemm step rows %3d (%s): %d products GemmEx %7.1f us, best algorithms %7.1f us\n", rows_list[ri],
               w2 ? "w2" : "w1", 4 * model_layers, step_ex[ri], step_best[ri]);
    return 0;
}
