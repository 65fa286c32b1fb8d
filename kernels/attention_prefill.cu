// Paged attention for prefill chunks (many query tokens per sequence), flash style on the
// tensor cores: bf16 / f16, head_dim 64 or 128.
//
// attention_batch.cu gives every query token its own pass over its whole context, so a
// chunk of 8,192 prompt tokens reads each key and value row once per later token of its
// sequence (W1: ~11 GB per layer and chunk, from L2 at best). Here a block of 4 warps takes
// a tile of consecutive query tokens of one sequence and one KV head: each warp holds 16
// query rows, (token, query head of the group) pairs, so the group's heads share every
// key and value load; the tile's keys and values stream through shared memory 64
// positions at a time (cp.async, keys of the next tile loading while the values of this
// one are used), scores Q·Kᵀ and outputs P·V come from mma.m16n8k16 with float32 sums,
// and the online softmax runs in float32 (log2 units). Rows past the tile (fewer tokens,
// or a group that does not divide 16) are masked everywhere and never written.
//
// The host lists the tiles (first token, token count) of each step's sequences; the
// tokens of a tile belong to one sequence (causal: each row masks keys past its position,
// and before its window).
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim] (see ops.cu).

#include "common.cuh"
#include "mma.cuh"

#define AP_WARPS 4
#define AP_KEYS 64

// Rows k0..k0+63 of one KV head's cache into shared memory (rows at or past `end` zeroed).
template <typename T, int D, int STRIDE>
__device__ __forceinline__ void load_tile(T* dst, const T* cache, const uint32_t* table, int block_size,
                                          long long kv_stride, long long head_off, int k0, int end) {
    constexpr int CHUNKS = D / 8;  // 16-byte pieces per row
    constexpr int PER_THREAD = AP_KEYS * CHUNKS / (AP_WARPS * 32);
#pragma unroll
    for (int i = 0; i < PER_THREAD; i++) {
        const int c = threadIdx.x + i * AP_WARPS * 32;
        const int row = c / CHUNKS, col = c % CHUNKS;
        const int p = k0 + row;
        const bool ok = p < end;
        const int pp = ok ? p : k0;  // k0 < end: a valid address
        const long long slot = (long long)table[pp / block_size] * block_size + pp % block_size;
        cp_async16(dst + row * STRIDE + col * 8, cache + slot * kv_stride + head_off + col * 8, ok ? 16 : 0);
    }
}

template <typename T, int D>
__device__ __forceinline__ void attention_prefill(T* out, const T* q, const T* k_cache, const T* v_cache,
                                                  const uint32_t* positions, const uint32_t* token_seq,
                                                  const uint32_t* block_tables, int max_blocks, int block_size,
                                                  int num_heads, int num_kv_heads, float scale, int window,
                                                  const uint32_t* tiles) {
    constexpr int STRIDE = D + 8;  // padded rows: the fragment reads below hit 32 distinct banks
    constexpr int KD = D / 16;     // k-steps of Q·Kᵀ
    constexpr int NC = D / 8;      // 8-column chunks of the output
    __shared__ __align__(16) T ks[AP_KEYS * STRIDE];
    __shared__ __align__(16) T vs[AP_KEYS * STRIDE];
    __shared__ int range[2];

    const int tile = blockIdx.x, kv_head = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g4 = lane >> 2, t4 = lane & 3;
    const int G = num_heads / num_kv_heads;
    const int tpw = 16 / G;  // tokens per warp
    const int t0 = (int)tiles[2 * tile], count = (int)tiles[2 * tile + 1];
    const int seq = (int)token_seq[t0];

    // The keys any row of the tile attends to: [klo, khi).
    if (threadIdx.x == 0) {
        range[0] = 0x7fffffff;
        range[1] = 0;
    }
    __syncthreads();
    if ((int)threadIdx.x < count) {
        const int p = (int)positions[t0 + threadIdx.x];
        atomicMin(&range[0], window > 0 ? max(0, p + 1 - window) : 0);
        atomicMax(&range[1], p + 1);
    }
    __syncthreads();
    const int klo = range[0], khi = range[1];

    // This thread's two rows (r = g4 and g4 + 8 of the warp): position and window start;
    // position -1 masks every key (a row past the tile).
    int pos[2], lo[2], tok[2], head[2];
    int warp_lo = 0x7fffffff, warp_hi = 0;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = g4 + 8 * h;
        const int local = warp * tpw + r / G;
        const bool valid = r < tpw * G && local < count;
        tok[h] = t0 + local;
        head[h] = kv_head * G + r % G;
        pos[h] = valid ? (int)positions[tok[h]] : -1;
        lo[h] = valid ? (window > 0 ? max(0, pos[h] + 1 - window) : 0) : 0x7fffffff;
    }
    // The warp's key range (uniform over the warp): tiles outside it skip the math.
    {
        int wl = min(lo[0], lo[1]), wh = max(pos[0], pos[1]) + 1;
        for (int o = 16; o > 0; o >>= 1) {
            wl = min(wl, __shfl_xor_sync(0xffffffffu, wl, o));
            wh = max(wh, __shfl_xor_sync(0xffffffffu, wh, o));
        }
        warp_lo = wl;
        warp_hi = wh;
    }

    // Query fragments (A of m16n8k16: rows g4 / g4 + 8, columns 2·t4 (+8) of each k-step).
    uint32_t qa[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const bool valid = pos[h] >= 0;
            const T* row = q + ((long long)tok[h] * num_heads + head[h]) * D + kk * 16 + 2 * t4;
            qa[kk][h] = valid ? *reinterpret_cast<const uint32_t*>(row) : 0u;
            qa[kk][2 + h] = valid ? *reinterpret_cast<const uint32_t*>(row + 8) : 0u;
        }
    }

    float o[NC][4];
