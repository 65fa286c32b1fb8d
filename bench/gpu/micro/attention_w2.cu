// W2's decode attention (Llama-3.1-8B: 32 query heads over 8 KV heads, group 4, head_dim
// 128, bf16, block size 16) through attention_batch_g4 as session 6 ran it
// (attention_batch_g4_u2 now: U = 2 rows per pass, no register cap, 128 positions per
// split), against the engine's form since (U = 4 capped at 128 registers) and variants: more rows per
// pass, register caps, the pipelined form, other partitions. Decode rows of W2's contexts
// (uniform 129..256, mean ~193) over a paged cache with shuffled block tables; 1,000 rows
// (the eager steps) and 256 rows (the captured ones).
// Session 8: the tensor-core form (the engine's default since) in several geometries, each
// also checked against the float64 reference. (The staged form measured that session, rows
// through cp.async rings, is in RESULTS and in commit 423c16c, not here.)
// Build (development machine, no GPU needed):
//   nvcc -O3 -arch=sm_90 -std=c++17 attention_w2.cu -o attention_w2
// Prints per variant: median µs of one layer (two cache copies alternating so L2 holds
// neither), KV bytes read per second, and the rel. L2 difference to the session-6 form
// (itself checked against a float64 CPU reference on 16 rows).
#include "../../../kernels/attention_batch.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "check.cuh"
#include "compare.cuh"
#include "fill.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;
#include "ab_variant.cuh"

// Registers decide the blocks per SM (128 threads each): the session-6 form takes 135 (3
// blocks); MINB 4 caps at 128 (4 blocks), MINB 5 at 102.
// The tensor-core form: TC_STAGES 2 at 12 blocks (168 registers), capped at 16 / 20
// blocks (128 / 102), 3 and 4 stages.
AB_VARIANT_TC(tc_s2_min16, 2, 16)
AB_VARIANT_TC(tc_s3_min12, 3, 12)
AB_VARIANT_TC(tc_s3_min16, 3, 16)
AB_VARIANT_TC(tc_s4_min12, 4, 12)
AB_VARIANT_TC(tc_s2_min20, 2, 20)

const int NH = 32, KVH = 8, HD = 128, BS = 16, CTX_LO = 129, CTX_HI = 256, LAYERS = 2;

struct Setup {
    int n, max_blocks, max_ctx, num_blocks;
    uint32_t *pos, *seq, *tables;
    bf *q, *k[LAYERS], *v[LAYERS], *out;
    float *acc, *ml;
    unsigned int* counts;
    double kv_bytes;
    std::vector<int> ctx;
    std::vector<uint32_t> htables;
    std::vector<bf> hk, hv, hq;  // layer 0's cache and the queries on the host, once
};

