// Paged attention for batches of more than 8 query rows (W1's decode steps of up to 256
// sequences, prefill chunks): built to read the KV cache near full bandwidth.
//
// One warp per (query token, KV head, split of `partition` positions): the warp holds the
// G query heads of its KV head (GQA: one read of each key and value row serves all G) and
// runs its own online softmax, so no __syncthreads after the start. A key row is read by
// head_dim / VEC neighbouring lanes with 16-byte loads (32 / lanes rows per instruction);
// each pass requests U key rows AND the U value rows of the same positions before using
// any, so 2U 16-byte loads per lane are in flight. A block holds the warps of neighbouring
// KV heads of one (token, split): they read neighbouring 256-byte rows of the same cache
// slots, and they share the split's block-table entries, staged once in shared memory.
//
// Splits: a token whose context fits one split writes its normalised output directly;
// otherwise each split writes (max, denominator, unnormalised sums) like paged_attention_v2
// in ops.cu (same layout, max in natural-log units, so attention_reduce can combine them
// too), and the last split of a (token, KV head) to finish combines them (fence + counter).
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim] (see ops.cu).

#include "common.cuh"
#include "mma.cuh"

// Warps (KV heads) per block at most.
#define AB_MAX_WARPS 4

template <int U>
struct KvRows {
    uint4 k[U];
    uint4 v[U];
};

// Requests the key and value rows of the U passes of the chunk at c0 (positions past `end`
// re-read the chunk's first row, which is valid, and are masked by the caller).
template <typename T, int U>
__device__ __forceinline__ void load_rows(KvRows<U>& r, const T* k_cache, const T* v_cache, const uint32_t* table,
                                          int table_first, int block_size, long long kv_stride, long long head_off,
                                          int c0, int end, int rows, int kg) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int p0 = c0 + u * rows + kg;
        const int p = p0 < end ? p0 : c0;
        const long long slot = (long long)table[p / block_size - table_first] * block_size + p % block_size;
        const long long off = slot * kv_stride + head_off;
        r.k[u] = *reinterpret_cast<const uint4*>(k_cache + off);
        r.v[u] = *reinterpret_cast<const uint4*>(v_cache + off);
    }
}

// The last split of a (token, KV head) to finish: combines every split's partials of the
// G query heads into `out`. Each lane combines VEC dims of one query head: G * lanes pieces
// over 32 lanes.
template <typename T, int G>
__device__ __forceinline__ void combine_splits(T* out, const float* part_acc, const float* part_ml, long long head0,
                                               int num_splits, int active, int head_dim, int lane) {
    constexpr int VEC = 16 / sizeof(T);
    const int lanes = head_dim / VEC;
    for (int piece = lane; piece < G * lanes; piece += 32) {
        const int g = piece / lanes, sb = piece % lanes;
        const long long head = head0 + g;
        const float* ml = part_ml + head * num_splits * 2;
        float mx = -INFINITY;
        for (int sp = 0; sp < active; sp++) mx = fmaxf(mx, __ldcg(ml + 2 * sp));
        float den = 0.f, sum[VEC];
#pragma unroll
        for (int e = 0; e < VEC; e++) sum[e] = 0.f;
        for (int sp = 0; sp < active; sp++) {
            const float f = __expf(__ldcg(ml + 2 * sp) - mx);
            den += __ldcg(ml + 2 * sp + 1) * f;
            const float* pa = part_acc + (head * num_splits + sp) * head_dim + sb * VEC;
#pragma unroll
            for (int e = 0; e < VEC; e += 4) {
                const float4 a = __ldcg(reinterpret_cast<const float4*>(pa + e));
                sum[e] += a.x * f;
                sum[e + 1] += a.y * f;
                sum[e + 2] += a.z * f;
                sum[e + 3] += a.w * f;
            }
        }
        const float inv = den > 0.f ? 1.f / den : 0.f;
        uint4 raw;
        T* ov = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int e = 0; e < VEC; e++) ov[e] = from_f<T>(sum[e] * inv);
        *reinterpret_cast<uint4*>(out + head * head_dim + sb * VEC) = raw;
    }
}

