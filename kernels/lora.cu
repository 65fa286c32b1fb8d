// Multi-LoRA on the GPU (the Punica / S-LoRA design): every row of a forward batch names a
// resident adapter slot (row_slot[r] < num_slots) or none, and the deltas of all adapters
// are added in two launches per fused projection, never by merging weights:
//   shrink: mid[p, r, :rank] = x[r] · A_p(slot)ᵀ          (A [rank, in])
//   expand: y[r, off_p + c] += mid[p, r, :rank] · Bt_p(slot)[:, c]   (Bt = (scale·B)ᵀ [rank, out])
// p runs over the parts of a fused projection (q/k/v, gate/up: up to 3). The adapters live
// in a table of (A address, Bt address, rank) per (layer, target, slot), rank 0 where an
// adapter has no pair for that target. Storage in float32/bfloat16/float16, sums in float32.

#include "common.cuh"

#define LORA_TARGETS 7
// Must match SHRINK_THREADS and EXPAND_THREADS in backend/cuda/lora.rs.
#define LORA_SHRINK_THREADS 128
#define LORA_EXPAND_THREADS 256

// Up to three parts of one fused projection, passed by value.
struct LoraParts {
    int target[3];
    int offset[3];
    int out_features[3];
};

// The (A, Bt, rank) entry of `slot` for `target` of `layer`; rank 0: nothing to add.
__device__ __forceinline__ const unsigned long long* lora_entry(const unsigned long long* table, int num_slots,
                                                                int layer, int target, int slot) {
    return table + 3ll * (((long long)layer * LORA_TARGETS + target) * num_slots + slot);
}

// Ranks are processed in tiles of this many: each thread keeps one partial sum per rank
// of the tile in registers, so its loads of A are independent (issued back to back).
#define LORA_RANK_TILE 16

// One block per (row, part). Each thread strides over `in` (x read once per tile), keeps
// LORA_RANK_TILE partial dot products, then the block reduces each (warp shuffles, then
// one float per warp and rank in shared memory).
template <typename T>
__device__ void lora_shrink(float* mid, const T* x, const uint32_t* row_slot, const unsigned long long* table,
                            int num_slots, int layer, LoraParts parts, int rows, int in_features, int max_rank) {
    __shared__ float red[LORA_SHRINK_THREADS / 32][LORA_RANK_TILE];
    const int r = blockIdx.x, p = blockIdx.y;
    const uint32_t slot = row_slot[r];
    if (slot >= (uint32_t)num_slots) return;
    const unsigned long long* e = lora_entry(table, num_slots, layer, parts.target[p], slot);
    const int rank = (int)e[2];
    // Uniform over the block, so returning before __syncthreads is safe.
    if (rank == 0) return;
    const T* a = reinterpret_cast<const T*>(e[0]);
    const T* xr = x + (long long)r * in_features;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* out = mid + ((long long)p * rows + r) * max_rank;
    for (int j0 = 0; j0 < rank; j0 += LORA_RANK_TILE) {
        float acc[LORA_RANK_TILE];
#pragma unroll
        for (int jj = 0; jj < LORA_RANK_TILE; ++jj) acc[jj] = 0.f;
        for (int i = threadIdx.x; i < in_features; i += blockDim.x) {
            const float xv = to_f<T>(xr[i]);
#pragma unroll
            for (int jj = 0; jj < LORA_RANK_TILE; ++jj)
                if (j0 + jj < rank) acc[jj] += xv * to_f<T>(a[(long long)(j0 + jj) * in_features + i]);
        }
#pragma unroll
        for (int jj = 0; jj < LORA_RANK_TILE; ++jj) {
            const float v = warp_sum(acc[jj]);
            if (lane == 0) red[warp][jj] = v;
        }
        __syncthreads();
        if (threadIdx.x < LORA_RANK_TILE && j0 + threadIdx.x < rank) {
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += red[w][threadIdx.x];
            out[j0 + threadIdx.x] = s;
        }
        __syncthreads();
    }
}

// Grid (row, column tile, part); one thread per output column: y += mid · Bt[:, col], the
// rank unrolled by tiles so the loads of Bt are independent.
template <typename T>
__device__ void lora_expand(T* y, const float* mid, const uint32_t* row_slot, const unsigned long long* table,
                            int num_slots, int layer, LoraParts parts, int rows, int y_width, int max_rank) {
    const int r = blockIdx.x, p = blockIdx.z;
    const uint32_t slot = row_slot[r];
    if (slot >= (uint32_t)num_slots) return;
    const unsigned long long* e = lora_entry(table, num_slots, layer, parts.target[p], slot);
    const int rank = (int)e[2];
    const int out_features = parts.out_features[p];
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (rank == 0 || col >= out_features) return;
    const T* bt = reinterpret_cast<const T*>(e[1]) + col;
    const float* m = mid + ((long long)p * rows + r) * max_rank;
    float acc = 0.f;
    for (int j0 = 0; j0 < rank; j0 += LORA_RANK_TILE) {
#pragma unroll
        for (int jj = 0; jj < LORA_RANK_TILE; ++jj)
            if (j0 + jj < rank) acc += m[j0 + jj] * to_f<T>(bt[(long long)(j0 + jj) * out_features]);
    }
    T* yr = y + (long long)r * y_width + parts.offset[p] + col;
    *yr = from_f<T>(to_f<T>(*yr) + acc);
}

#define LORA_INSTANTIATE(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(LORA_SHRINK_THREADS) lora_shrink_##SUFFIX(                          \
        float* mid, const T* x, const uint32_t* row_slot, const unsigned long long* table, int num_slots, int layer, \
        LoraParts parts, int rows, int in_features, int max_rank) {                                                  \
        lora_shrink<T>(mid, x, row_slot, table, num_slots, layer, parts, rows, in_features, max_rank);               \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(LORA_EXPAND_THREADS) lora_expand_##SUFFIX(                          \
        T* y, const float* mid, const uint32_t* row_slot, const unsigned long long* table, int num_slots, int layer, \
        LoraParts parts, int rows, int y_width, int max_rank) {                                                      \
        lora_expand<T>(y, mid, row_slot, table, num_slots, layer, parts, rows, y_width, max_rank);                   \
    }

LORA_INSTANTIATE(f32, float)
LORA_INSTANTIATE(bf16, __nv_bfloat16)
LORA_INSTANTIATE(f16, __half)