static Setup make(int n) {
    Setup s;
    s.n = n;
    std::mt19937 rng(7 + n);
    std::uniform_int_distribution<int> len(CTX_LO, CTX_HI);
    s.ctx.resize(n);
    long long positions = 0;
    for (int& c : s.ctx) positions += (c = len(rng));
    s.max_ctx = *std::max_element(s.ctx.begin(), s.ctx.end());
    s.max_blocks = (s.max_ctx + BS - 1) / BS;
    s.num_blocks = n * s.max_blocks;
    std::vector<uint32_t> ids(s.num_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    std::shuffle(ids.begin(), ids.end(), rng);
    s.htables = ids;  // row t: ids[t * max_blocks ..]
    std::vector<uint32_t> pos(n), seq(n);
    for (int t = 0; t < n; t++) pos[t] = s.ctx[t] - 1, seq[t] = t;
    s.kv_bytes = 2.0 * positions * KVH * HD * sizeof(bf);
    const size_t cache = (size_t)s.num_blocks * BS * KVH * HD;
    CK(cudaMalloc(&s.pos, n * 4));
    CK(cudaMalloc(&s.seq, n * 4));
    CK(cudaMalloc(&s.tables, (size_t)s.num_blocks * 4));
    CK(cudaMemcpy(s.pos, pos.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.seq, seq.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.tables, ids.data(), (size_t)s.num_blocks * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&s.q, (size_t)n * NH * HD * sizeof(bf)));
    fill<<<1024, 256>>>(s.q, (long long)n * NH * HD, 3, 1.f);
    for (int l = 0; l < LAYERS; l++) {
        CK(cudaMalloc(&s.k[l], cache * sizeof(bf)));
        CK(cudaMalloc(&s.v[l], cache * sizeof(bf)));
        fill<<<4096, 256>>>(s.k[l], cache, 11 + l, 1.f);
        fill<<<4096, 256>>>(s.v[l], cache, 23 + l, 1.f);
    }
    CK(cudaMalloc(&s.out, (size_t)n * NH * HD * sizeof(bf)));
    const int max_splits = (s.max_ctx + 31) / 32;
    CK(cudaMalloc(&s.acc, (size_t)n * NH * max_splits * HD * 4));
    CK(cudaMalloc(&s.ml, (size_t)n * NH * max_splits * 2 * 4));
    CK(cudaMalloc(&s.counts, (size_t)n * KVH * 4));
    CK(cudaMemset(s.counts, 0, (size_t)n * KVH * 4));
    CK(cudaDeviceSynchronize());
    return s;
}

// stage_kib: the tensor-core forms' stages (8 KiB a stage; those run one warp per block:
// tc), 0 for the others.
static void launch(const Setup& s, AttnKernel kernel, int partition, int layer, int stage_kib = 0, bool tc = false) {
    const int splits = (s.max_ctx + partition - 1) / partition;
    const int warps = tc ? 1 : std::min(KVH, AB_MAX_WARPS);
    const int shared = stage_kib * 1024 + (partition / BS + 2) * 4;
    kernel<<<dim3(s.n, (KVH + warps - 1) / warps, splits), warps * 32, shared>>>(
        s.out, s.acc, s.ml, s.q, s.k[layer], s.v[layer], s.pos, s.seq, s.tables, s.max_blocks, BS, NH, KVH, HD,
        1.f / sqrtf((float)HD), 0, partition, splits, s.counts);
}

static std::vector<bf> fetch(const Setup& s) {
    std::vector<bf> h((size_t)s.n * NH * HD);
    CK(cudaMemcpy(h.data(), s.out, h.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    return h;
}

// Float64 attention of rows 0..rows-1 (all heads) from layer 0's cache, against `got`.
static double check_cpu(Setup& s, const std::vector<bf>& got, int rows) {
    const size_t cache = (size_t)s.num_blocks * BS * KVH * HD;
    if (s.hk.empty()) {
        s.hk.resize(cache), s.hv.resize(cache), s.hq.resize((size_t)s.n * NH * HD);
        CK(cudaMemcpy(s.hk.data(), s.k[0], cache * sizeof(bf), cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(s.hv.data(), s.v[0], cache * sizeof(bf), cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(s.hq.data(), s.q, s.hq.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    }
    const std::vector<bf>&k = s.hk, &v = s.hv, &q = s.hq;
    double num = 0, den = 0;
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < NH; h++) {
            const int kvh = h / (NH / KVH);
            std::vector<double> sc(s.ctx[t]);
            double mx = -1e300;
            for (int p = 0; p < s.ctx[t]; p++) {
                const size_t slot = (size_t)s.htables[(size_t)t * s.max_blocks + p / BS] * BS + p % BS;
                double d = 0;
                for (int e = 0; e < HD; e++)
                    d += (double)__bfloat162float(q[((size_t)t * NH + h) * HD + e]) *
                         __bfloat162float(k[(slot * KVH + kvh) * HD + e]);
                sc[p] = d / std::sqrt((double)HD);
                mx = std::max(mx, sc[p]);
            }
            double z = 0;
            for (double& x : sc) z += (x = std::exp(x - mx));
            for (int e = 0; e < HD; e++) {
                double o = 0;
                for (int p = 0; p < s.ctx[t]; p++) {
                    const size_t slot = (size_t)s.htables[(size_t)t * s.max_blocks + p / BS] * BS + p % BS;
                    o += sc[p] * __bfloat162float(v[(slot * KVH + kvh) * HD + e]);
                }
                o /= z;
                const double g = __bfloat162float(got[((size_t)t * NH + h) * HD + e]);
                num += (g - o) * (g - o);
                den += o * o;
            }
        }
    return std::sqrt(num / std::max(den, 1e-30));
}

static float time_us(const Setup& s, AttnKernel kernel, int partition, int stage_kib, bool tc) {
    return time_runs(0, 21, [&](int it) { launch(s, kernel, partition, it % LAYERS, stage_kib, tc); }).median_ms * 1e3f;
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
    struct Variant {
        const char* name;
        AttnKernel kernel;
        int partition, stage_kib;
        bool tc;
    };
    const Variant variants[] = {
        {"s6 g4 u2 (p128)", attention_batch_g4_u2_bf16, 128, 0},
        {"engine g4 (s7 u4 min4)", attention_batch_g4_bf16, 128, 0},
        {"engine tc (s2, 12 blk)", attention_batch_g4_tc_d128_bf16, 128, 2 * 8, true},
        {"engine tc p256", attention_batch_g4_tc_d128_bf16, 256, 2 * 8, true},
        {"engine tc p64", attention_batch_g4_tc_d128_bf16, 64, 2 * 8, true},
        {"tc s2 min16", tc_s2_min16, 128, 2 * 8, true},
        {"tc s2 min20", tc_s2_min20, 128, 2 * 8, true},
        {"tc s3 min12", tc_s3_min12, 128, 3 * 8, true},
        {"tc s3 min16", tc_s3_min16, 128, 3 * 8, true},
        {"tc s3 min12 p256", tc_s3_min12, 256, 3 * 8, true},
        {"tc s4 min12", tc_s4_min12, 128, 4 * 8, true},
    };
    for (const Variant& v : variants)
        CK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    for (int n : {1000, 256}) {
        Setup s = make(n);
        launch(s, attention_batch_g4_u2_bf16, 128, 0);
        CK(cudaDeviceSynchronize());
        const std::vector<bf> ref = fetch(s);
        printf("rows %d, contexts %d..%d (KV %.0f MB per layer); s6 form vs float64 CPU on 16 rows: rel.L2 %.2e\n", n,
               CTX_LO, CTX_HI, s.kv_bytes / 1e6, check_cpu(s, ref, 16));
        for (const Variant& v : variants) {
            cudaFuncAttributes attr;
            CK(cudaFuncGetAttributes(&attr, v.kernel));
            int blocks = 0;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, v.kernel, v.tc ? 32 : AB_MAX_WARPS * 32,
                                                             v.stage_kib * 1024 + (v.partition / BS + 2) * 4));
            launch(s, v.kernel, v.partition, 0, v.stage_kib, v.tc);
            CK(cudaDeviceSynchronize());
            const std::vector<bf> got = fetch(s);
            const double err = rel_l2(got, ref);
            const float us = time_us(s, v.kernel, v.partition, v.stage_kib, v.tc);
            // Every form once against float64 too (16 rows), not only against the s6 form.
            printf("rows %4d  %-32s %3d regs %d blk/SM %8.1f us  %5.2f TB/s  rel.L2 vs s6 %.1e  vs f64 %.2e\n", n,
                   v.name, attr.numRegs, blocks, us, s.kv_bytes / (us * 1e-6) / 1e12, err, check_cpu(s, got, 16));
        }
    }
    return 0;
}