// After a warp wrote its split's partials: the last split of the (token, KV head) to
// finish (fence + counter, reset for the next use) combines all of them.
template <typename T, int G>
__device__ __forceinline__ void combine_if_last(T* out, const float* part_acc, const float* part_ml,
                                                unsigned int* count, long long head0, int num_splits, int active,
                                                int head_dim, int lane) {
    __threadfence();
    __syncwarp();
    unsigned int last = 0;
    if (lane == 0) {
        last = atomicAdd(count, 1u) == (unsigned int)(active - 1);
        if (last) *count = 0u;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    combine_splits<T, G>(out, part_acc, part_ml, head0, num_splits, active, head_dim, lane);
}

template <typename T, int G, int U, bool PIPE>
__device__ __forceinline__ void attention_batch(T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache,
                                                const T* v_cache, const uint32_t* positions, const uint32_t* token_seq,
                                                const uint32_t* block_tables, int max_blocks, int block_size,
                                                int num_heads, int num_kv_heads, int head_dim, float scale, int window,
                                                int partition, int num_splits, unsigned int* done_counts) {
    constexpr int VEC = 16 / sizeof(T);
    extern __shared__ uint32_t table[];  // the split's block-table entries
    const int t = blockIdx.x, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kv_head = blockIdx.y * (blockDim.x >> 5) + warp;

    const int pos = positions[t];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int start = first + split * partition;
    const int end = min(pos + 1, start + partition);
    if (start >= end) return;  // uniform over the block: past this token's context
    const int active = (pos + 1 - first + partition - 1) / partition;

    const int table_first = start / block_size;
    const int entries = (end - 1) / block_size - table_first + 1;
    const uint32_t* row_table = block_tables + (long long)token_seq[t] * max_blocks + table_first;
    for (int i = threadIdx.x; i < entries; i += blockDim.x) table[i] = row_table[i];
    __syncthreads();
    if (kv_head >= num_kv_heads) return;

    const int lanes = head_dim / VEC;  // lanes per key row: a power of two <= 32
    const int rows = 32 / lanes;       // key rows per load instruction
    const int sub = lane % lanes, kg = lane / lanes;
    const int chunk = rows * U;
    const long long kv_stride = (long long)num_kv_heads * head_dim;
    const long long head_off = (long long)kv_head * head_dim + sub * VEC;

    // Queries pre-scaled into log2 units: softmax through exp2f.
    const float qscale = scale * 1.4426950408889634f;
    const long long q_base = ((long long)t * num_heads + (long long)kv_head * G) * head_dim + sub * VEC;
    float qf[G][VEC];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const uint4 raw = *reinterpret_cast<const uint4*>(q + q_base + (long long)g * head_dim);
        const T* qv = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < VEC; e++) qf[g][e] = to_f(qv[e]) * qscale;
    }
    float m[G], l[G], acc[G][VEC];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[g][e] = 0.f;
    }

    // PIPE: the next chunk's rows are requested before this chunk's are used (twice the
    // registers for the rows; measured no faster, kept for bench/gpu/micro/attention_bench).
    KvRows<U> next;
    if (PIPE) load_rows<T, U>(next, k_cache, v_cache, table, table_first, block_size, kv_stride, head_off, start, end, rows, kg);
    for (int c0 = start; c0 < end; c0 += chunk) {
        // Every key and value row of the chunk requested before the first is used.
        KvRows<U> r;
        if (PIPE) {
            r = next;
            if (c0 + chunk < end)
                load_rows<T, U>(next, k_cache, v_cache, table, table_first, block_size, kv_stride, head_off, c0 + chunk,
                                end, rows, kg);
        } else {
            load_rows<T, U>(r, k_cache, v_cache, table, table_first, block_size, kv_stride, head_off, c0, end, rows, kg);
        }
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const T* kv = reinterpret_cast<const T*>(&r.k[u]);
            float kf[VEC];
#pragma unroll
            for (int e = 0; e < VEC; e++) kf[e] = to_f(kv[e]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; e++) d += qf[g][e] * kf[e];
                for (int o = lanes >> 1; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = c0 + u * rows + kg < end ? d : -INFINITY;
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float cm = s[0][g];
#pragma unroll
            for (int u = 1; u < U; u++) cm = fmaxf(cm, s[u][g]);
            for (int o = 16; o >= lanes; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
            // cm is finite: the chunk's first position (kg 0, u 0) is inside the split.
            const float m_new = fmaxf(m[g], cm);
            const float alpha = exp2f(m[g] - m_new);  // 0 while m is -inf
            m[g] = m_new;
            l[g] *= alpha;
#pragma unroll
            for (int e = 0; e < VEC; e++) acc[g][e] *= alpha;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const T* vv = reinterpret_cast<const T*>(&r.v[u]);
            float vf[VEC];
#pragma unroll
            for (int e = 0; e < VEC; e++) vf[e] = to_f(vv[e]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float pr = exp2f(s[u][g] - m[g]);  // 0 for masked rows
                l[g] += pr;
#pragma unroll
                for (int e = 0; e < VEC; e++) acc[g][e] += pr * vf[e];
            }
        }
    }

    // Sum over the warp's row groups (the lanes with the same `sub`).
#pragma unroll
    for (int g = 0; g < G; g++) {
        for (int o = lanes; o < 32; o <<= 1) {
            l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
            for (int e = 0; e < VEC; e++) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        }
    }

    const long long head0 = (long long)t * num_heads + (long long)kv_head * G;
    if (active == 1) {
        if (kg == 0) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
                uint4 raw;
                T* ov = reinterpret_cast<T*>(&raw);
#pragma unroll
                for (int e = 0; e < VEC; e++) ov[e] = from_f<T>(acc[g][e] * inv);
                *reinterpret_cast<uint4*>(out + (head0 + g) * head_dim + sub * VEC) = raw;
            }
        }
        return;
    }

    constexpr float LN2 = 0.6931471805599453f;
    if (kg == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float* pa = part_acc + ((head0 + g) * num_splits + split) * head_dim + sub * VEC;
#pragma unroll
            for (int e = 0; e < VEC; e += 4)
                *reinterpret_cast<float4*>(pa + e) = make_float4(acc[g][e], acc[g][e + 1], acc[g][e + 2], acc[g][e + 3]);
            if (sub == 0) {
                part_ml[((head0 + g) * num_splits + split) * 2] = m[g] * LN2;
                part_ml[((head0 + g) * num_splits + split) * 2 + 1] = l[g];
            }
        }
    }
    combine_if_last<T, G>(out, part_acc, part_ml, done_counts + (long long)t * num_kv_heads + kv_head, head0,
                          num_splits, active, head_dim, lane);
}

