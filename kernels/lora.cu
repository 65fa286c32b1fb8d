// Multi-LoRA on the GPU (the Punica / S-LoRA design): every row of a forward batch names a
// resident adapter slot (row_slot[r] < num_slots) or none, and the deltas of all adapters
// are added by one launch per fused projection, never by merging weights. Each block takes
// one (row, part) and does both halves, the rank-sized intermediate in shared memory:
//   shrink: mid[:rank] = x[r] · A_p(slot)ᵀ                      (A [rank, in])
//   expand: y[r, off_p + c] += mid[:rank] · Bt_p(slot)[:, c]    (Bt = (scale·B)ᵀ [rank, out])
// p runs over the parts of a fused projection (q/k/v, gate/up: up to 3). The adapters live
// in a table of (A address, Bt address, rank) per (layer, target, slot), rank 0 where an
// adapter has no pair for that target; on the device every rank is padded with zero rows to
// a multiple of LORA_RANK_TILE, so the tile loops below have no per-rank guard (with a guard
// per rank the loads were issued one round trip at a time: W1 ratio 0.775 instead of 0.894).
// Storage in float32/bfloat16/float16, sums in float32.
//
// Why one fused kernel with 16-byte loads: at decode sizes the LoRA work is latency-bound
// (a few KiB per row), so what counts is launches per step and dependent memory rounds per
// thread. One launch instead of a shrink and an expand halves the launches; 16-byte loads
// of x and A (and of Bt and y) make the shrink 1-2 rounds of independent loads for `in` up
// to 4096 instead of ⌈in/128⌉ rounds of 2-byte ones.

#include "common.cuh"

#define LORA_TARGETS 7
// Must match THREADS and RANK_TILE in backend/cuda/lora.rs (the dynamic shared memory is
// the max rank rounded up to the tile, in floats).
#define LORA_THREADS 256
#define LORA_RANK_TILE 16

// Up to three parts of one fused projection, passed by value.
struct LoraParts {
    int target[3];
    int offset[3];
    int out_features[3];
};

// v[p] without copying the by-value struct to local memory (p is not a constant).
__device__ __forceinline__ int lora_pick(const int (&v)[3], int p) { return p == 0 ? v[0] : p == 1 ? v[1] : v[2]; }

// The (A, Bt, rank) entry of `slot` for `target` of `layer`; rank 0: nothing to add.
__device__ __forceinline__ const unsigned long long* lora_entry(const unsigned long long* table, int num_slots,
                                                                int layer, int target, int slot) {
    return table + 3ll * (((long long)layer * LORA_TARGETS + target) * num_slots + slot);
}

// V consecutive elements: `fetch` issues the load (one 16-byte load when V > 1, the caller
// checked the alignment; one element otherwise), `get` converts to floats after it, so a
// caller can issue a whole tile of fetches before the first use.
template <typename T, int V> struct Chunk {
    static_assert(V * sizeof(T) == 16, "a chunk is 16 bytes");
    using Raw = uint4;
    __device__ __forceinline__ static Raw fetch(const T* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
    __device__ __forceinline__ static float get(const Raw& u, int k) {
        return to_f<T>(reinterpret_cast<const T*>(&u)[k]);
    }
    // p[k] += d[k], rounded once to the storage type.
    __device__ __forceinline__ static void add(T* p, const float (&d)[V]) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int k = 0; k < V; ++k) e[k] = from_f<T>(to_f<T>(e[k]) + d[k]);
        *reinterpret_cast<uint4*>(p) = u;
    }
};
template <typename T> struct Chunk<T, 1> {
    using Raw = T;
    __device__ __forceinline__ static Raw fetch(const T* p) { return *p; }
    __device__ __forceinline__ static float get(const Raw& u, int) { return to_f<T>(u); }
    __device__ __forceinline__ static void add(T* p, const float (&d)[1]) { *p = from_f<T>(to_f<T>(*p) + d[0]); }
};

