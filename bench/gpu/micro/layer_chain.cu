// Issue 7, session 19: W3's 24 layers as the decode graph runs them at one row, attention
// included: qkv (gemv_staged, norm), decode_attention_heads (kernels/decode_heads.cu, one
// sequence at position P, its context in the paged cache), o (+ residual), gate_up (norm,
// SiLU), down (+ residual), every launch programmatic (PDL) in one CUDA graph. The
// gemv_staged micro has no attention; the engine measures only whole steps.
// Prints the chain's µs a layer for each attention form: none (o reads a stale output),
// the stub (a copy of the query), and the heads kernel with its context cut in 1, 2, 4 or 8
// ranges (s1..s8: the tensor-core kernels the engine takes for head_dim 64; g1 / g4: the
// kernels for any head_dim). With -DSTG_STAMPS, layers 12 and 13 of one chain stamp
// %globaltimer in every block of every kernel (stamps.cuh; the attention's points are
// DH_STAMP's), for the form LAYER_ATT names (default s4).
// Build (development machine): nvcc -O3 -arch=sm_90 -std=c++17 layer_chain.cu -o layer_chain
// Run: layer_chain [P] (default 383, W3's mean context).
#ifdef STG_STAMPS
#include "stamps.cuh"

#define DH_POINTS 9
#define DH_BLOCKS 128
__device__ unsigned long long g_att_stamps[2][DH_BLOCKS][DH_POINTS];
__constant__ const char* g_att_lo;
__constant__ size_t g_att_layer;

// As stamp_at: points to thread 0's shared memory, all written out at the end.
__device__ __forceinline__ void att_stamp(const void* k_cache, int point) {
    __shared__ unsigned long long at[DH_POINTS];
    const char* p = static_cast<const char*>(k_cache);
    if (p < g_att_lo || p >= g_att_lo + 2 * g_att_layer || threadIdx.x != 0) return;
    if (point == 0)
        for (int k = 1; k < DH_POINTS; k++) at[k] = 0;  // points a form skips stay unset
    at[point] = stamp_now();
    if (point < DH_POINTS - 1) return;
    const int block = blockIdx.y * gridDim.z + blockIdx.z;
    for (int k = 0; k < DH_POINTS; k++) g_att_stamps[(p - g_att_lo) / g_att_layer][block][k] = at[k];
}
#define DH_STAMP(point) att_stamp(k_cache, point)
#endif
#include "../../../kernels/decode_heads.cu"
#include "../../../kernels/gemv_staged.cu"
#include "../../../kernels/ops.cu"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "check.cuh"
#include "device_compare.cuh"
#include "fill.cuh"
#include "pdl_launch.cuh"
#include "staged_launch.cuh"
#include "timing.cuh"

typedef __nv_bfloat16 bf;

static const int HID = 896, QKV = 1152, INTER = 4864, L = 24;
static const int HEADS = 14, KV_HEADS = 2, HD = 64, BLOCK_SIZE = 16, MAX_BLOCKS = 64;
// Must match DH_WHOLE_TABLE and backend/cuda/decode_heads.rs's SHARED_LIMIT.
static const int WHOLE_TABLE = 1 << 30, SHARED_LIMIT = 200 * 1024;

// backend/cuda/decode_heads.rs's plan for bf16, the whole table staged: (cap, bytes).
static void plan(int split, int& cap, int& bytes) {
    const int max_context = (MAX_BLOCKS * BLOCK_SIZE + split - 1) / split;
    auto bytes_for = [split](int c) {
        return 2 * c * HD * 2 + 4 * (HD + 3 * HD + c + std::max(8 * 8, HD) + 20 + DH_RECV(split, HD)) + 2 * HD * 2 +
               4 * std::max(c / BLOCK_SIZE + 2, MAX_BLOCKS);
    };
    cap = (std::min(max_context, 1024) + 3) / 4 * 4;
    while (cap > 4 && bytes_for(cap) > SHARED_LIMIT) cap -= 4;
    bytes = bytes_for(cap);
}

struct Attention {
    bf *out, *qkv, *bias, *k_cache, *v_cache;
    float *cos_t, *sin_t;
    uint32_t *positions, *token_seq, *table;
};

typedef void (*AttKernel)(bf*, const bf*, const bf*, const bf*, const bf*, const float*, const float*, const uint32_t*,
                          const uint32_t*, const uint32_t*, int, int, bf*, bf*, int, int, int, float, int, float, int);

