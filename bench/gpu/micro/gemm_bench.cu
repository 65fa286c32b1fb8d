// W1's decode products (Qwen3-0.6B, bf16; `gemm_bench w2`: Llama-3.1-8B's, for W2, at W2's
// decode widths 600..1024 rows and a 16,384-row prompt chunk) at the batch sizes of its run: the engine's
// cuBLAS call (GemmEx, y = x·Wᵀ, float32 sums, default tensor-op algorithm) against every
// algorithm cuBLASLt's heuristic offers for the same product (up to 16, split-K ones
// included), each timed over graph replays of launches that rotate through weight copies
// (one per layer, so L2 holds none: 28 below 512 rows, 8 from 512, 3 from 4,096, where
// the weights dwarf the L2 anyway), median of 15 replays (9 from 512 rows, 5 from 4,096).
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
#include "fill.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;
const int LAYERS = 28;
const size_t WS = 32 << 20;

// Median µs per product of `launch(layer)` captured `layers` times (one per weight copy) in
// a graph, over `replays` replays.
template <typename F>
static float time_graph(cudaStream_t s, int layers, int replays, F launch) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < layers; l++) launch(l);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    const float ms = time_runs(s, replays, [&](int) { CK(cudaGraphLaunch(ge, s)); }).median_ms;
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return ms * 1e3f / layers;
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
    const std::vector<int> rows_list = w2 ? std::vector<int>{600, 800, 1000, 1024, 16384}
                                          : std::vector<int>{8, 16, 32, 64, 96, 128, 192, 256};
    const int max_rows = *std::max_element(rows_list.begin(), rows_list.end());
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
    const int NR = (int)rows_list.size();
    std::vector<float> step_ex(NR, 0.f), step_best(NR, 0.f);
    for (int si = 0; si < 4; si++) {
        const Shape& sh = shapes[si];
        const long long wn = (long long)sh.inner * sh.out;
        std::vector<bf*> w(LAYERS);
        for (int l = 0; l < LAYERS; l++) {
            CK(cudaMalloc(&w[l], wn * sizeof(bf)));
            fill<<<2048, 256>>>(w[l], wn, 17 + l, 0.05f);
        }
        bf *x, *y;
        CK(cudaMalloc(&x, (size_t)max_rows * sh.inner * sizeof(bf)));
        CK(cudaMalloc(&y, (size_t)max_rows * sh.out * sizeof(bf)));
        fill<<<256, 256>>>(x, (long long)max_rows * sh.inner, 5, 0.05f);
        CK(cudaDeviceSynchronize());
        for (int ri = 0; ri < NR; ri++) {
            const int n = rows_list[ri];
            const int m = sh.out, k = sh.inner;
            const float alpha = 1.f, beta = 0.f;
            const int layers = n >= 4096 ? 3 : n >= 512 ? 8 : LAYERS;
            const int replays = n >= 4096 ? 5 : n >= 512 ? 9 : 15;
            // The engine's call (blas.rs): column-major yᵀ[out, n] = W[out, inner] · xᵀ.
            const float t_ex = time_graph(s, layers, replays, [&](int l) {
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
            int best_i = -1, best_split = 0, best_id = -1, best_tile = -1;
            std::string all;
            for (int i = 0; i < nres; i++) {
                if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
                // One plain call first: an algorithm that refuses is skipped, not fatal.
                if (cublasLtMatmul(lt, op, &alpha, w[0], la, x, lb, &beta, y, lc, y, lc, &res[i].algo, ws, WS, s) != 0) {
                    all += " x";
                    continue;
                }
                const float t = time_graph(s, layers, replays, [&](int l) {
                    CB(cublasLtMatmul(lt, op, &alpha, w[l], la, x, lb, &beta, y, lc, y, lc, &res[i].algo, ws, WS, s));
                });
                if (i == 0) t0 = t;
                char buf[32];
                snprintf(buf, sizeof buf, " %.1f", t);
                all += buf;
                if (t < best) {
                    best = t;
                    best_i = i;
                    int split = 0, id = 0, tile = 0;
                    size_t got = 0;
                    cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split,
                                                         sizeof(split), &got);
                    cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &got);
                    cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile,
                                                         sizeof(tile), &got);
                    best_split = split;
                    best_id = id;
                    best_tile = tile;
                }
            }
            CK(cudaGetLastError());
            const float floor_us = (float)(wn * 2) / 4e12f * 1e6f;
            const double flop = 2.0 * n * (double)wn;
            printf("%-8s rows %5d: GemmEx %8.2f us (%3.0f TFLOP/s), Lt #0 %8.2f us, best of %2d %8.2f us (%3.0f TFLOP/s; #%d, algo %d, tile %d, split-K %d); weights at 4 TB/s %5.2f us\n",
                   sh.name, n, t_ex, flop / t_ex * 1e-6, t0, nres, best, flop / best * 1e-6, best_i, best_id, best_tile,
                   best_split, floor_us);
            printf("  all (us):%s\n", all.c_str());
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
        printf("gemm step rows %5d (%s): %d products GemmEx %9.1f us, best algorithms %9.1f us\n", rows_list[ri],
               w2 ? "w2" : "w1", 4 * model_layers, step_ex[ri], step_best[ri]);
    return 0;
}