// One (row, part): the shrink into `mid` (each thread keeps LORA_RANK_TILE partial sums
// over a block-strided walk of `in`, V elements per load, so its A loads are independent;
// then a block reduction), then the expand, V columns per thread. `rank` is a multiple of
// LORA_RANK_TILE (zero-padded on the device).
template <typename T, int V>
__device__ __forceinline__ void lora_row(T* yr, const T* xr, const T* a, const T* bt, int rank, int in_features,
                                         int out_features, float* mid) {
    __shared__ float red[LORA_THREADS / 32][LORA_RANK_TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int step = blockDim.x * V;
    for (int j0 = 0; j0 < rank; j0 += LORA_RANK_TILE) {
        float acc[LORA_RANK_TILE];
#pragma unroll
        for (int jj = 0; jj < LORA_RANK_TILE; ++jj) acc[jj] = 0.f;
        for (int i = threadIdx.x * V; i < in_features; i += step) {
            // All LORA_RANK_TILE loads first (independent, one round trip), then the sums.
            const typename Chunk<T, V>::Raw xv = Chunk<T, V>::fetch(xr + i);
            typename Chunk<T, V>::Raw av[LORA_RANK_TILE];
#pragma unroll
            for (int jj = 0; jj < LORA_RANK_TILE; ++jj)
                av[jj] = Chunk<T, V>::fetch(a + (long long)(j0 + jj) * in_features + i);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float xk = Chunk<T, V>::get(xv, k);
#pragma unroll
                for (int jj = 0; jj < LORA_RANK_TILE; ++jj) acc[jj] += xk * Chunk<T, V>::get(av[jj], k);
            }
        }
#pragma unroll
        for (int jj = 0; jj < LORA_RANK_TILE; ++jj) {
            const float v = warp_sum(acc[jj]);
            if (lane == 0) red[warp][jj] = v;
        }
        __syncthreads();
        if (threadIdx.x < LORA_RANK_TILE) {
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += red[w][threadIdx.x];
            mid[j0 + threadIdx.x] = s;
        }
        // Also publishes mid to the expand after the last tile.
        __syncthreads();
    }
    for (int c = threadIdx.x * V; c < out_features; c += step) {
        float acc[V];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = 0.f;
        for (int j0 = 0; j0 < rank; j0 += LORA_RANK_TILE) {
            typename Chunk<T, V>::Raw bv[LORA_RANK_TILE];
#pragma unroll
            for (int jj = 0; jj < LORA_RANK_TILE; ++jj)
                bv[jj] = Chunk<T, V>::fetch(bt + (long long)(j0 + jj) * out_features + c);
#pragma unroll
            for (int jj = 0; jj < LORA_RANK_TILE; ++jj) {
                const float m = mid[j0 + jj];
#pragma unroll
                for (int k = 0; k < V; ++k) acc[k] += m * Chunk<T, V>::get(bv[jj], k);
            }
        }
        Chunk<T, V>::add(yr + c, acc);
    }
}

// Grid (row, part), LORA_THREADS threads, dynamic shared memory: the max rank rounded up to
// LORA_RANK_TILE floats. Rows on the base model and targets the slot's adapter lacks return
// at once. The 16-byte path is taken per block when every address and width allows it
// (always for the decoders' contiguous activations and the adapters' own allocations).
template <typename T>
__device__ void lora_apply(T* y, const T* x, const uint32_t* row_slot, const unsigned long long* table, int num_slots,
                           int layer, LoraParts parts, int in_features, int y_width) {
    extern __shared__ float mid[];
    constexpr int V = 16 / sizeof(T);
    const int r = blockIdx.x, p = blockIdx.y;
    const uint32_t slot = row_slot[r];
    if (slot >= (uint32_t)num_slots) return;
    const unsigned long long* e = lora_entry(table, num_slots, layer, lora_pick(parts.target, p), slot);
    const int rank = (int)e[2];
    // Uniform over the block, so returning before __syncthreads is safe.
    if (rank == 0) return;
    const T* a = reinterpret_cast<const T*>(e[0]);
    const T* bt = reinterpret_cast<const T*>(e[1]);
    const int out_features = lora_pick(parts.out_features, p);
    const T* xr = x + (long long)r * in_features;
    T* yr = y + (long long)r * y_width + lora_pick(parts.offset, p);
    const unsigned long long addr = (unsigned long long)xr | (unsigned long long)yr | e[0] | e[1];
    const bool wide = (addr & 15) == 0 && in_features % V == 0 && out_features % V == 0;
    if (wide)
        lora_row<T, V>(yr, xr, a, bt, rank, in_features, out_features, mid);
    else
        lora_row<T, 1>(yr, xr, a, bt, rank, in_features, out_features, mid);
}

#define LORA_INSTANTIATE(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_apply_##SUFFIX(                                  \
        T* y, const T* x, const uint32_t* row_slot, const unsigned long long* table, int num_slots, int layer,       \
        LoraParts parts, int in_features, int y_width) {                                                             \
        lora_apply<T>(y, x, row_slot, table, num_slots, layer, parts, in_features, y_width);                         \
    }

LORA_INSTANTIATE(f32, float)
LORA_INSTANTIATE(bf16, __nv_bfloat16)
LORA_INSTANTIATE(f16, __half)