#pragma unroll
    for (int j = 0; j < NC; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const float sl2 = scale * 1.4426950408889634f;

    const long long kv_stride = (long long)num_kv_heads * D;
    const long long head_off = (long long)kv_head * D;
    const uint32_t* table = block_tables + (long long)seq * max_blocks;

    load_tile<T, D, STRIDE>(ks, k_cache, table, block_size, kv_stride, head_off, klo, khi);
    cp_async_commit();
    load_tile<T, D, STRIDE>(vs, v_cache, table, block_size, kv_stride, head_off, klo, khi);
    cp_async_commit();

    for (int k0 = klo; k0 < khi; k0 += AP_KEYS) {
        const bool active = k0 < warp_hi && k0 + AP_KEYS > warp_lo;
        cp_async_wait<1>();  // this tile's keys
        __syncthreads();
        float s[8][4];
        if (active) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
                const T* krow = ks + (8 * j + g4) * STRIDE + 2 * t4;
#pragma unroll
                for (int kk = 0; kk < KD; kk++) {
                    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
                    mma_16816<T>(s[j], qa[kk], b0, b1);
                }
            }
        }
        __syncthreads();  // every warp is done with ks
        if (k0 + AP_KEYS < khi)
            load_tile<T, D, STRIDE>(ks, k_cache, table, block_size, kv_stride, head_off, k0 + AP_KEYS, khi);
        cp_async_commit();

        uint32_t pa[4][4];
        if (active) {
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int h = e >> 1;
                    const int kp = k0 + 8 * j + 2 * t4 + (e & 1);
                    const bool ok = kp <= pos[h] && kp >= lo[h];
                    s[j][e] = ok ? s[j][e] * sl2 : -INFINITY;
                    mx[h] = fmaxf(mx[h], s[j][e]);
                }
            }
            float alpha[2], base[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m_new = fmaxf(m[h], mx[h]);
                // Nothing seen yet (-inf): no rescale, and every p is exp2(-inf) = 0.
                base[h] = m_new == -INFINITY ? 0.f : m_new;
                alpha[h] = exp2f(m[h] - base[h]);
                m[h] = m_new;
                l[h] *= alpha[h];
            }
#pragma unroll
            for (int j = 0; j < NC; j++) {
                o[j][0] *= alpha[0];
                o[j][1] *= alpha[0];
                o[j][2] *= alpha[1];
                o[j][3] *= alpha[1];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[j][e] = exp2f(s[j][e] - base[e >> 1]);
                    l[e >> 1] += s[j][e];
                }
            }
            // P as A fragments over the 64 keys: k-step kk2 covers score chunks 2·kk2, 2·kk2 + 1.
#pragma unroll
            for (int kk2 = 0; kk2 < 4; kk2++) {
                pa[kk2][0] = pack2<T>(s[2 * kk2][0], s[2 * kk2][1]);
                pa[kk2][1] = pack2<T>(s[2 * kk2][2], s[2 * kk2][3]);
                pa[kk2][2] = pack2<T>(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]);
                pa[kk2][3] = pack2<T>(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3]);
            }
        }

        cp_async_wait<1>();  // this tile's values
        __syncthreads();
        if (active) {
#pragma unroll
            for (int kk2 = 0; kk2 < 4; kk2++) {
                const T* vrow = vs + (16 * kk2 + (lane & 15)) * STRIDE + 8 * (lane >> 4);
#pragma unroll
                for (int jj = 0; jj < NC / 2; jj++) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, vrow + 16 * jj);
                    mma_16816<T>(o[2 * jj], pa[kk2], b[0], b[1]);
                    mma_16816<T>(o[2 * jj + 1], pa[kk2], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with vs
        if (k0 + AP_KEYS < khi)
            load_tile<T, D, STRIDE>(vs, v_cache, table, block_size, kv_stride, head_off, k0 + AP_KEYS, khi);
        cp_async_commit();
    }

#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (pos[h] < 0) continue;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        T* row = out + ((long long)tok[h] * num_heads + head[h]) * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < NC; j++)
            *reinterpret_cast<uint32_t*>(row + 8 * j) = pack2<T>(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
    }
}

#define AP_INSTANTIATE(SUFFIX, T, D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(AP_WARPS * 32, 2) attention_prefill_d##D##_##SUFFIX(                 \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions, const uint32_t* token_seq, \
        const uint32_t* block_tables, int max_blocks, int block_size, int num_heads, int num_kv_heads, float scale,   \
        int window, const uint32_t* tiles) {                                                                           \
        attention_prefill<T, D>(out, q, k_cache, v_cache, positions, token_seq, block_tables, max_blocks, block_size, \
                                num_heads, num_kv_heads, scale, window, tiles);                                        \
    }

AP_INSTANTIATE(bf16, __nv_bfloat16, 64)
AP_INSTANTIATE(bf16, __nv_bfloat16, 128)
AP_INSTANTIATE(f16, __half, 64)
AP_INSTANTIATE(f16, __half, 128)
