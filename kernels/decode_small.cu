// Decode attention for small batches (issue 7, W3): one thread-block cluster of DS_CLUSTER
// blocks per (sequence, KV head) does what qkv_prepare and paged_attention did in two
// launches, with no split counter, no partial buffers in global memory and no second pass:
//   1. the token's position and block-table entries are read, and every thread requests
//      its first DS_PREFETCH key AND value rows of the cached context (positions < pos)
//      before anything else, so the cache's DRAM latency overlaps the prologue (and, with
//      programmatic dependent launch, the previous kernel's end);
//   2. the prologue (qkv_prepare for this KV head: bias, Qwen3 q/k RMSNorm, rotary) builds
//      the group's queries in each block's shared memory; block 0 of the cluster writes the
//      token's key and value into the cache; the current position's key / value are taken
//      from shared memory;
//   3. the context's rows are spread over the cluster's blocks (so over DS_CLUSTER SMs: one
//      SM alone is issue-bound on the softmax arithmetic); each row group (head_dim / VEC
//      neighbouring lanes, 16-byte loads) keeps an online softmax, rescaled once per round
//      of DS_PREFETCH rows; row groups merge with shuffles, warps through shared memory,
//      blocks through distributed shared memory into block 0, which writes the output.
// Only for decode (one query token per sequence in the launch): another token of the same
// sequence would need this token's key, which another cluster writes.
// Rounding as qkv_prepare + paged_attention_v2 (q and k rounded to T after rotary, scores,
// softmax and sums in float32, the output rounded to T); exponentials in base 2 (the
// queries carry log2(e)), which leaves the normalised weights unchanged.

#include <cooperative_groups.h>

#include "common.cuh"
#include "pdl.cuh"

#define DS_THREADS 256
#define DS_WARPS (DS_THREADS / 32)
// Blocks per (sequence, KV head): a portable cluster size.
#define DS_CLUSTER 8
// Key and value rows each thread requests before using the first.
#define DS_PREFETCH 4
// Bias values and rotary (cos, sin) pairs each thread requests before pdl_wait (they do not
// depend on the previous kernel); the rest, if any, are read after it.
#define DS_EARLY_BIAS 3
#define DS_EARLY_ROT 2

namespace cg = cooperative_groups;

__device__ __forceinline__ long long ds_slot(const uint32_t* block_tables, int seq, int max_blocks, int block_size,
                                             int pos) {
    return (long long)block_tables[(long long)seq * max_blocks + pos / block_size] * block_size + pos % block_size;
}

