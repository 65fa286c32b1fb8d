// The engine's hot ops on the GPU: embedding gather, fused residual-add + RMSNorm,
// q/k/v preparation (bias, Qwen3 q/k norm, rotary, KV-cache write), paged attention over
// block tables (prefill and decode alike, split along the sequence for long contexts), and
// SiLU*mul. Storage in float32, bfloat16 or float16; arithmetic and accumulation in float32.
//
// In bf16/f16 a value is rounded only where it is stored in T (activations between
// kernels, the KV cache); inside a kernel the arithmetic stays float32 (norms, rotary, bias,
// SiLU), and the residual stream between layers stays float32 whatever T is. Rounding the
// residual after every add, as torch does, was the largest single source of bf16's
// logprob error on SmolLM2.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; position p of a
// sequence lives in slot block_tables[seq * max_blocks + p / block_size] * block_size + p % block_size.

#include "common.cuh"
#include "gemv_epilogue.cuh"
#include "pdl.cuh"

// Sum over the whole block; every thread gets the result. `red` holds 33 floats.
__device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int num_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < num_warps ? red[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) red[32] = w;
    }
    __syncthreads();
    return red[32];
}

__device__ __forceinline__ long long cache_slot(const uint32_t* block_tables, int seq, int max_blocks, int block_size, int pos) {
    return (long long)block_tables[(long long)seq * max_blocks + pos / block_size] * block_size + pos % block_size;
}

// Row blockIdx.x of out = table[id] (float32, the residual stream).
template <typename T>
__device__ __forceinline__ void embed_row(float* out, const T* table, uint32_t id, int hidden) {
    const long long t = blockIdx.x;
    const T* row = table + (long long)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[t * hidden + i] = to_f(row[i]);
}

// out[t] = table[ids[t]]; one block per token.
template <typename T>
__device__ void embedding(float* out, const T* table, const uint32_t* ids, int hidden) {
    embed_row<T>(out, table, ids[blockIdx.x], hidden);
}

// An id with EMBED_AHEAD set (a decode graph launched ahead, backend/cuda/graphs.rs) names
// the row of `ahead` (the step before's argmax) that holds the token.
#define EMBED_AHEAD 0x80000000u

// A decode graph's first kernel (backend/cuda/graphs.rs): the step's inputs from `staged`,
// page-locked host memory the host wrote for this launch ([entries, 3 unused, then meta's
// layout: ids [max_batch], positions [max_batch], block tables [max_batch, max_blocks]]),
// into `meta` (rows 0..gridDim.x, each table row's first `entries`), and row t's embedding,
// its id read from there (EMBED_AHEAD resolved). No copy on the stream before the graph
// (bench/RESULTS.md, issue 7, session 18). It lets no later kernel start before it ends:
// they read meta before their pdl_wait.
template <typename T>
__device__ void graph_embedding(float* out, const T* table, const uint32_t* staged, uint32_t* meta,
                                const uint32_t* ahead, int hidden, int max_batch, int max_blocks) {
    const int t = blockIdx.x;
    const uint32_t* src = staged + 4;
    const long long row = 2LL * max_batch + (long long)t * max_blocks;
    // One trip over the bus for all of these: a thread's first table entry is read before
    // knowing whether the row has that many.
    const bool first = (int)threadIdx.x < max_blocks;
    const uint32_t entry = first ? src[row + threadIdx.x] : 0u;
    const int entries = (int)min(staged[0], (uint32_t)max_blocks);
    uint32_t id = src[t];
    const uint32_t position = src[max_batch + t];
    if (threadIdx.x == 0) {
        meta[t] = id;
        meta[max_batch + t] = position;
    }
    if (first && (int)threadIdx.x < entries) meta[row + threadIdx.x] = entry;
    for (int i = threadIdx.x + blockDim.x; i < entries; i += blockDim.x) meta[row + i] = src[row + i];
    if ((id & EMBED_AHEAD) && ahead) id = ahead[id & ~EMBED_AHEAD];
    embed_row<T>(out, table, id, hidden);
}

// out[r] = src[rows[r]]; one block per output row.
template <typename T>
__device__ void gather_rows(T* out, const T* src, const uint32_t* rows, int width) {
    const long long r = blockIdx.x;
    const T* row = src + (long long)rows[r] * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[r * width + i] = row[i];
}

// residual (float32) += delta (when given), then
// out = weight * residual * rsqrt(mean(residual^2) + eps). One block per row.
template <typename T>
__device__ void add_rms_norm(float* residual, const T* delta, const T* weight, T* out, int hidden, float eps) {
    __shared__ float red[33];
    const long long base = (long long)blockIdx.x * hidden;
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = residual[base + i];
        if (delta) {
            v += to_f(delta[base + i]);
            residual[base + i] = v;
        }
        sum_sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sum_sq, red) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = residual[base + i];
        out[base + i] = from_f<T>(to_f(weight[i]) * (v * inv));
    }
}

// out[r, c] = silu(gate_up[r, c]) * gate_up[r, inter + c].
template <typename T>
__device__ void silu_mul(T* out, const T* gate_up, int inter, long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / inter, c = i % inter;
        const float g = to_f(gate_up[r * 2 * inter + c]);
        const float u = to_f(gate_up[r * 2 * inter + inter + c]);
        out[i] = from_f<T>(g / (1.f + expf(-g)) * u);
    }
}

