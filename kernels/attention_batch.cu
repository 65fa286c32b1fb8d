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
// Staged form (S > 0; group 4's default since session 8, for W2's short contexts): the
// rows of a pass are not loaded into registers but copied into the lane's own slots of a
// per-warp ring of S stages in shared memory (cp.async), S - 1 passes ahead of the one in
// use: a warp keeps (S - 1) * U KiB in flight through its arithmetic instead of issuing a
// pass, waiting a DRAM round trip, and computing with nothing in flight.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim] (see ops.cu).

#include "common.cuh"

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

// The staged form's copy engine: 16 bytes global -> shared without registers (cp.async).
__device__ __forceinline__ void ab_cp_async16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void ab_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ab_cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Staged form: the rows load_rows would read, copied into this lane's own slots of stage
// `stage` of the warp's ring (each lane later reads back exactly what it copied, so no
// barrier is needed, only the lane's own cp.async groups).
template <typename T, int U>
__device__ __forceinline__ void stage_rows(uint4* ring, const T* k_cache, const T* v_cache, const uint32_t* table,
                                          int table_first, int block_size, long long kv_stride, long long head_off,
                                          int c0, int end, int rows, int kg, int lane) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int p0 = c0 + u * rows + kg;
        const int p = p0 < end ? p0 : c0;
        const long long slot = (long long)table[p / block_size - table_first] * block_size + p % block_size;
        const long long off = slot * kv_stride + head_off;
        ab_cp_async16(ring + (2 * u) * 32 + lane, k_cache + off);
        ab_cp_async16(ring + (2 * u + 1) * 32 + lane, v_cache + off);
    }
}

template <typename T, int G, int U, bool PIPE, int S = 0>
__device__ __forceinline__ void attention_batch(T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache,
                                                const T* v_cache, const uint32_t* positions, const uint32_t* token_seq,
                                                const uint32_t* block_tables, int max_blocks, int block_size,
                                                int num_heads, int num_kv_heads, int head_dim, float scale, int window,
                                                int partition, int num_splits, unsigned int* done_counts) {
    constexpr int VEC = 16 / sizeof(T);
    // Shared memory: S > 0: the warps' rings of S stages (U key and U value rows of 16-byte
    // lane slots each: S * U KiB a warp), then the split's block-table entries.
    extern __shared__ uint4 ab_smem[];
    uint4* rings = ab_smem;
    uint32_t* table = reinterpret_cast<uint32_t*>(ab_smem + (S > 0 ? (blockDim.x >> 5) * S * U * 64 : 0));
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
    const int chunks = (end - start + chunk - 1) / chunk;
    uint4* ring = rings + warp * (S > 0 ? S * U * 64 : 0);
    if constexpr (S > 0) {
        // The first S - 1 chunks requested before anything else (a group per chunk, empty
        // past the split's end, so that group i is always chunk i).
#pragma unroll
        for (int i = 0; i < S - 1; i++) {
            if (i < chunks)
                stage_rows<T, U>(ring + i * U * 64, k_cache, v_cache, table, table_first, block_size, kv_stride,
                                 head_off, start + i * chunk, end, rows, kg, lane);
            ab_cp_commit();
        }
    }

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
    for (int c0 = start, i = 0; c0 < end; c0 += chunk, i++) {
        // Every key and value row of the chunk requested before the first is used.
        KvRows<U> r;
        const uint4* st = ring + (i % (S > 0 ? S : 1)) * U * 64;  // S > 0: this chunk's stage
        if constexpr (S > 0) {
            // Chunk i + S - 1 into the stage chunk i - 1 left (this lane read it last pass),
            // then wait for chunk i only: S - 1 chunks stay in flight while this one is used.
            const int j = i + S - 1;
            if (j < chunks)
                stage_rows<T, U>(ring + (j % S) * U * 64, k_cache, v_cache, table, table_first, block_size, kv_stride,
                                 head_off, start + j * chunk, end, rows, kg, lane);
            ab_cp_commit();
            ab_cp_wait<S - 1>();
            // Keys now, values only when they are used (fewer registers).
#pragma unroll
            for (int u = 0; u < U; u++) r.k[u] = st[(2 * u) * 32 + lane];
        } else if (PIPE) {
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
            if constexpr (S > 0) r.v[u] = st[(2 * u + 1) * 32 + lane];
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
    // The last split of this (token, KV head) to finish combines all of them.
    __threadfence();
    __syncwarp();
    unsigned int last = 0;
    if (lane == 0) {
        unsigned int* count = done_counts + (long long)t * num_kv_heads + kv_head;
        last = atomicAdd(count, 1u) == (unsigned int)(active - 1);
        if (last) *count = 0u;
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    // Each lane combines VEC dims of one query head: G * lanes pieces over 32 lanes.
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
// The staged form (S stages of U rows per pass through shared memory, cp.async).
#define AB_INSTANTIATE_STAGED(NAME, SUFFIX, T, G, U, S, MINB)                                                           \
    extern "C" __global__ void __launch_bounds__(AB_MAX_WARPS * 32, MINB) NAME##_##SUFFIX(                             \
        T* out, float* part_acc, float* part_ml, const T* q, const T* k_cache, const T* v_cache,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,            \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,         \
        int num_splits, unsigned int* done_counts) {                                                                    \
        attention_batch<T, G, U, false, S>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,          \
                                           block_tables, max_blocks, block_size, num_heads, num_kv_heads, head_dim,    \
                                           scale, window, partition, num_splits, done_counts);                          \
    }
#define AB_INSTANTIATE_GROUPS(SUFFIX, T, G4_U, G4_MINB)                                  \
    AB_INSTANTIATE(attention_batch_g1, SUFFIX, T, 1, 4, 6)                               \
    AB_INSTANTIATE(attention_batch_g2, SUFFIX, T, 2, 4, 6)                               \
    AB_INSTANTIATE_STAGED(attention_batch_g4, SUFFIX, T, 4, AB_G4_U, AB_G4_S, AB_G4_MINB) \
    AB_INSTANTIATE(attention_batch_g4_u4, SUFFIX, T, 4, G4_U, G4_MINB)                   \
    AB_INSTANTIATE(attention_batch_g4_u2, SUFFIX, T, 4, 2, 1)

// Group 4's default, staged: rows per pass, stages (must match G4_STAGED_BYTES_PER_WARP in
// backend/cuda/attention_batch.rs: S * U KiB a warp), resident blocks per SM (5: 96
// registers; 5 rings of 40 KiB fit an SM's shared memory).
#define AB_G4_U 2
#define AB_G4_S 5
#define AB_G4_MINB 5
AB_INSTANTIATE_GROUPS(f32, float, 2, 1)
AB_INSTANTIATE_GROUPS(bf16, __nv_bfloat16, 4, 4)
AB_INSTANTIATE_GROUPS(f16, __half, 4, 4)