// Shared memory (floats unless said): qs [G * hd] (queries, rounded to T, times scale and
// log2(e)), cur [2 * hd] T (this token's key then value, rounded to T; 16-byte aligned),
// block [G * hd + 2 * G] (this block's merged output and (max, sum) per head, read by block
// 0 of the cluster), then a scratch region used first for the qkv row [(G + 2) * hd] and at
// the end for the warps' partial outputs [DS_WARPS, G, hd] and statistics [DS_WARPS, G, 2].
template <typename T, int G>
__device__ void decode_attention_small(T* out, const T* qkv, const T* bias, const T* q_norm, const T* k_norm,
                                       const float* cos_table, const float* sin_table, const uint32_t* positions,
                                       const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,
                                       int block_size, T* k_cache, T* v_cache, int num_heads, int num_kv_heads,
                                       int head_dim, float scale, int window, float eps, int early) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ uint4 ds_smem[];
    cg::cluster_group cluster = cg::this_cluster();
    const int t = blockIdx.x, kv_head = blockIdx.y;
    const int rank = (int)cluster.block_rank();
    const int hd = head_dim;
    const int chunks = hd / VEC;            // lanes per row, a power of two <= 32
    const int rows_per_warp = 32 / chunks;  // rows a warp covers per pass
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % chunks, row = lane / chunks;
    float* qs = reinterpret_cast<float*>(ds_smem);
    T* cur = reinterpret_cast<T*>(qs + G * hd);  // G * hd * 4 bytes: 16-byte aligned
    float* block = reinterpret_cast<float*>(cur + 2 * hd);
    float* scratch = block + G * hd + 2 * G;

    const int pos = positions[t];
    const int seq = token_seq[t];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const long long kv_stride = (long long)num_kv_heads * hd;
    const long long head_off = (long long)kv_head * hd + sub * VEC;
    // Row j of a round at `base`: one pass of a block is DS_WARPS * rows_per_warp rows, the
    // cluster's blocks take consecutive passes.
    const int rows_per_pass = DS_WARPS * rows_per_warp;
    const int rows_per_round = DS_PREFETCH * DS_CLUSTER * rows_per_pass;
    auto position = [&](int base, int j) {
        return base + (j * DS_CLUSTER + rank) * rows_per_pass + warp * rows_per_warp + row;
    };

    uint4 kraw[DS_PREFETCH], vraw[DS_PREFETCH];
    auto request = [&](int base) {
#pragma unroll
        for (int j = 0; j < DS_PREFETCH; j++) {
            const int p = position(base, j);
            if (p < pos) {
                const long long off = ds_slot(block_tables, seq, max_blocks, block_size, p) * kv_stride + head_off;
                kraw[j] = __ldcg(reinterpret_cast<const uint4*>(k_cache + off));
                vraw[j] = __ldcg(reinterpret_cast<const uint4*>(v_cache + off));
            } else {
                kraw[j] = make_uint4(0, 0, 0, 0);
                vraw[j] = make_uint4(0, 0, 0, 0);
            }
        }
    };
    // This KV head's columns of the qkv row: G query heads, its key, its value.
    const int pro = (G + 2) * hd;
    auto column = [&](int i) {
        const int part = i / hd, d = i % hd;
        return part < G ? (kv_head * G + part) * hd + d
                        : (part == G ? (num_heads + kv_head) * hd + d : (num_heads + num_kv_heads + kv_head) * hd + d);
    };
    const int half = hd / 2;
    const int rot = (G + 1) * half;
    // The bias and this position's rotary rows: requested before pdl_wait when `early`
    // (so their latency hides under the previous kernel), after it otherwise (to compare).
    float bias_early[DS_EARLY_BIAS], cos_early[DS_EARLY_ROT], sin_early[DS_EARLY_ROT];
    auto fetch_early = [&]() {
#pragma unroll
        for (int k = 0; k < DS_EARLY_BIAS; k++) {
            const int i = threadIdx.x + k * DS_THREADS;
            bias_early[k] = (bias && i < pro) ? to_f(bias[column(i)]) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < DS_EARLY_ROT; k++) {
            const int i = threadIdx.x + k * DS_THREADS;
            const long long at = (long long)pos * half + i % half;
            cos_early[k] = i < rot ? cos_table[at] : 0.f;
            sin_early[k] = i < rot ? sin_table[at] : 0.f;
        }
    };
    if (early) fetch_early();
    request(first);
    // The cache rows above were written by earlier steps; the qkv row is the previous
    // kernel's output (programmatic dependent launch, pdl.cuh).
    pdl_launch_dependents();
    pdl_wait();
    if (!early) fetch_early();

    // Prologue: the qkv slice (bias added in float32).
    const int width = (num_heads + 2 * num_kv_heads) * hd;
    const T* src = qkv + (long long)t * width;
#pragma unroll
    for (int k = 0; k < DS_EARLY_BIAS; k++) {
        const int i = threadIdx.x + k * DS_THREADS;
        if (i < pro) {
            const float v = to_f(src[column(i)]);
            scratch[i] = bias ? v + bias_early[k] : v;
        }
    }
    for (int i = threadIdx.x + DS_EARLY_BIAS * DS_THREADS; i < pro; i += DS_THREADS) {
        const int col = column(i);
        float v = to_f(src[col]);
        if (bias) v += to_f(bias[col]);
        scratch[i] = v;
    }
    __syncthreads();
    if (q_norm) {
        for (int h = warp; h < G + 1; h += DS_WARPS) {
            float* x = scratch + h * hd;
            float ss = 0.f;
            for (int j = lane; j < hd; j += 32) ss += x[j] * x[j];
            const float inv = rsqrtf(warp_sum(ss) / hd + eps);
            const T* w = h < G ? q_norm : k_norm;
            for (int j = lane; j < hd; j += 32) x[j] = to_f(w[j]) * (x[j] * inv);
        }
        __syncthreads();
    }
    const bool writer = rank == 0;
    const long long kv_base = ds_slot(block_tables, seq, max_blocks, block_size, pos) * kv_stride + (long long)kv_head * hd;
    const float qscale = scale * LOG2E;
    auto rotate = [&](int i, float c, float s) {
        const int h = i / half, j = i % half;
        const float a = scratch[h * hd + j], b = scratch[h * hd + j + half];
        const T ra = from_f<T>(a * c - b * s);
        const T rb = from_f<T>(b * c + a * s);
        if (h < G) {
            qs[h * hd + j] = to_f(ra) * qscale;
            qs[h * hd + j + half] = to_f(rb) * qscale;
        } else {
            cur[j] = ra;
            cur[j + half] = rb;
            if (writer) {
                k_cache[kv_base + j] = ra;
                k_cache[kv_base + j + half] = rb;
            }
        }
    };