// One block per token: fused qkv row -> (+bias) -> (Qwen3: per-head RMSNorm of q and k) ->
// rotary on q and k -> q to q_out, k and v into the cache at the token's slot.
// cos/sin tables: [max_position, head_dim / 2] float32.
template <typename T>
__device__ void qkv_prepare(const T* qkv, const T* bias, const T* q_norm, const T* k_norm,
                            const float* cos_table, const float* sin_table,
                            const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables,
                            int max_blocks, int block_size, T* q_out, T* k_cache, T* v_cache,
                            int num_heads, int num_kv_heads, int head_dim, float eps) {
    extern __shared__ float row[];
    const long long t = blockIdx.x;
    const int width = (num_heads + 2 * num_kv_heads) * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = to_f(qkv[t * width + i]);
        if (bias) v += to_f(bias[i]);
        row[i] = v;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    if (q_norm) {
        for (int h = warp; h < num_heads + num_kv_heads; h += num_warps) {
            float* x = row + h * head_dim;
            float ss = 0.f;
            for (int j = lane; j < head_dim; j += 32) ss += x[j] * x[j];
            const float inv = rsqrtf(warp_sum(ss) / head_dim + eps);
            const T* w = h < num_heads ? q_norm : k_norm;
            for (int j = lane; j < head_dim; j += 32) x[j] = to_f(w[j]) * (x[j] * inv);
        }
        __syncthreads();
    }
    const int pos = positions[t];
    const long long slot = cache_slot(block_tables, token_seq[t], max_blocks, block_size, pos);
    const int half = head_dim / 2;
    const long long kv_base = slot * num_kv_heads * head_dim;
    for (int i = threadIdx.x; i < (num_heads + num_kv_heads) * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        const float c = cos_table[(long long)pos * half + j];
        const float s = sin_table[(long long)pos * half + j];
        const float a = row[h * head_dim + j], b = row[h * head_dim + j + half];
        const T ra = from_f<T>(a * c - b * s);
        const T rb = from_f<T>(b * c + a * s);
        if (h < num_heads) {
            T* q = q_out + (t * num_heads + h) * head_dim;
            q[j] = ra;
            q[j + half] = rb;
        } else {
            T* k = k_cache + kv_base + (long long)(h - num_heads) * head_dim;
            k[j] = ra;
            k[j + half] = rb;
        }
    }
    const float* v = row + (num_heads + num_kv_heads) * head_dim;
    for (int i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x) v_cache[kv_base + i] = from_f<T>(v[i]);
}

#define ATT_THREADS 128
#define ATT_TILE 128
// Query heads per KV head times head_dim, over ATT_THREADS threads.
#define ATT_MAX_OUT 16
#define ATT_MAX_HEAD_DIM 256
// Query heads per KV head.
#define ATT_MAX_GROUP 8
// Key / value rows paged_attention_v2 requests per thread before using the first.
#define ATT_PREFETCH 8
// Splits the in-kernel reduce of paged_attention_v2 combines at most.
#define ATT_MAX_REDUCE_SPLITS 16

// What paged_attention and paged_attention_v2 share: the shared-memory prefix, the token's
// span of positions for this split, the online-softmax step over a tile of scores and the
// split's statistics for attention_reduce.
struct AttentionSmem {
    float* qs;        // [group, head_dim], pre-scaled
    float* scores;    // [group, ATT_TILE]
    float* run_max;   // [group]
    float* run_sum;   // [group]
    float* rescale;   // [group]
    long long* slots; // [ATT_TILE], 8-byte aligned
};

__device__ __forceinline__ AttentionSmem attention_smem(float* smem, int group, int head_dim) {
    AttentionSmem a;
    a.qs = smem;
    a.scores = a.qs + group * head_dim;
    a.run_max = a.scores + group * ATT_TILE;
    a.run_sum = a.run_max + group;
    a.rescale = a.run_sum + group;
    a.slots = (long long*)(a.rescale + group + (group & 1) + 2);
    return a;
}

struct AttentionSpan {
    int pos, seq, first, start, end;
};

// Positions [start, end) of the token's context that split `split` covers (its window's
// `first` position included, for the combining step).
__device__ __forceinline__ AttentionSpan attention_span(const uint32_t* positions, const uint32_t* token_seq, int t,
                                                        int window, int split, int partition) {
    AttentionSpan s;
    s.pos = positions[t];
    s.seq = token_seq[t];
    s.first = window > 0 ? max(0, s.pos + 1 - window) : 0;
    s.start = s.first + split * partition;
    s.end = min(s.pos + 1, s.start + partition);
    return s;
}

// The block's query heads into shared memory, pre-scaled, and the running statistics reset.
template <typename T>
__device__ __forceinline__ void attention_begin(const AttentionSmem& a, const T* q, long long q_base, int group,
                                                int head_dim, float scale) {
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) a.qs[i] = to_f(q[q_base + i]) * scale;
    if (threadIdx.x < group) {
        a.run_max[threadIdx.x] = -INFINITY;
        a.run_sum[threadIdx.x] = 0.f;
    }
}

// Online softmax per query head over a tile's n scores: new max, the scores replaced by
// their weights, and the factor that rescales what was summed before.
__device__ __forceinline__ void attention_softmax_tile(const AttentionSmem& a, int group, int n) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    for (int g = warp; g < group; g += num_warps) {
        float* scores = a.scores + g * ATT_TILE;
        float m = -INFINITY;
        for (int p = lane; p < n; p += 32) m = fmaxf(m, scores[p]);
        m = warp_max(m);
        const float m_old = a.run_max[g];
        const float m_new = fmaxf(m_old, m);
        float s = 0.f;
        for (int p = lane; p < n; p += 32) {
            const float e = expf(scores[p] - m_new);
            scores[p] = e;
            s += e;
        }
        s = warp_sum(s);
        if (lane == 0) {
            const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
            a.run_sum[g] = a.run_sum[g] * alpha + s;
            a.run_max[g] = m_new;
            a.rescale[g] = alpha;
        }
    }
}

