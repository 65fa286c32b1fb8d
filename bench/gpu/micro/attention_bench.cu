// Standalone check and timing of decode attention for W1's shape (Qwen3-0.6B: 16 query
// heads, 8 KV heads, head_dim 128, bf16, block size 16): paged_attention_v2_g2 (ops.cu,
// what W1 ran) against attention_batch (attention_batch.cu) at several partitions and rows
// per pass, over a paged cache of 256 sequences with shuffled block tables.
// Build (development machine, no GPU needed):
//   nvcc -O3 -arch=sm_90 -std=c++17 attention_bench.cu -o attention_bench
// Prints per variant: median time of one layer's attention (launches back to back, two
// cache copies alternating so L2 holds neither), the KV bytes read per second, and the
// rel. L2 / max abs difference of its output to paged_attention_v2's.
#include "../../../kernels/ops.cu"
#include "../../../kernels/attention_batch.cu"
#include "../../../kernels/attention_prefill.cu"

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

// Variants of attention_batch beyond the engine's default (g2, U = 4, 6 blocks per SM).
AB_VARIANT(ab_u2, 2, 2, 1, false)
AB_VARIANT(ab_u4_min5, 2, 4, 1, false)
AB_VARIANT(ab_pipe_u2, 2, 2, 1, true)
AB_VARIANT(ab_pipe_u4, 2, 4, 1, true)
AB_VARIANT(ab_pipe_u2_min6, 2, 2, 6, true)

const int NS = 256, NH = 16, KVH = 8, HD = 128, BS = 16, MAX_LEN = 2048, LAYERS = 2;

struct Setup {
    uint32_t *pos, *seq, *tables;
    bf *q, *k[LAYERS], *v[LAYERS];
    float *acc, *ml;
    unsigned int* counts;
    int max_blocks, max_ctx;
    double kv_bytes;
};