// Tensor-core form for groups of 4 in bf16 / f16 (session 8; `attention_batch_g4_tc`, one
// warp per block; W2's decode cache at 3.3 TB/s where the form above reads 1.83): the same (token, KV head, split) work and the same partials and
// combine as above, but the G query heads are the first G rows of an m16n8k16 tile (the
// other rows zero), so scores Q·Kᵀ and sums P·V come from mma (32 per 16 positions)
// instead of per-lane dot products, 16-lane shuffle trees and per-element sums. The rows
// stream through shared memory 16 positions at a time, TC_STAGES slices in flight
// (cp.async, chunks swizzled so ldmatrix hits distinct banks); the online softmax runs in
// float32, log2 units, on the C fragments (4 lanes share a row).
#define TC_SLICE 16

// Slice [c0, c0 + 16) of one KV head's keys and values into stage `dst` (keys, then values;
// rows at or past `end` zero-filled). Chunk c of row r sits at chunk c ^ (r & 7).
template <typename T, int D>
__device__ __forceinline__ void tc_stage(T* dst, const T* k_cache, const T* v_cache, const uint32_t* table,
                                         int table_first, int block_size, long long kv_stride, long long head_off,
                                         int c0, int end, int lane) {
    constexpr int CHUNKS = D / 8;
    constexpr int PER_LANE = TC_SLICE * CHUNKS / 32;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int c = lane + 32 * i;
        const int row = c / CHUNKS, col = c % CHUNKS;
        const int p = c0 + row;
        const bool ok = p < end;
        const int pp = ok ? p : c0;
        const long long slot = (long long)table[pp / block_size - table_first] * block_size + pp % block_size;
        const long long off = slot * kv_stride + head_off + col * 8;
        const int at = row * D + ((col ^ (row & 7)) * 8);
        cp_async16(dst + at, k_cache + off, ok ? 16 : 0);
        cp_async16(dst + TC_SLICE * D + at, v_cache + off, ok ? 16 : 0);
    }
}