// A split's (max, sum) per query head, for attention_reduce or the last split.
__device__ __forceinline__ void attention_store_stats(const AttentionSmem& a, float* part_ml, int t, int num_heads,
                                                      int kv_head, int group, int split, int num_splits) {
    if (threadIdx.x < group) {
        const long long head = (long long)t * num_heads + (long long)kv_head * group + threadIdx.x;
        part_ml[(head * num_splits + split) * 2] = a.run_max[threadIdx.x];
        part_ml[(head * num_splits + split) * 2 + 1] = a.run_sum[threadIdx.x];
    }
}

// One block per (query token, KV head, split): the G = num_heads / num_kv_heads query heads
// that share the KV head attend over positions [start, end) of the token's causal context
// (sliding window included), with an online softmax over tiles of ATT_TILE positions.
// num_splits == 1: writes the normalised output. Else writes the unnormalised partial sums
// and (max, denominator) per split to part_acc / part_ml for attention_reduce.
template <typename T>
__device__ void paged_attention(T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,
                                const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables,
                                int max_blocks, int block_size, int num_heads, int num_kv_heads, int head_dim,
                                float scale, int window, int partition, int num_splits) {
    extern __shared__ float smem[];
    const int t = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int group_width = group * head_dim;
    const AttentionSmem sm = attention_smem(smem, group, head_dim);
    const float *qs = sm.qs, *run_sum = sm.run_sum, *rescale = sm.rescale;
    float* scores = sm.scores;
    long long* slots = sm.slots;

    const AttentionSpan span = attention_span(positions, token_seq, t, window, split, partition);
    const int seq = span.seq, start = span.start, end = span.end;
    // A split past this token's context (a captured graph covers the longest context):
    // nothing to do, and attention_reduce does not read it.
    if (num_splits > 1 && start >= end) return;
    const long long q_base = ((long long)t * num_heads + (long long)kv_head * group) * head_dim;
    attention_begin(sm, q, q_base, group, head_dim, scale);
    float acc[ATT_MAX_OUT];
#pragma unroll
    for (int c = 0; c < ATT_MAX_OUT; c++) acc[c] = 0.f;
    __syncthreads();

    const long long kv_stride = (long long)num_kv_heads * head_dim;
    for (int tile = start; tile < end; tile += ATT_TILE) {
        const int n = min(ATT_TILE, end - tile);
        // Scores: one thread per position (the tile is one position per thread), each
        // reading its key row with 16-byte loads where the row allows it.
        for (int p = threadIdx.x; p < n; p += blockDim.x) {
            const long long slot = cache_slot(block_tables, seq, max_blocks, block_size, tile + p);
            slots[p] = slot;
            const T* k = k_cache + slot * kv_stride + (long long)kv_head * head_dim;
            float d[ATT_MAX_GROUP];
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; g++) d[g] = 0.f;
            constexpr int VEC = 16 / sizeof(T);
            if (head_dim % VEC == 0) {
                for (int j = 0; j < head_dim; j += VEC) {
                    const uint4 raw = *reinterpret_cast<const uint4*>(k + j);
                    const T* kv = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int e = 0; e < VEC; e++) {
                        const float kf = to_f(kv[e]);
#pragma unroll
                        for (int g = 0; g < ATT_MAX_GROUP; g++)
                            if (g < group) d[g] += qs[g * head_dim + j + e] * kf;
                    }
                }
            } else {
                for (int j = 0; j < head_dim; j++) {
                    const float kf = to_f(k[j]);
#pragma unroll
                    for (int g = 0; g < ATT_MAX_GROUP; g++)
                        if (g < group) d[g] += qs[g * head_dim + j] * kf;
                }
            }
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; g++)
                if (g < group) scores[g * ATT_TILE + p] = d[g];
        }
        __syncthreads();
        attention_softmax_tile(sm, group, n);
        __syncthreads();
        // Weighted values: thread owns outputs o = threadIdx.x + c * ATT_THREADS of [group, head_dim].
#pragma unroll
        for (int c = 0; c < ATT_MAX_OUT; c++) {
            const int o = threadIdx.x + c * ATT_THREADS;
            if (o < group_width) {
                const int g = o / head_dim, d = o % head_dim;
                float a = acc[c] * rescale[g];
                const float* w = scores + g * ATT_TILE;
                const T* v = v_cache + (long long)kv_head * head_dim + d;
#pragma unroll 8
                for (int p = 0; p < n; p++) a += w[p] * to_f(v[slots[p] * kv_stride]);
                acc[c] = a;
            }
        }
        __syncthreads();
    }

    if (num_splits == 1) {
#pragma unroll
        for (int c = 0; c < ATT_MAX_OUT; c++) {
            const int o = threadIdx.x + c * ATT_THREADS;
            if (o < group_width) {
                const float l = run_sum[o / head_dim];
                out[q_base + o] = from_f<T>(l > 0.f ? acc[c] / l : 0.f);
            }
        }
    } else {
#pragma unroll
        for (int c = 0; c < ATT_MAX_OUT; c++) {
            const int o = threadIdx.x + c * ATT_THREADS;
            if (o < group_width) {
                const int g = o / head_dim, d = o % head_dim;
                const long long head = (long long)t * num_heads + (long long)kv_head * group + g;
                part_acc[(head * num_splits + split) * head_dim + d] = acc[c];
            }
        }
        attention_store_stats(sm, part_ml, t, num_heads, kv_head, group, split, num_splits);
    }
}