#pragma unroll
    for (int k = 0; k < DS_EARLY_ROT; k++) {
        const int i = threadIdx.x + k * DS_THREADS;
        if (i < rot) rotate(i, cos_early[k], sin_early[k]);
    }
    for (int i = threadIdx.x + DS_EARLY_ROT * DS_THREADS; i < rot; i += DS_THREADS) {
        const long long at = (long long)pos * half + i % half;
        rotate(i, cos_table[at], sin_table[at]);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const T v = from_f<T>(scratch[(G + 1) * hd + d]);
        cur[hd + d] = v;
        if (writer) v_cache[kv_base + d] = v;
    }
    __syncthreads();

    // Online softmax per row group (every lane of a group holds the same statistics), in
    // base 2, rescaled once per round.
    float m[G], l[G], acc[G][VEC];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[g][e] = 0.f;
    }
    for (int base = first;;) {
        float s[DS_PREFETCH][G];
#pragma unroll
        for (int j = 0; j < DS_PREFETCH; j++) {
            const int p = position(base, j);
            if (p == pos) {
                kraw[j] = reinterpret_cast<const uint4*>(cur)[sub];
                vraw[j] = reinterpret_cast<const uint4*>(cur + hd)[sub];
            }
            const T* kv = reinterpret_cast<const T*>(&kraw[j]);
            float kf[VEC];
#pragma unroll
            for (int e = 0; e < VEC; e++) kf[e] = to_f(kv[e]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float4* qg = reinterpret_cast<const float4*>(qs + g * hd + sub * VEC);
                float d = 0.f;
#pragma unroll
                for (int e4 = 0; e4 < VEC / 4; e4++) {
                    const float4 q4 = qg[e4];
                    d += q4.x * kf[4 * e4] + q4.y * kf[4 * e4 + 1] + q4.z * kf[4 * e4 + 2] + q4.w * kf[4 * e4 + 3];
                }
                s[j][g] = d;
            }
        }
        // Whole warps shuffle; the lanes of a row are neighbours.
        for (int o = chunks >> 1; o > 0; o >>= 1) {
#pragma unroll
            for (int j = 0; j < DS_PREFETCH; j++)
#pragma unroll
                for (int g = 0; g < G; g++) s[j][g] += __shfl_xor_sync(0xffffffffu, s[j][g], o);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = m[g];
#pragma unroll
            for (int j = 0; j < DS_PREFETCH; j++)
                if (position(base, j) <= pos) mx = fmaxf(mx, s[j][g]);
            if (mx == -INFINITY) continue;  // no row of this round (uniform over the row group)
            const float c = exp2f(m[g] - mx);  // 0 while m is -inf
            l[g] *= c;
#pragma unroll
            for (int x = 0; x < VEC; x++) acc[g][x] *= c;
#pragma unroll
            for (int j = 0; j < DS_PREFETCH; j++) {
                if (position(base, j) <= pos) {
                    const float e = exp2f(s[j][g] - mx);
                    const T* vv = reinterpret_cast<const T*>(&vraw[j]);
                    l[g] += e;
#pragma unroll
                    for (int x = 0; x < VEC; x++) acc[g][x] += e * to_f(vv[x]);
                }
            }
            m[g] = mx;
        }
        base += rows_per_round;
        if (base > pos) break;
        request(base);
    }

    // Merge the row groups of a warp (lanes `chunks` apart), then the warps.
    for (int o = chunks; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float mm = fmaxf(m[g], mo);
            const float a = m[g] == -INFINITY ? 0.f : exp2f(m[g] - mm);
            const float b = mo == -INFINITY ? 0.f : exp2f(mo - mm);
            l[g] = l[g] * a + lo * b;
#pragma unroll
            for (int x = 0; x < VEC; x++) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[g][x], o);
                acc[g][x] = acc[g][x] * a + ao * b;
            }
            m[g] = mm;
        }
    }
    float* part = scratch;                    // [DS_WARPS, G, hd]
    float* stats = part + DS_WARPS * G * hd;  // [DS_WARPS, G, 2]
    __syncthreads();  // the prologue's row is no longer read
    if (row == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
#pragma unroll
            for (int x = 0; x < VEC; x++) part[(warp * G + g) * hd + sub * VEC + x] = acc[g][x];
            if (sub == 0) {
                stats[(warp * G + g) * 2] = m[g];
                stats[(warp * G + g) * 2 + 1] = l[g];
            }
        }
    }
    __syncthreads();
    // This block's (max, sum) per head, then its output, into `block`.
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float mm = -INFINITY;
        for (int w = 0; w < DS_WARPS; w++) mm = fmaxf(mm, stats[(w * G + g) * 2]);
        float lsum = 0.f;
        for (int w = 0; w < DS_WARPS; w++) {
            const float mw = stats[(w * G + g) * 2];
            if (mw != -INFINITY) lsum += stats[(w * G + g) * 2 + 1] * exp2f(mw - mm);
        }
        block[G * hd + 2 * g] = mm;
        block[G * hd + 2 * g + 1] = lsum;
    }
    for (int o = threadIdx.x; o < G * hd; o += blockDim.x) {
        const int g = o / hd;
        float mm = -INFINITY;
#pragma unroll
        for (int w = 0; w < DS_WARPS; w++) mm = fmaxf(mm, stats[(w * G + g) * 2]);
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < DS_WARPS; w++) {
            const float mw = stats[(w * G + g) * 2];
            if (mw != -INFINITY) a += part[(w * G + g) * hd + o % hd] * exp2f(mw - mm);
        }
        block[o] = a;
    }
    // Block 0 combines the cluster's blocks from their shared memory; the second barrier
    // keeps every block (and its shared memory) alive until block 0 has read it.
    cluster.sync();
    if (rank == 0) {
        const long long q_base = ((long long)t * num_heads + (long long)kv_head * G) * hd;
        for (int o = threadIdx.x; o < G * hd; o += blockDim.x) {
            const int g = o / hd;
            float ms[DS_CLUSTER], ls[DS_CLUSTER], as[DS_CLUSTER];
#pragma unroll
            for (int r = 0; r < DS_CLUSTER; r++) {
                const float* remote = cluster.map_shared_rank(block, r);
                ms[r] = remote[G * hd + 2 * g];
                ls[r] = remote[G * hd + 2 * g + 1];
                as[r] = remote[o];
            }
            float mm = -INFINITY;
#pragma unroll
            for (int r = 0; r < DS_CLUSTER; r++) mm = fmaxf(mm, ms[r]);
            float lsum = 0.f, a = 0.f;
#pragma unroll
            for (int r = 0; r < DS_CLUSTER; r++) {
                if (ms[r] != -INFINITY) {
                    const float f = exp2f(ms[r] - mm);
                    lsum += ls[r] * f;
                    a += as[r] * f;
                }
            }
            out[q_base + o] = from_f<T>(lsum > 0.f ? a / lsum : 0.f);
        }
    }
    cluster.sync();
}