static float time_it(const char* name, const Setup& s, bf* out, const std::vector<bf>& ref, int lo, int hi,
                     void (*launch)(const Setup&, bf*, int layer, void* arg), void* arg) {
    launch(s, out, 0, arg);
    CK(cudaDeviceSynchronize());
    std::vector<bf> got((size_t)NS * NH * HD);
    CK(cudaMemcpy(got.data(), out, got.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    double max_abs = 0;
    const double err = ref.empty() ? 0 : rel_l2(got, ref, &max_abs);
    const float med = time_runs(0, 30, [&](int it) { launch(s, out, it % LAYERS, arg); }).median_ms;
    printf("ctx %4d..%4d  %-28s %8.1f us  %6.2f TB/s  rel.L2 %.2e  max|d| %.2e\n", lo, hi, name, med * 1e3,
           s.kv_bytes / (med * 1e-3) / 1e12, err, max_abs);
    return med;
}

static void launch_v2(const Setup& s, bf* out, int layer, void*) {
    const int G = NH / KVH;
    const int floats = G * HD + G * 128 + 3 * G + (G & 1) + 2;
    const int shared = floats * 4 + 128 * 8 + (128 / (HD / 8)) * G * HD * 4;
    paged_attention_v2_g2_bf16<<<dim3(NS, KVH, 1), 128, shared>>>(out, nullptr, nullptr, s.q, s.k[layer], s.v[layer], s.pos,
                                                                   s.seq, s.tables, s.max_blocks, BS, NH, KVH, HD,
                                                                   1.f / sqrtf((float)HD), 0, MAX_LEN, 1, nullptr);
}

struct BatchArg {
    AttnKernel kernel;
    int partition;
};

static void launch_batch(const Setup& s, bf* out, int layer, void* argp) {
    const BatchArg* a = (const BatchArg*)argp;
    const int splits = (MAX_LEN + a->partition - 1) / a->partition;
    const int warps = std::min(KVH, AB_MAX_WARPS);
    const int shared = (a->partition / BS + 2) * 4;
    a->kernel<<<dim3(NS, (KVH + warps - 1) / warps, splits), warps * 32, shared>>>(
        out, s.acc, s.ml, s.q, s.k[layer], s.v[layer], s.pos, s.seq, s.tables, s.max_blocks, BS, NH, KVH, HD,
        1.f / sqrtf((float)HD), 0, a->partition, splits, s.counts);
}

static void run_case(int lo, int hi, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int> ctx(NS);
    for (auto& c : ctx) c = lo + (int)(rng() % (unsigned)(hi - lo));
    Setup s;
    s.max_blocks = MAX_LEN / BS;
    s.max_ctx = *std::max_element(ctx.begin(), ctx.end());
    int total_blocks = 0;
    for (int c : ctx) total_blocks += (c + BS - 1) / BS;
    std::vector<uint32_t> perm(total_blocks);
    std::iota(perm.begin(), perm.end(), 0u);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<uint32_t> tables((size_t)NS * s.max_blocks, 0), pos(NS), seq(NS);
    int next = 0;
    double tokens = 0;
    for (int i = 0; i < NS; i++) {
        for (int b = 0; b < (ctx[i] + BS - 1) / BS; b++) tables[(size_t)i * s.max_blocks + b] = perm[next++];
        pos[i] = ctx[i] - 1;
        seq[i] = i;
        tokens += ctx[i];
    }
    s.kv_bytes = tokens * KVH * HD * 2.0 * sizeof(bf);
    const long long cache = (long long)total_blocks * BS * KVH * HD;
    CK(cudaMalloc(&s.pos, NS * 4));
    CK(cudaMalloc(&s.seq, NS * 4));
    CK(cudaMalloc(&s.tables, tables.size() * 4));
    CK(cudaMemcpy(s.pos, pos.data(), NS * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.seq, seq.data(), NS * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s.tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&s.q, (size_t)NS * NH * HD * sizeof(bf)));
    fill<<<1024, 256>>>(s.q, (long long)NS * NH * HD, seed * 7 + 1, 1.f);
    for (int l = 0; l < LAYERS; l++) {
        CK(cudaMalloc(&s.k[l], cache * sizeof(bf)));
        CK(cudaMalloc(&s.v[l], cache * sizeof(bf)));
        // Keys scaled so the softmax is neither flat nor one-hot.
        fill<<<4096, 256>>>(s.k[l], cache, seed * 13 + l, 2.f);
        fill<<<4096, 256>>>(s.v[l], cache, seed * 17 + l, 1.f);
    }
    const int max_splits = MAX_LEN / 64;
    CK(cudaMalloc(&s.acc, (size_t)NS * NH * max_splits * HD * 4));
    CK(cudaMalloc(&s.ml, (size_t)NS * NH * max_splits * 2 * 4));
    CK(cudaMalloc(&s.counts, NS * KVH * 4));
    CK(cudaMemset(s.counts, 0, NS * KVH * 4));
    bf* out;
    CK(cudaMalloc(&out, (size_t)NS * NH * HD * sizeof(bf)));
    CK(cudaDeviceSynchronize());

    std::vector<bf> ref((size_t)NS * NH * HD);
    launch_v2(s, out, 0, nullptr);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(ref.data(), out, ref.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    printf("-- %d sequences, contexts %d..%d (mean %.0f), KV read per layer %.1f MB\n", NS, lo, hi, tokens / NS,
           s.kv_bytes / 1e6);
    time_it("paged_attention_v2_g2", s, out, ref, lo, hi, launch_v2, nullptr);
    const int parts[] = {64, 128, 256, 2048};
    for (int p : parts) {
        BatchArg a{attention_batch_g2_bf16, p};
        char name[64];
        snprintf(name, sizeof name, "attention_batch U4 P%d", p);
        time_it(name, s, out, ref, lo, hi, launch_batch, &a);
    }
    struct {
        const char* name;
        AttnKernel k;
    } variants[] = {{"pipe U2", ab_pipe_u2},
                    {"U2", ab_u2},
                    {"U4, 96 registers", ab_u4_min5},
                    {"pipe U4", ab_pipe_u4},
                    {"pipe U2 minblocks6", ab_pipe_u2_min6}};
    for (auto& v : variants) {
        for (int p : {128, 256}) {
            BatchArg a{v.k, p};
            char name[64];
            snprintf(name, sizeof name, "attention_batch %s P%d", v.name, p);
            time_it(name, s, out, ref, lo, hi, launch_batch, &a);
        }
    }
    CK(cudaFree(out));
    CK(cudaFree(s.acc));
    CK(cudaFree(s.ml));
    CK(cudaFree(s.counts));
    for (int l = 0; l < LAYERS; l++) {
        CK(cudaFree(s.k[l]));
        CK(cudaFree(s.v[l]));
    }
    CK(cudaFree(s.q));
    CK(cudaFree(s.pos));
    CK(cudaFree(s.seq));
    CK(cudaFree(s.tables));
}


// A prefill step like W1's first chunks: `nseq` sequences, each with `qlen[i]` new tokens at
// the end of a context of `ctx[i]` positions (qlen 1: a decode row mixed in); the whole
// batch's attention by attention_prefill against attention_batch without splits (the
// reference) and with W1's partition 128 (what the engine ran before).
static void run_prefill_case(const char* label, const std::vector<int>& ctx, const std::vector<int>& qlen, int window,
                             unsigned seed) {
    std::mt19937 rng(seed);
    const int nseq = (int)ctx.size();
    const int G = NH / KVH, tpb = AP_WARPS * (16 / G);
    const int max_blocks = MAX_LEN / BS;
    int total_blocks = 0, n = 0;
    for (int i = 0; i < nseq; i++) {
        total_blocks += (ctx[i] + BS - 1) / BS;
        n += qlen[i];
    }
    std::vector<uint32_t> perm(total_blocks);
    std::iota(perm.begin(), perm.end(), 0u);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<uint32_t> tables((size_t)nseq * max_blocks, 0), pos, seq, tiles;
    int next = 0;
    double pairs = 0;
    for (int i = 0; i < nseq; i++) {
        for (int b = 0; b < (ctx[i] + BS - 1) / BS; b++) tables[(size_t)i * max_blocks + b] = perm[next++];
        const int first_tok = (int)pos.size();
        for (int j = 0; j < qlen[i]; j++) {
            const int p = ctx[i] - qlen[i] + j;
            pos.push_back(p);
            seq.push_back(i);
            pairs += window > 0 ? std::min(p + 1, window) : p + 1;
        }
        for (int j = 0; j < qlen[i]; j += tpb) {
            tiles.push_back(first_tok + j);
            tiles.push_back(std::min(tpb, qlen[i] - j));
        }
    }
    const int ntiles = (int)tiles.size() / 2;
    const long long cache = (long long)total_blocks * BS * KVH * HD;
    uint32_t *d_pos, *d_seq, *d_tables, *d_tiles;
    CK(cudaMalloc(&d_pos, n * 4));
    CK(cudaMalloc(&d_seq, n * 4));
    CK(cudaMalloc(&d_tables, tables.size() * 4));
    CK(cudaMalloc(&d_tiles, tiles.size() * 4));
    CK(cudaMemcpy(d_pos, pos.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_seq, seq.data(), n * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * 4, cudaMemcpyHostToDevice));
    bf *q, *k, *v, *out;
    CK(cudaMalloc(&q, (size_t)n * NH * HD * sizeof(bf)));
    CK(cudaMalloc(&k, cache * sizeof(bf)));
    CK(cudaMalloc(&v, cache * sizeof(bf)));
    CK(cudaMalloc(&out, (size_t)n * NH * HD * sizeof(bf)));
    fill<<<1024, 256>>>(q, (long long)n * NH * HD, seed * 7 + 1, 1.f);
    fill<<<4096, 256>>>(k, cache, seed * 13, 2.f);
    fill<<<4096, 256>>>(v, cache, seed * 17, 1.f);
    const int P = 128, splits = MAX_LEN / P;
    float *acc, *ml;
    unsigned int* counts;
    CK(cudaMalloc(&acc, (size_t)n * NH * splits * HD * 4));
    CK(cudaMalloc(&ml, (size_t)n * NH * splits * 2 * 4));
    CK(cudaMalloc(&counts, (size_t)n * KVH * 4));
    CK(cudaMemset(counts, 0, (size_t)n * KVH * 4));
    const float scale = 1.f / sqrtf((float)HD);
    const int warps = std::min(KVH, AB_MAX_WARPS);
    auto batch = [&](int part) {
        const int sp = (MAX_LEN + part - 1) / part;
        attention_batch_g2_bf16<<<dim3(n, (KVH + warps - 1) / warps, sp), warps * 32, (part / BS + 2) * 4>>>(
            out, acc, ml, q, k, v, d_pos, d_seq, d_tables, max_blocks, BS, NH, KVH, HD, scale, window, part, sp, counts);
    };
    auto prefill = [&]() {
        attention_prefill_d128_bf16<<<dim3(ntiles, KVH), AP_WARPS * 32>>>(out, q, k, v, d_pos, d_seq, d_tables,
                                                                         max_blocks, BS, NH, KVH, scale, window,
                                                                         d_tiles);
    };
    std::vector<bf> ref((size_t)n * NH * HD), got(ref.size());
    batch(MAX_LEN);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(ref.data(), out, ref.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    CK(cudaMemset(out, 0xff, ref.size() * sizeof(bf)));  // NaN: every element must be written
    prefill();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(got.data(), out, got.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    double max_abs = 0;
    const double err = rel_l2(got, ref, &max_abs);
    auto time = [&](auto&& f) { return time_runs(0, 11, [&](int) { f(); }).median_ms * 1e3f; };
    const float t_batch = time([&] { batch(P); });
    const float t_prefill = time(prefill);
    const double flops = pairs * NH * HD * 4.0;
    printf("prefill %-34s %5d tokens %4d tiles window %4d: attention_batch P%d %8.1f us, attention_prefill %7.1f us "
           "(%.0f TFLOP/s)  rel.L2 %.2e  max|d| %.2e %s\n",
           label, n, ntiles, window, P, t_batch, t_prefill, flops / (t_prefill * 1e-6) / 1e12, err, max_abs,
           err < 2e-2 && err == err ? "OK" : "FAIL");
    CK(cudaFree(acc));
    CK(cudaFree(ml));
    CK(cudaFree(counts));
    CK(cudaFree(q));
    CK(cudaFree(k));
    CK(cudaFree(v));
    CK(cudaFree(out));
    CK(cudaFree(d_pos));
    CK(cudaFree(d_seq));
    CK(cudaFree(d_tables));
    CK(cudaFree(d_tiles));
}

static void prefill_cases() {
    std::mt19937 rng(5);
    // W1's first chunk: whole prompts of 100..1024 tokens up to 8,192 tokens.
    std::vector<int> ctx, qlen;
    int n = 0;
    while (n < 8192) {
        int c = 100 + (int)(rng() % 925u);
        c = std::min(c, 8192 - n);
        ctx.push_back(c);
        qlen.push_back(c);
        n += c;
    }
    run_prefill_case("whole prompts (W1 chunk)", ctx, qlen, 0, 11);
    // A later chunk: 128 decode rows of contexts 100..1100, one prompt's tail (its first
    // 300 positions cached by an earlier chunk), then whole prompts.
    ctx.clear();
    qlen.clear();
    n = 0;
    for (int i = 0; i < 128; i++) {
        ctx.push_back(100 + (int)(rng() % 1000u));
        qlen.push_back(1);
        n++;
    }
    ctx.push_back(900);
    qlen.push_back(600);
    n += 600;
    while (n < 8192) {
        int c = 100 + (int)(rng() % 925u);
        c = std::min(c, 8192 - n);
        ctx.push_back(c);
        qlen.push_back(c);
        n += c;
    }
    run_prefill_case("mixed: 128 decode rows + chunks", ctx, qlen, 0, 12);
    run_prefill_case("mixed, sliding window 300", ctx, qlen, 300, 13);
    // Short odd tiles: prompts of 1..40 tokens.
    ctx.clear();
    qlen.clear();
    for (int i = 0; i < 64; i++) {
        const int c = 1 + (int)(rng() % 40u);
        ctx.push_back(c + 7);
        qlen.push_back(c);
    }
    run_prefill_case("short chunks 1..40 after 7 cached", ctx, qlen, 0, 14);
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
    struct {
        const char* name;
        const void* f;
    } fns[] = {{"paged_attention_v2_g2", (const void*)paged_attention_v2_g2_bf16},
               {"attention_batch (engine)", (const void*)attention_batch_g2_bf16},
               {"pipe U2", (const void*)ab_pipe_u2},
               {"U2", (const void*)ab_u2},
               {"U4, 96 registers", (const void*)ab_u4_min5},
               {"pipe U4", (const void*)ab_pipe_u4},
               {"pipe U2 minblocks6", (const void*)ab_pipe_u2_min6}};
    for (auto& f : fns) {
        cudaFuncAttributes at;
        CK(cudaFuncGetAttributes(&at, f.f));
        int blocks = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, f.f, 128, 4096));
        printf("%-24s %3d registers, %d blocks of 128 per SM\n", f.name, at.numRegs, blocks);
    }
    // A copy at the card's rate, for scale.
    {
        const size_t n = 1ull << 30;
        char *a, *b;
        CK(cudaMalloc(&a, n));
        CK(cudaMalloc(&b, n));
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e0));
        for (int i = 0; i < 5; i++) CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        printf("device copy: %.2f TB/s (read + write)\n", 5.0 * 2 * n / (ms * 1e-3) / 1e12);
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    prefill_cases();
    if (getenv("PREFILL_ONLY")) return 0;
    run_case(100, 1100, 1);  // W1's mid-run mix (mean ~600, ~590 MB per layer)
    run_case(100, 2048, 2);  // longer contexts
    run_case(100, 300, 3);   // short
    return 0;
}