// paged_attention with coalesced cache reads (same grid, shared-memory prefix and outputs):
// a key or value row is read by `chunks` = head_dim / VEC neighbouring threads, 16 bytes
// each, so a block reads ATT_THREADS / chunks rows per pass. Scores are reduced over the
// row's threads with shuffles; each thread accumulates its VEC dims of every query head over
// the rows of its row group, and the row groups are summed through shared memory at the end.
// Needs head_dim % VEC == 0 and chunks a power of two <= 32 (the launcher checks).
template <typename T, int MAXG>
__device__ void paged_attention_v2(T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache,
                                   const T* v_cache, const uint32_t* positions, const uint32_t* token_seq,
                                   const uint32_t* block_tables, int max_blocks, int block_size, int num_heads,
                                   int num_kv_heads, int head_dim, float scale, int window, int partition,
                                   int num_splits, unsigned int* done_counts) {
    constexpr int VEC = 16 / sizeof(T);
    extern __shared__ float smem[];
    const int t = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int group_width = group * head_dim;
    const int chunks = head_dim / VEC;
    const int rows_per_pass = blockDim.x / chunks;
    const int sub = threadIdx.x % chunks, row = threadIdx.x / chunks;
    const AttentionSmem sm = attention_smem(smem, group, head_dim);
    const float *qs = sm.qs, *run_sum = sm.run_sum, *rescale = sm.rescale;
    float* scores = sm.scores;
    long long* slots = sm.slots;
    float* red = (float*)(slots + ATT_TILE);  // [rows_per_pass, group, head_dim]

    const AttentionSpan span = attention_span(positions, token_seq, t, window, split, partition);
    const int pos = span.pos, seq = span.seq, first = span.first, start = span.start, end = span.end;
    if (num_splits > 1 && start >= end) return;
    const long long q_base = ((long long)t * num_heads + (long long)kv_head * group) * head_dim;
    attention_begin(sm, q, q_base, group, head_dim, scale);
    float acc[MAXG][VEC];
#pragma unroll
    for (int g = 0; g < MAXG; g++)
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[g][e] = 0.f;
    __syncthreads();

    const long long kv_stride = (long long)num_kv_heads * head_dim;
    const long long head_off = (long long)kv_head * head_dim + sub * VEC;
    for (int tile = start; tile < end; tile += ATT_TILE) {
        const int n = min(ATT_TILE, end - tile);
        for (int p = threadIdx.x; p < n; p += blockDim.x)
            slots[p] = cache_slot(block_tables, seq, max_blocks, block_size, tile + p);
        __syncthreads();
        // Scores: every warp runs the same number of passes (shuffles need whole warps).
        // ATT_PREFETCH passes' key loads are issued before the first is used, so a
        // thread keeps that many 16-byte loads in flight instead of one.
        for (int p0 = 0; p0 < n; p0 += ATT_PREFETCH * rows_per_pass) {
            uint4 kraw[ATT_PREFETCH];
#pragma unroll
            for (int j = 0; j < ATT_PREFETCH; j++) {
                const int p = p0 + j * rows_per_pass + row;
                kraw[j] = p < n ? *reinterpret_cast<const uint4*>(k_cache + slots[p] * kv_stride + head_off)
                                : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < ATT_PREFETCH; j++) {
                if (p0 + j * rows_per_pass >= n) break;  // uniform over the block
                const int p = p0 + j * rows_per_pass + row;
                const T* kv = reinterpret_cast<const T*>(&kraw[j]);
                float d[MAXG];
#pragma unroll
                for (int g = 0; g < MAXG; g++) {
                    d[g] = 0.f;
                    if (g < group) {
#pragma unroll
                        for (int e = 0; e < VEC; e++) d[g] += qs[g * head_dim + sub * VEC + e] * to_f(kv[e]);
                    }
                }
#pragma unroll
                for (int g = 0; g < MAXG; g++) {
                    if (g < group) {
                        for (int o = chunks >> 1; o > 0; o >>= 1) d[g] += __shfl_xor_sync(0xffffffffu, d[g], o);
                    }
                }
                if (p < n && sub == 0) {
#pragma unroll
                    for (int g = 0; g < MAXG; g++)
                        if (g < group) scores[g * ATT_TILE + p] = d[g];
                }
            }
        }
        __syncthreads();
        attention_softmax_tile(sm, group, n);
        __syncthreads();
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < group) {
                const float a = rescale[g];
#pragma unroll
                for (int e = 0; e < VEC; e++) acc[g][e] *= a;
            }
        }
        for (int p0 = 0; p0 < n; p0 += ATT_PREFETCH * rows_per_pass) {
            uint4 vraw[ATT_PREFETCH];
#pragma unroll
            for (int j = 0; j < ATT_PREFETCH; j++) {
                const int p = p0 + j * rows_per_pass + row;
                vraw[j] = p < n ? *reinterpret_cast<const uint4*>(v_cache + slots[p] * kv_stride + head_off)
                                : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < ATT_PREFETCH; j++) {
                const int p = p0 + j * rows_per_pass + row;
                if (p < n) {
                    const T* vv = reinterpret_cast<const T*>(&vraw[j]);
                    float vf[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; e++) vf[e] = to_f(vv[e]);
#pragma unroll
                    for (int g = 0; g < MAXG; g++) {
                        if (g < group) {
                            const float w = scores[g * ATT_TILE + p];
#pragma unroll
                            for (int e = 0; e < VEC; e++) acc[g][e] += w * vf[e];
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    // Sum the row groups' partial outputs.
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g < group) {
#pragma unroll
            for (int e = 0; e < VEC; e++) red[((long long)row * group + g) * head_dim + sub * VEC + e] = acc[g][e];
        }
    }
    __syncthreads();
    for (int o = threadIdx.x; o < group_width; o += blockDim.x) {
        float a = 0.f;
        for (int r = 0; r < rows_per_pass; r++) a += red[(long long)r * group_width + o];
        const int g = o / head_dim, dim = o % head_dim;
        if (num_splits == 1) {
            const float l = run_sum[g];
            out[q_base + o] = from_f<T>(l > 0.f ? a / l : 0.f);
        } else {
            const long long head = (long long)t * num_heads + (long long)kv_head * group + g;
            part_acc[(head * num_splits + split) * head_dim + dim] = a;
        }
    }
    if (num_splits > 1) attention_store_stats(sm, part_ml, t, num_heads, kv_head, group, split, num_splits);
    if (num_splits > 1 && done_counts) {
        // The last split of this (token, KV head) to finish combines all of them (no
        // attention_reduce launch): the classic fence + counter, reset for the next use.
        __shared__ int last;
        __threadfence();
        __syncthreads();
        const int active = min(num_splits, (pos + 1 - first + partition - 1) / partition);
        if (threadIdx.x == 0) {
            unsigned int* count = done_counts + (long long)t * num_kv_heads + kv_head;
            last = atomicAdd(count, 1u) == (unsigned int)(active - 1);
            if (last) *count = 0u;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        // Every split's statistics and partial sum requested at once (unrolled over at
        // most ATT_MAX_REDUCE_SPLITS, which the launcher guarantees), not one after another.
        for (int o = threadIdx.x; o < group_width; o += blockDim.x) {
            const int g = o / head_dim, dim = o % head_dim;
            const long long head = (long long)t * num_heads + (long long)kv_head * group + g;
            const float* ml = part_ml + head * num_splits * 2;
            float ms[ATT_MAX_REDUCE_SPLITS], ls[ATT_MAX_REDUCE_SPLITS], as[ATT_MAX_REDUCE_SPLITS];
#pragma unroll
            for (int s = 0; s < ATT_MAX_REDUCE_SPLITS; s++) {
                const bool live = s < active;
                ms[s] = live ? __ldcg(ml + 2 * s) : -INFINITY;
                ls[s] = live ? __ldcg(ml + 2 * s + 1) : 0.f;
                as[s] = live ? __ldcg(part_acc + (head * num_splits + s) * head_dim + dim) : 0.f;
            }
            float m = -INFINITY;
#pragma unroll
            for (int s = 0; s < ATT_MAX_REDUCE_SPLITS; s++)
                if (ls[s] > 0.f) m = fmaxf(m, ms[s]);
            float l = 0.f, a = 0.f;
#pragma unroll
            for (int s = 0; s < ATT_MAX_REDUCE_SPLITS; s++) {
                if (ls[s] > 0.f) {
                    const float f = expf(ms[s] - m);
                    l += ls[s] * f;
                    a += as[s] * f;
                }
            }
            out[head * head_dim + dim] = from_f<T>(l > 0.f ? a / l : 0.f);
        }
    }
}

// Combines the splits of paged_attention that cover the token's context (the others were
// never written): one block per (token, head).
template <typename T>
__device__ void attention_reduce(T* out, const float* part_acc, const float* part_ml, const uint32_t* positions,
                                 int num_heads, int head_dim, int num_splits, int window, int partition) {
    const long long head = (long long)blockIdx.x * num_heads + blockIdx.y;
    const int pos = positions[blockIdx.x];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int active = min(num_splits, (pos + 1 - first + partition - 1) / partition);
    const float* ml = part_ml + head * num_splits * 2;
    float m = -INFINITY;
    for (int s = 0; s < active; s++)
        if (ml[2 * s + 1] > 0.f) m = fmaxf(m, ml[2 * s]);
    float l = 0.f;
    for (int s = 0; s < active; s++)
        if (ml[2 * s + 1] > 0.f) l += ml[2 * s + 1] * expf(ml[2 * s] - m);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < active; s++)
            if (ml[2 * s + 1] > 0.f) a += part_acc[(head * num_splits + s) * head_dim + d] * expf(ml[2 * s] - m);
        out[head * head_dim + d] = from_f<T>(l > 0.f ? a / l : 0.f);
    }
}


#define ARGMAX_THREADS 1024

// Per row of logits [rows, vocab] (one block per row): the largest value and its lowest
// index (NaN never wins). out: u32 [2 * rows], the ids then the values' float32 bits.
template <typename T>
__device__ void argmax_rows(uint32_t* out, const T* logits, int vocab) {
    __shared__ float best_v[ARGMAX_THREADS / 32];
    __shared__ int best_i[ARGMAX_THREADS / 32];
    const T* row = logits + (long long)blockIdx.x * vocab;
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = to_f(row[i]);
        if (x > v || (idx == 0x7fffffff && x == v)) {
            v = x;
            idx = i;
        }
    }
    // Warp then block reduction in argmax order.
    warp_argmax(v, idx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        const int num_warps = blockDim.x >> 5;
        v = lane < num_warps ? best_v[lane] : -INFINITY;
        idx = lane < num_warps ? best_i[lane] : 0x7fffffff;
        warp_argmax(v, idx);
        if (lane == 0) store_argmax(out, nullptr, blockIdx.x, gridDim.x, v, idx);
    }
}

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
// 16-byte weight loads each lane issues before its first use: one pass of a warp covers
// 32 * GEMV_LOADS chunks of a weight row.
#define GEMV_LOADS 4
#define GEMV_PASS_CHUNKS (32 * GEMV_LOADS)
// Items (GEMV_LOADS loads each) a warp of gemv_fused keeps in flight.
#define GEMV_DEPTH 5