#define INSTANTIATE_DS(SUFFIX, T, G)                                                                                    \
    extern "C" __global__ void __cluster_dims__(1, 1, DS_CLUSTER) __launch_bounds__(DS_THREADS)                        \
        decode_attention_small_g##G##_##SUFFIX(                                                                         \
            T* out, const T* qkv, const T* bias, const T* q_norm, const T* k_norm, const float* cos_table,             \
            const float* sin_table, const uint32_t* positions, const uint32_t* token_seq,                              \
            const uint32_t* block_tables, int max_blocks, int block_size, T* k_cache, T* v_cache, int num_heads,       \
            int num_kv_heads, int head_dim, float scale, int window, float eps, int early) {                            \
        decode_attention_small<T, G>(out, qkv, bias, q_norm, k_norm, cos_table, sin_table, positions, token_seq,       \
                                     block_tables, max_blocks, block_size, k_cache, v_cache, num_heads, num_kv_heads,  \
                                     head_dim, scale, window, eps, early);                                              \
    }
#define INSTANTIATE_DS_GROUPS(SUFFIX, T)                                                                                \
    INSTANTIATE_DS(SUFFIX, T, 1)                                                                                        \
    INSTANTIATE_DS(SUFFIX, T, 2)                                                                                        \
    INSTANTIATE_DS(SUFFIX, T, 4)                                                                                        \
    INSTANTIATE_DS(SUFFIX, T, 7)                                                                                        \
    INSTANTIATE_DS(SUFFIX, T, 8)

INSTANTIATE_DS_GROUPS(f32, float)
INSTANTIATE_DS_GROUPS(bf16, __nv_bfloat16)
INSTANTIATE_DS_GROUPS(f16, __half)