template <typename T, int D, int G, int STAGES>
__device__ __forceinline__ void attention_batch_tc(T* out, float* part_acc, float* part_ml, const T* q,
                                                   const T* k_cache, const T* v_cache, const uint32_t* positions,
                                                   const uint32_t* token_seq, const uint32_t* block_tables,
                                                   int max_blocks, int block_size, int num_heads, int num_kv_heads,
                                                   float scale, int window, int partition, int num_splits,
                                                   unsigned int* done_counts) {
    static_assert(G <= 8, "the group's heads are rows 0..7 of the tile");
    constexpr int KD = D / 16;  // k-steps of Q·Kᵀ
    constexpr int NC = D / 8;   // 8-column chunks of the output
    // Shared memory: STAGES slices of keys and values (16 * D each), then the table.
    extern __shared__ uint4 ab_smem[];
    T* stages = reinterpret_cast<T*>(ab_smem);
    uint32_t* table = reinterpret_cast<uint32_t*>(stages + STAGES * 2 * TC_SLICE * D);
    const int t = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;

    const int pos = positions[t];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int start = first + split * partition;
    const int end = min(pos + 1, start + partition);
    if (start >= end) return;
    const int active = (pos + 1 - first + partition - 1) / partition;
    const int table_first = start / block_size;
    const int entries = (end - 1) / block_size - table_first + 1;
    const uint32_t* row_table = block_tables + (long long)token_seq[t] * max_blocks + table_first;
    for (int i = lane; i < entries; i += 32) table[i] = row_table[i];
    __syncwarp();

    const long long kv_stride = (long long)num_kv_heads * D;
    const long long head_off = (long long)kv_head * D;
    const int slices = (end - start + TC_SLICE - 1) / TC_SLICE;
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) {
        if (i < slices)
            tc_stage<T, D>(stages + i * 2 * TC_SLICE * D, k_cache, v_cache, table, table_first, block_size, kv_stride,
                           head_off, start + i * TC_SLICE, end, lane);
        cp_async_commit();
    }

    // Query fragments: row g4 (a query head of the group, or zero past G), columns 2·t4
    // (+8) of each k-step; rows 8..15 are zero.
    const long long head0 = (long long)t * num_heads + (long long)kv_head * G;
    uint32_t qa[KD][2];
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
        const T* row = q + (head0 + g4) * D + kk * 16 + 2 * t4;
        qa[kk][0] = g4 < G ? *reinterpret_cast<const uint32_t*>(row) : 0u;
        qa[kk][1] = g4 < G ? *reinterpret_cast<const uint32_t*>(row + 8) : 0u;
    }
    const float sl2 = scale * 1.4426950408889634f;
    float o[NC][4];
#pragma unroll
    for (int j = 0; j < NC; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m = -INFINITY, l = 0.f;  // row g4's

    for (int i = 0; i < slices; i++) {
        const int j_next = i + STAGES - 1;
        if (j_next < slices)
            tc_stage<T, D>(stages + (j_next % STAGES) * 2 * TC_SLICE * D, k_cache, v_cache, table, table_first,
                           block_size, kv_stride, head_off, start + j_next * TC_SLICE, end, lane);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();  // every lane's copies of slice i landed
        const T* ks = stages + (i % STAGES) * 2 * TC_SLICE * D;
        const T* vs = ks + TC_SLICE * D;
        const int c0 = start + i * TC_SLICE;

        // Scores of the slice's 16 positions: n-tile j = positions 8j..8j+7.
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const int r = 8 * j + (lane & 7);
#pragma unroll
            for (int kk = 0; kk < KD; kk += 2) {
                // Four 8x8 matrices: chunks 2kk .. 2kk + 3 of rows r (keys as the B operand).
                const int chunk = 2 * kk + (lane >> 3);
                uint32_t b[4];
                ldmatrix_x4(b, ks + r * D + ((chunk ^ (r & 7)) * 8));
                const uint32_t a0[4] = {qa[kk][0], 0u, qa[kk][1], 0u};
                const uint32_t a1[4] = {qa[kk + 1][0], 0u, qa[kk + 1][1], 0u};
                mma_16816<T>(s[j], a0, b[0], b[1]);
                mma_16816<T>(s[j], a1, b[2], b[3]);
            }
        }
        // Row g4's scores (elements 0, 1 of each n-tile), masked past the split's end.
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int kp = c0 + 8 * j + 2 * t4 + e;
                s[j][e] = kp < end ? s[j][e] * sl2 : -INFINITY;
                mx = fmaxf(mx, s[j][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // mx is finite: the slice's first position is inside the split.
        const float m_new = fmaxf(m, mx);
        const float alpha = exp2f(m - m_new);  // 0 while m is -inf
        m = m_new;
        l *= alpha;
#pragma unroll
        for (int j = 0; j < NC; j++) {
            o[j][0] *= alpha;
            o[j][1] *= alpha;
        }
        float pr[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                pr[j][e] = exp2f(s[j][e] - m);
                l += pr[j][e];
            }
        }
        // P as the A operand (row g4; rows 8..15 zero) over the slice's 16 positions.
        const uint32_t pa[4] = {pack2<T>(pr[0][0], pr[0][1]), 0u, pack2<T>(pr[1][0], pr[1][1]), 0u};
        const int vr = lane & 15;
#pragma unroll
        for (int jj = 0; jj < NC / 2; jj++) {
            const int chunk = 2 * jj + (lane >> 4);
            uint32_t b[4];
            ldmatrix_x4_trans(b, vs + vr * D + ((chunk ^ (vr & 7)) * 8));
            mma_16816<T>(o[2 * jj], pa, b[0], b[1]);
            mma_16816<T>(o[2 * jj + 1], pa, b[2], b[3]);
        }
        __syncwarp();  // every lane is done with this stage before it is refilled
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    // Row g4 holds dims 8j + 2·t4 (+1) of query head g4.
    if (active == 1) {
        if (g4 < G) {
            const float inv = l > 0.f ? 1.f / l : 0.f;
            T* row = out + (head0 + g4) * D + 2 * t4;
#pragma unroll
            for (int j = 0; j < NC; j++)
                *reinterpret_cast<uint32_t*>(row + 8 * j) = pack2<T>(o[j][0] * inv, o[j][1] * inv);
        }
        return;
    }
    constexpr float LN2 = 0.6931471805599453f;
    if (g4 < G) {
        float* pa_out = part_acc + ((head0 + g4) * num_splits + split) * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < NC; j++) *reinterpret_cast<float2*>(pa_out + 8 * j) = make_float2(o[j][0], o[j][1]);
        if (t4 == 0) {
            part_ml[((head0 + g4) * num_splits + split) * 2] = m * LN2;
            part_ml[((head0 + g4) * num_splits + split) * 2 + 1] = l;
        }
    }
    combine_if_last<T, G>(out, part_acc, part_ml, done_counts + (long long)t * num_kv_heads + kv_head, head0,
                          num_splits, active, D, lane);
}