__device__ __forceinline__ uint4 load16_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Issues the GEMV_LOADS 16-byte weight loads of one (row, half, pass) item of gemv_fused.
template <typename T>
__device__ __forceinline__ void gemv_load_item(uint4 (&wraw)[GEMV_LOADS], const T* w, int item, int passes, int halves,
                                               int row0, int out, int inner, int lane) {
    constexpr int VEC = 16 / sizeof(T);
    const int chunks = inner / VEC;
    const int pass = item % passes, rh = item / passes;
    const int o = row0 + rh / halves, half = rh % halves;
    const T* wr = w + ((long long)o + (long long)half * out) * inner;
    const int c0 = pass * GEMV_PASS_CHUNKS + lane;
#pragma unroll
    for (int j = 0; j < GEMV_LOADS; j++) {
        const int c = c0 + 32 * j;
        wraw[j] = (o < out && c < chunks) ? load16_stream(wr + (long long)c * VEC) : make_uint4(0, 0, 0, 0);
    }
}

// A skinny product for decode steps: y = epilogue(x' · wᵀ) for n <= NR rows of x, where
// x' = x (T), or RMSNorm(x) * norm_w when norm_w is given (the norm fused in: x is then the
// float32 residual stream, [n, inner] with inner the hidden size). Weights stream through with
// 16-byte loads, GEMV_LOADS per lane and item, `depth` items per warp in flight; a warp's
// first items are requested before the block builds x' in shared memory (so the prologue
// hides under their latency), each refilled as soon as it is summed; with programmatic
// dependent launch (pdl.cuh) those first requests also overlap the previous kernel's end.
// A block computes `rows_per_block`
// outputs; a weight row is cut into `passes` of GEMV_PASS_CHUNKS chunks and every
// (row, half, pass) item goes to one warp; the items' sums meet in shared memory in a
// fixed order (deterministic). Epilogues (mode):
//   GEMV_STORE: y[r, o] = sum;
//   GEMV_ADD:   y is the float32 residual stream [n, out]: y[r, o] += round(sum);
//   GEMV_SILU:  w is the fused [2 * out, inner] gate/up matrix; y[r, o] = silu(gate) * up
//               (gate and up rounded as the unfused path stores them);
//   GEMV_STORE_F32: y is float32 [n, out], y[r, o] = sum unrounded (the logits: bf16 rounding
//               alone moves a logprob by up to ~0.1).
// Needs inner % (16 / sizeof(T)) == 0, 16-byte aligned w, x and norm_w, and dynamic shared
// memory n * inner * sizeof(T) + items * NR * 4 bytes (the launcher checks).
template <typename T, int NR>
__device__ void gemv_fused(void* y, const void* x, const T* w, const T* norm_w, int n, int out, int inner,
                           int rows_per_block, int passes, int mode, float eps, int depth) {
    extern __shared__ uint4 gemv_smem[];
    constexpr int VEC = 16 / sizeof(T);
    T* xs = reinterpret_cast<T*>(gemv_smem);
    float* part = reinterpret_cast<float*>(xs + (long long)n * inner);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = inner / VEC;
    const int halves = mode == GEMV_SILU ? 2 : 1;
    const int items = rows_per_block * halves * passes;
    const int row0 = blockIdx.x * rows_per_block;

    // `depth` (<= GEMV_DEPTH) items per warp in flight: a warp's first `depth` items are
    // requested before the prologue, and each item's slot is refilled with the item
    // `depth` ahead as soon as it has been summed.
    uint4 wbuf[GEMV_DEPTH][GEMV_LOADS];
#pragma unroll
    for (int b = 0; b < GEMV_DEPTH; b++) {
        const int item = warp + b * GEMV_WARPS;
        if (b >= depth) break;
        if (item < items) gemv_load_item<T>(wbuf[b], w, item, passes, halves, row0, out, inner, lane);
    }
    // The weights do not depend on the previous kernel; x (and y, for the residual add) do.
    pdl_launch_dependents();
    pdl_wait();

    if (norm_w) {
        // The whole block builds x': every thread's chunks are requested at once (one DRAM
        // round trip for the sums of squares, not one per 32 chunks of a warp's loop), the
        // per-row sums meet in a fixed order (deterministic).
        __shared__ float red[GEMV_WARPS * NR];
        const float* res = static_cast<const float*>(x);
        const int total = n * chunks;
        float ss[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) ss[r] = 0.f;
#pragma unroll 4
        for (int i = threadIdx.x; i < total; i += blockDim.x) {
            const int row = i / chunks;
            const float4* hp = reinterpret_cast<const float4*>(res + (long long)row * inner + (i - row * chunks) * VEC);
            float sq = 0.f;
#pragma unroll
            for (int q = 0; q < VEC / 4; q++) {
                const float4 v = hp[q];
                sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
#pragma unroll
            for (int r = 0; r < NR; r++)
                if (r == row) ss[r] += sq;
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const float v = warp_sum(ss[r]);
            if (lane == 0) red[warp * NR + r] = v;
        }
        __syncthreads();
#pragma unroll 4
        for (int i = threadIdx.x; i < total; i += blockDim.x) {
            const int row = i / chunks, c = i - row * chunks;
            float sum = 0.f;
            for (int w2 = 0; w2 < GEMV_WARPS; w2++) sum += red[w2 * NR + row];
            const float inv = rsqrtf(sum / inner + eps);
            const float* hv = res + (long long)row * inner + c * VEC;
            const uint4 wraw = *reinterpret_cast<const uint4*>(norm_w + c * VEC);
            const T* nw = reinterpret_cast<const T*>(&wraw);
            uint4 o;
            T* ov = reinterpret_cast<T*>(&o);
#pragma unroll
            for (int e = 0; e < VEC; e++) ov[e] = from_f<T>(to_f(nw[e]) * (hv[e] * inv));
            *reinterpret_cast<uint4*>(xs + (long long)row * inner + c * VEC) = o;
        }
    } else {
        for (int i = threadIdx.x; i < n * chunks; i += blockDim.x)
            reinterpret_cast<uint4*>(xs)[i] = static_cast<const uint4*>(x)[i];
    }
    __syncthreads();

    for (int item0 = warp; item0 < items; item0 += depth * GEMV_WARPS) {
#pragma unroll
      for (int b = 0; b < GEMV_DEPTH; b++) {
        const int item = item0 + b * GEMV_WARPS;
        if (b >= depth || item >= items) break;  // uniform over the warp
        uint4 (&cur)[GEMV_LOADS] = wbuf[b];
        const int c0 = (item % passes) * GEMV_PASS_CHUNKS + lane;
        float acc[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) acc[r] = 0.f;
#pragma unroll
        for (int j = 0; j < GEMV_LOADS; j++) {
            const int c = c0 + 32 * j;
            if (c < chunks) {
                const T* wv = reinterpret_cast<const T*>(&cur[j]);
                float wf[VEC];
#pragma unroll
                for (int e = 0; e < VEC; e++) wf[e] = to_f(wv[e]);
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    if (r < n) {
                        const uint4 xraw = *reinterpret_cast<const uint4*>(xs + (long long)r * inner + c * VEC);
                        const T* xv = reinterpret_cast<const T*>(&xraw);
#pragma unroll
                        for (int e = 0; e < VEC; e++) acc[r] += wf[e] * to_f(xv[e]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (r < n) {
                const float v = warp_sum(acc[r]);
                if (lane == 0) part[item * NR + r] = v;
            }
        }
        const int ahead = item + depth * GEMV_WARPS;
        if (ahead < items) gemv_load_item<T>(cur, w, ahead, passes, halves, row0, out, inner, lane);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows_per_block * n; i += blockDim.x) {
        const int local = i / n, r = i % n, o = row0 + local;
        if (o >= out) continue;
        float s[2] = {0.f, 0.f};
        for (int half = 0; half < halves; half++)
            for (int pass = 0; pass < passes; pass++) s[half] += part[((local * halves + half) * passes + pass) * NR + r];
        gemv_epilogue<T>(y, (long long)r * out + o, mode, s[0], s[1]);
    }
}

// Split argmax for decode (one block per row was one SM reading the whole vocabulary):
// stage 1, grid (rows, ARGMAX_SPLITS): each block's largest value and lowest index over its
// slice into part [rows, ARGMAX_SPLITS, 2] (u32: index, value bits); stage 2, one warp per
// row, writes out like argmax_rows (ids, then the values' float32 bits).
#define ARGMAX_SPLITS 64
#define ARGMAX_SPLIT_THREADS 256

template <typename T>
__device__ void argmax_split(uint32_t* part, const T* logits, int vocab) {
    __shared__ float best_v[ARGMAX_SPLIT_THREADS / 32];
    __shared__ int best_i[ARGMAX_SPLIT_THREADS / 32];
    const T* row = logits + (long long)blockIdx.x * vocab;
    const int per = (vocab + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per, end = min(vocab, begin + per);
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float x = to_f(row[i]);
        if (x > v || (idx == 0x7fffffff && x == v)) {
            v = x;
            idx = i;
        }
    }
    warp_argmax(v, idx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? best_v[lane] : -INFINITY;
        idx = lane < (int)(blockDim.x >> 5) ? best_i[lane] : 0x7fffffff;
        warp_argmax(v, idx);
        if (lane == 0) {
            uint32_t* p = part + ((long long)blockIdx.x * gridDim.y + blockIdx.y) * 2;
            p[0] = (uint32_t)idx;
            p[1] = __float_as_uint(v);
        }
    }
}

// Stage 2 of the split argmax: one 32-thread block per row over its `splits` partials.
// `host_out`, when given, gets the same values (a decode graph's result, written straight
// to page-locked host memory).
extern "C" __global__ void argmax_split_reduce(uint32_t* out, const uint32_t* part, int splits, uint32_t* host_out) {
    const uint32_t* p = part + (long long)blockIdx.x * splits * 2;
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int s = threadIdx.x; s < splits; s += 32) argmax_merge(v, idx, __uint_as_float(p[2 * s + 1]), (int)p[2 * s]);
    warp_argmax(v, idx);
    if (threadIdx.x == 0) store_argmax(out, host_out, blockIdx.x, gridDim.x, v, idx);
}

#define INSTANTIATE(SUFFIX, T)                                                                                          \
    extern "C" __global__ void embedding_##SUFFIX(float* out, const T* table, const uint32_t* ids, int hidden) {      \
        embedding<T>(out, table, ids, hidden);                                                                          \
    }                                                                                                                   \
    extern "C" __global__ void graph_embedding_##SUFFIX(float* out, const T* table, const uint32_t* staged,               \
                                                        uint32_t* meta, const uint32_t* ahead, int hidden,               \
                                                        int max_batch, int max_blocks) {                                 \
        graph_embedding<T>(out, table, staged, meta, ahead, hidden, max_batch, max_blocks);                             \
    }                                                                                                                   \
    extern "C" __global__ void gather_rows_##SUFFIX(T* out, const T* src, const uint32_t* rows, int width) {           \
        gather_rows<T>(out, src, rows, width);                                                                          \
    }                                                                                                                   \
    extern "C" __global__ void add_rms_norm_##SUFFIX(float* residual, const T* delta, const T* weight, T* out,         \
                                                     int hidden, float eps) {                                           \
        add_rms_norm<T>(residual, delta, weight, out, hidden, eps);                                                     \
    }                                                                                                                   \
    extern "C" __global__ void silu_mul_##SUFFIX(T* out, const T* gate_up, int inter, long long total) {               \
        silu_mul<T>(out, gate_up, inter, total);                                                                        \
    }                                                                                                                   \
    extern "C" __global__ void qkv_prepare_##SUFFIX(                                                                    \
        const T* qkv, const T* bias, const T* q_norm, const T* k_norm, const float* cos_table, const float* sin_table, \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, T* q_out, T* k_cache, T* v_cache, int num_heads, int num_kv_heads, int head_dim, float eps) {  \
        qkv_prepare<T>(qkv, bias, q_norm, k_norm, cos_table, sin_table, positions, token_seq, block_tables, max_blocks, \
                       block_size, q_out, k_cache, v_cache, num_heads, num_kv_heads, head_dim, eps);                    \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention_##SUFFIX(                                 \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits) {                                                                                               \
        paged_attention<T>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq, block_tables, max_blocks, \
                           block_size, num_heads, num_kv_heads, head_dim, scale, window, partition, num_splits);        \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention_v2_##SUFFIX(                              \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits, unsigned int* done_counts) {                                                                    \
        paged_attention_v2<T, ATT_MAX_GROUP>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,         \
                              block_tables,                                                                             \
                              max_blocks, block_size, num_heads, num_kv_heads, head_dim, scale, window, partition,     \
                              num_splits, done_counts);                                                                 \
    }                                                                                                                   \
    extern "C" __global__ void attention_reduce_##SUFFIX(T* out, const float* part_acc, const float* part_ml,          \
                                                         const uint32_t* positions, int num_heads, int head_dim,        \
                                                         int num_splits, int window, int partition) {                   \
        attention_reduce<T>(out, part_acc, part_ml, positions, num_heads, head_dim, num_splits, window, partition);     \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ARGMAX_SPLIT_THREADS) argmax_split_##SUFFIX(uint32_t* part,        \
                                                                                          const T* logits, int vocab) { \
        argmax_split<T>(part, logits, vocab);                                                                           \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows_##SUFFIX(uint32_t* out, const T* logits,  \
                                                                                     int vocab) {                       \
        argmax_rows<T>(out, logits, vocab);                                                                             \
    }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