// form: "stub"; "s1", "s2", "s4", "s8" (context ranges a head; the tensor-core kernels for
// W3's 8 chunks a row, as the engine takes them); "g1", "g4" (the kernels for any head_dim).
static void attention(const std::string& form, const Attention& a, size_t layer_elems, int l) {
    const bool stub = form == "stub", any = form[0] == 'g';
    const int split = stub ? 1 : atoi(form.c_str() + 1);
    AttKernel k = stub          ? decode_attention_stub_bf16
                  : any         ? (split == 1 ? decode_attention_heads_bf16 : decode_attention_heads_s4_bf16)
                  : split == 1 ? decode_attention_heads_c8_bf16
                  : split == 2 ? decode_attention_heads_s2_c8_bf16
                  : split == 4 ? decode_attention_heads_s4_c8_bf16
                               : decode_attention_heads_s8_c8_bf16;
    int cap, bytes;
    plan(split, cap, bytes);
    static bool set[2][9];
    if (!set[any][split]) {
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED_LIMIT));
        set[any][split] = true;
    }
    launch_pdl(k, dim3(1, HEADS, split), stub ? 64 : DH_THREADS, stub ? 0 : bytes, a.out, a.qkv,
               a.bias + (size_t)l * QKV, (const bf*)nullptr, (const bf*)nullptr, a.cos_t, a.sin_t, a.positions,
               a.token_seq, a.table, MAX_BLOCKS, BLOCK_SIZE, a.k_cache + layer_elems * l, a.v_cache + layer_elems * l,
               HEADS, KV_HEADS, HD, 0.125f, 0, 1e-6f, cap | WHOLE_TABLE);
}