// Per storage type and group size G (query heads per KV head): U rows per pass and MINB
// resident blocks per SM. Groups 1 and 2 are capped at 80 registers (6 blocks per SM; no
// spills): measured 4-10% faster per layer than 96 registers (5 blocks). Group 4 holds
// twice the queries and sums: in bf16/f16, 4 rows per pass capped at 128 registers (4
// blocks, no spill) read W2's decode cache at 1.84 TB/s where 2 rows uncapped (135
// registers, 3 blocks) read 1.33 (micro/attention_w2.cu, bench/RESULTS.md); that form stays
// as attention_batch_g4_u2 (VLLM_ATT_G4=u2) to compare. f32 keeps 2 rows uncapped.
#define AB_INSTANTIATE(NAME, SUFFIX, T, G, U, MINB)                                                                     \
    extern "C" __global__ void __launch_bounds__(AB_MAX_WARPS * 32, MINB) NAME##_##SUFFIX(                             \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits, unsigned int* done_counts) {                                                                    \
        attention_batch<T, G, U, false>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,             \
                                        block_tables, max_blocks, block_size, num_heads, num_kv_heads, head_dim,       \
                                        scale, window, partition, num_splits, done_counts);                             \
    }
#define AB_INSTANTIATE_GROUPS(SUFFIX, T, G4_U, G4_MINB)                 \
    AB_INSTANTIATE(attention_batch_g1, SUFFIX, T, 1, 4, 6)              \
    AB_INSTANTIATE(attention_batch_g2, SUFFIX, T, 2, 4, 6)              \
    AB_INSTANTIATE(attention_batch_g4, SUFFIX, T, 4, G4_U, G4_MINB)     \
    AB_INSTANTIATE(attention_batch_g4_u2, SUFFIX, T, 4, 2, 1)

AB_INSTANTIATE_GROUPS(f32, float, 2, 1)
AB_INSTANTIATE_GROUPS(bf16, __nv_bfloat16, 4, 4)
AB_INSTANTIATE_GROUPS(f16, __half, 4, 4)

// The tensor-core form of group 4 (bf16 / f16, head_dim 64 or 128; the engine's default for
// them since session 8, VLLM_ATT_G4=u4 for the form above): one warp per block, TC_STAGES
// slices in flight (2 measured best of 2-4, 168 registers best of 96-168: micro/attention_w2.cu). Shared memory (backend/cuda/attention_batch.rs,
// TC_STAGE_BYTES): TC_STAGES * 2 * 16 * head_dim * 2 bytes, then the table.
#define TC_STAGES 2
#define TC_INSTANTIATE(SUFFIX, T, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32, 12) attention_batch_g4_tc_d##D##_##SUFFIX(                        \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits, unsigned int* done_counts) {                                                                    \
        (void)head_dim;                                                                                                 \
        attention_batch_tc<T, D, 4, TC_STAGES>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,     \
                                               block_tables, max_blocks, block_size, num_heads, num_kv_heads, scale,  \
                                               window, partition, num_splits, done_counts);                           \
    }
TC_INSTANTIATE(bf16, __nv_bfloat16, 64)
TC_INSTANTIATE(bf16, __nv_bfloat16, 128)
TC_INSTANTIATE(f16, __half, 64)
TC_INSTANTIATE(f16, __half, 128)