INSTANTIATE(f16, __half)

// gemv_fused for batches of at most NR rows (1, 2, 4, 8).
#define INSTANTIATE_GEMV(SUFFIX, T, NR)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_fused_r##NR##_##SUFFIX(                            \
        void* y, const void* x, const T* w, const T* norm_w, int n, int out, int inner, int rows_per_block, int passes,\
        int mode, float eps, int depth) {                                                                               \
        gemv_fused<T, NR>(y, x, w, norm_w, n, out, inner, rows_per_block, passes, mode, eps, depth);                   \
    }
#define INSTANTIATE_GEMVS(SUFFIX, T)                                                                                    \
    INSTANTIATE_GEMV(SUFFIX, T, 1)                                                                                      \
    INSTANTIATE_GEMV(SUFFIX, T, 2)                                                                                      \
    INSTANTIATE_GEMV(SUFFIX, T, 4)                                                                                      \
    INSTANTIATE_GEMV(SUFFIX, T, 8)

INSTANTIATE_GEMVS(f32, float)
INSTANTIATE_GEMVS(bf16, __nv_bfloat16)
INSTANTIATE_GEMVS(f16, __half)

// paged_attention_v2 for one exact group size: per-thread arrays sized to it, so a block
// needs far fewer registers and more blocks share an SM.
#define INSTANTIATE_V2_GROUP(SUFFIX, T, G)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_attention_v2_g##G##_##SUFFIX(                      \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits, unsigned int* done_counts) {                                                                    \
        paged_attention_v2<T, G>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq, block_tables,      \
                                 max_blocks, block_size, num_heads, num_kv_heads, head_dim, scale, window, partition,  \
                                 num_splits, done_counts);                                                              \
    }
#define INSTANTIATE_V2_GROUPS(SUFFIX, T)                                                                                \
    INSTANTIATE_V2_GROUP(SUFFIX, T, 1)                                                                                  \
    INSTANTIATE_V2_GROUP(SUFFIX, T, 2)                                                                                  \
    INSTANTIATE_V2_GROUP(SUFFIX, T, 4)                                                                                  \
    INSTANTIATE_V2_GROUP(SUFFIX, T, 7)                                                                                  \
    INSTANTIATE_V2_GROUP(SUFFIX, T, 8)

INSTANTIATE_V2_GROUPS(f32, float)
INSTANTIATE_V2_GROUPS(bf16, __nv_bfloat16)
INSTANTIATE_V2_GROUPS(f16, __half)