int main(int argc, char** argv) {
    const int P = argc > 1 ? atoi(argv[1]) : 383;
    CK(cudaStreamCreate(&st));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t per_layer = (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID + (size_t)HID * INTER;
    bf* wts;
    CK(cudaMalloc(&wts, per_layer * L * 2));
    fill<<<4096, 256, 0, st>>>(wts, per_layer * L, 7, 0.05f);
    auto W = [&](int l, int which) -> bf* {
        const size_t o[4] = {0, (size_t)QKV * HID, (size_t)QKV * HID + (size_t)HID * HID,
                             (size_t)QKV * HID + (size_t)HID * HID + 2ull * INTER * HID};
        return wts + per_layer * l + o[which];
    };
    // The paged cache: MAX_BLOCKS blocks of BLOCK_SIZE rows a layer, the block table the
    // identity, one sequence at position P.
    const size_t cache_elems = (size_t)MAX_BLOCKS * BLOCK_SIZE * KV_HEADS * HD;
    Attention a{};
    CK(cudaMalloc(&a.out, HEADS * HD * 2));
    CK(cudaMalloc(&a.qkv, QKV * 2));
    CK(cudaMalloc(&a.bias, (size_t)L * QKV * 2));
    CK(cudaMalloc(&a.k_cache, cache_elems * L * 2));
    CK(cudaMalloc(&a.v_cache, cache_elems * L * 2));
    CK(cudaMalloc(&a.cos_t, MAX_BLOCKS * BLOCK_SIZE * HD / 2 * 4));
    CK(cudaMalloc(&a.sin_t, MAX_BLOCKS * BLOCK_SIZE * HD / 2 * 4));
    CK(cudaMalloc(&a.positions, 4));
    CK(cudaMalloc(&a.token_seq, 4));
    CK(cudaMalloc(&a.table, MAX_BLOCKS * 4));
    fill<<<64, 256, 0, st>>>(a.bias, (size_t)L * QKV, 3, 0.5f);
    fill<<<4096, 256, 0, st>>>(a.k_cache, cache_elems * L, 5, 1.f);
    fill<<<4096, 256, 0, st>>>(a.v_cache, cache_elems * L, 9, 1.f);
    fill<<<64, 256, 0, st>>>(a.cos_t, MAX_BLOCKS * BLOCK_SIZE * HD / 2, 21, 1.f);
    fill<<<64, 256, 0, st>>>(a.sin_t, MAX_BLOCKS * BLOCK_SIZE * HD / 2, 25, 1.f);
    uint32_t table[MAX_BLOCKS], zero = 0, pos = P;
    for (int i = 0; i < MAX_BLOCKS; i++) table[i] = i;
    CK(cudaMemcpy(a.table, table, sizeof table, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(a.positions, &pos, 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(a.token_seq, &zero, 4, cudaMemcpyHostToDevice));
    bf *act, *nw, *out2;
    float *h, *h0;
    CK(cudaMalloc(&act, INTER * 2));
    CK(cudaMalloc(&nw, HID * 2));
    CK(cudaMalloc(&out2, HEADS * HD * 2));
    CK(cudaMalloc(&h, HID * 4));
    CK(cudaMalloc(&h0, HID * 4));
    fill<<<64, 256, 0, st>>>(h0, HID, 17, 2.f);
    fill<<<64, 256, 0, st>>>(nw, HID, 13, 1.f);
    fill<<<64, 256, 0, st>>>(a.qkv, QKV, 19, 1.f);
#ifdef STG_STAMPS
    stamps_setup(wts + per_layer * 12, per_layer * 2);
    const char* lo = reinterpret_cast<const char*>(a.k_cache + cache_elems * 12);
    const size_t layer_bytes = cache_elems * 2;
    CK(cudaMemcpyToSymbol(g_att_lo, &lo, sizeof lo));
    CK(cudaMemcpyToSymbol(g_att_layer, &layer_bytes, sizeof layer_bytes));
#endif

    // Check: every split gives s1's output from the same qkv row (softmax pieces merged in
    // another order).
    bool ok = true;
    attention("s1", a, cache_elems, 0);
    CK(cudaMemcpyAsync(out2, a.out, HEADS * HD * 2, cudaMemcpyDeviceToDevice, st));
    for (const char* f : {"s2", "s4", "s8", "g1", "g4"}) {
        attention(f, a, cache_elems, 0);
        CK(cudaStreamSynchronize(st));
        const double e = rel(a.out, out2, HEADS * HD);
        printf("check %s against s1 at position %d: relative L2 %.2e\n", f, P, e);
        ok = ok && e < 1e-2;
    }

    auto chain = [&](const std::string& form) {
        for (int l = 0; l < L; l++) {
            staged(a.qkv, h, W(l, 0), nw, QKV, HID, GEMV_STORE);
            if (form != "none") attention(form, a, cache_elems, l);
            staged(h, a.out, W(l, 1), nullptr, HID, HID, GEMV_ADD);
            staged(act, h, W(l, 2), nw, INTER, HID, GEMV_SILU);
            staged(h, act, W(l, 3), nullptr, HID, INTER, GEMV_ADD);
        }
    };
    printf("chain of 24 layers at position %d (%d SMs), us a layer, median of 30 graph replays:\n", P, sms);
    for (const char* f : {"none", "stub", "g1", "g4", "s1", "s2", "s4", "s8", "g1", "s1", "g4", "s4"}) {
        CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
        const float ms = time_graph(st, [&] { chain(f); });
        printf("  attention %-4s %6.2f\n", f, ms * 1e3f / L);
    }
#ifdef STG_STAMPS
    const char* form = getenv("LAYER_ATT") ? getenv("LAYER_ATT") : "s4";
    CK(cudaMemcpyAsync(h, h0, HID * 4, cudaMemcpyDeviceToDevice, st));
    for (const void* sym : {(const void*)&g_stamps, (const void*)&g_att_stamps}) {
        void* at;
        size_t bytes;
        CK(cudaGetSymbolAddress(&at, sym));
        CK(cudaGetSymbolSize(&bytes, sym));
        CK(cudaMemsetAsync(at, 0, bytes, st));
    }
    time_graph(st, [&] { chain(form); }, 3);
    printf("attention %s:\n", form);
    const unsigned long long t0 = stamps_print();
    static unsigned long long s[2][DH_BLOCKS][DH_POINTS];
    CK(cudaMemcpyFromSymbol(s, g_att_stamps, sizeof s));
    const char* points[DH_POINTS] = {"start", "issued", "wait", "qkv", "kv in", "exp", "values", "merge", "end"};
    // A split's rank 0 (it merges) apart from the others (they push): block y * split + z.
    const int split = form[1] == 't' ? 1 : atoi(form + 1);
    static unsigned long long rank[2][DH_BLOCKS][DH_POINTS];
    for (int l = 0; l < 2; l++) {
        int n[2] = {0, 0};
        for (int b = 0; b < DH_BLOCKS; b++) {
            const int r = split > 1 && b % split != 0;
            memcpy(rank[r][n[r]++], s[l][b], sizeof s[l][b]);
        }
        const char* name = l ? "L13 attn" : "L12 attn";
        if (split == 1) stamps_row(name, &rank[0][0][0], n[0], DH_POINTS, points, t0);
        for (int r = 0; split > 1 && r < 2; r++)
            stamps_row(r ? "  others" : name, &rank[r][0][0], n[r], DH_POINTS, points, t0);
    }
#endif
    printf("layer_chain: %s\n", ok ? "all checks PASS" : "some check FAILED");
    return ok ? 0 : 1;
}
