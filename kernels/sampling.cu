// Sampling on the device for rows whose logits need no host-side processing: repetition,
// presence and frequency penalties, then greedy argmax, or temperature, min-p, top-k, top-p
// and one draw from what is left. float32 logits [rows, vocab].
//
// Per row, `meta` holds SAMPLE_META u32 words (see backend/cuda/sampling.rs, which packs
// them): temperature, top_k (0: off), top_p, min_p, repetition, presence and frequency
// penalties, the uniform draw u in [0, 1) (all float32 bits but top_k), then the first
// entry and the entry count of the row's penalty list. Entries follow every row's words:
// (token id, times it occurs in the output so far), one per distinct context token, so
// the penalty kernel writes each logit at most once.
//
// Filters keep every token at or above a threshold on the logit (ties at the threshold
// are all kept): min-p keeps p >= min_p * p_max, top-k the k largest, top-p the most
// likely tokens whose mass reaches top_p. Thresholds are found by bisection over the
// logits' order-preserving 32-bit keys; the draw walks the survivors in vocabulary order.

#include "common.cuh"

#define SAMPLE_META 10
#define SAMPLE_THREADS 1024

struct RowMeta {
    float temperature;
    uint32_t top_k;
    float top_p, min_p, repetition, presence, frequency, uniform;
    uint32_t first_entry, num_entries;
};

__device__ __forceinline__ RowMeta row_meta(const uint32_t* meta, int row) {
    const uint32_t* m = meta + row * SAMPLE_META;
    RowMeta r;
    r.temperature = __uint_as_float(m[0]);
    r.top_k = m[1];
    r.top_p = __uint_as_float(m[2]);
    r.min_p = __uint_as_float(m[3]);
    r.repetition = __uint_as_float(m[4]);
    r.presence = __uint_as_float(m[5]);
    r.frequency = __uint_as_float(m[6]);
    r.uniform = __uint_as_float(m[7]);
    r.first_entry = m[8];
    r.num_entries = m[9];
    return r;
}

// Applies the penalties to `logits` in place (vLLM's order: repetition on every context
// token, then frequency * count + presence on output tokens). One block per row.
extern "C" __global__ void apply_penalties(float* logits, const uint32_t* meta, int rows, int vocab) {
    const int row = blockIdx.x;
    const RowMeta r = row_meta(meta, row);
    const uint32_t* entries = meta + rows * SAMPLE_META + 2 * r.first_entry;
    float* x = logits + (long long)row * vocab;
    for (uint32_t e = threadIdx.x; e < r.num_entries; e += blockDim.x) {
        const uint32_t token = entries[2 * e];
        const uint32_t count = entries[2 * e + 1];
        if (token >= (uint32_t)vocab) continue;
        float v = x[token];
        if (r.repetition != 1.0f) v = v > 0.0f ? v / r.repetition : v * r.repetition;
        if (count > 0) v -= r.frequency * (float)count + r.presence;
        x[token] = v;
    }
}

// Larger floats give larger keys (NaN aside).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Block-wide sums; every thread gets the result. `red` holds 32 values.
__device__ float block_sum_f(float v, float* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
    return warp_sum(v);
}

__device__ uint32_t block_sum_u(uint32_t v, uint32_t* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The row's largest value and its lowest index.
__device__ void block_argmax(const float* x, int vocab, float* best_v, int* best_i, float* out_v, int* out_i) {
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (x[i] > v || (idx == 0x7fffffff && x[i] == v)) {
            v = x[i];
            idx = i;
        }
    }
    warp_argmax(v, idx);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? best_v[lane] : -INFINITY;
    idx = lane < (int)(blockDim.x >> 5) ? best_i[lane] : 0x7fffffff;
    warp_argmax(v, idx);
    *out_v = v;
    *out_i = idx == 0x7fffffff ? 0 : idx;
}

// Token i's unnormalised probability exp(x / T - max / T); 0 when min-p drops it.
__device__ __forceinline__ float weight(float x, float scaled_max, float temperature, float min_p) {
    const float w = __expf(x / temperature - scaled_max);
    return (w > 0.0f && w >= min_p) ? w : 0.0f;
}

// One block per row. out: u32 [2 * rows], the picked ids then the float32 bits of each
// pick's raw logit (from `raw`, the logits before penalties).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(uint32_t* out, const float* logits, const float* raw, const uint32_t* meta, int vocab) {
    __shared__ float red_f[32];
    __shared__ uint32_t red_u[32];
    __shared__ int red_i[32];
    __shared__ float scan[32];
    __shared__ int picked;
    const int row = blockIdx.x;
    const int rows = gridDim.x;
    const RowMeta r = row_meta(meta, row);
    const float* x = logits + (long long)row * vocab;
    float max_v;
    int max_i;
    block_argmax(x, vocab, red_f, red_i, &max_v, &max_i);
    int token = max_i;
    const bool greedy = r.temperature < 1e-5f || r.top_k == 1;
    if (!greedy && max_v != -INFINITY) {
        const float t = r.temperature;
        const float scaled_max = max_v / t;
        const float min_p = r.min_p > 0.0f ? r.min_p : 0.0f;
        // Threshold key: tokens with key >= lo (and a weight) survive.
        uint32_t lo = 0;
        if (r.top_k > 0 && r.top_k < (uint32_t)vocab) {
            // The largest key that still leaves at least top_k candidates.
            uint32_t hi = order_key(max_v);
            while (lo < hi) {
                const uint32_t mid = lo + (hi - lo + 1) / 2;
                uint32_t c = 0;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                    c += (order_key(x[i]) >= mid && weight(x[i], scaled_max, t, min_p) > 0.0f) ? 1u : 0u;
                c = block_sum_u(c, red_u);
                if (c >= r.top_k) lo = mid; else hi = mid - 1;
            }
        }
        if (r.top_p < 1.0f) {
            float total = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                if (order_key(x[i]) >= lo) total += weight(x[i], scaled_max, t, min_p);
            total = block_sum_f(total, red_f);
            // A little slack so that rounding cannot add a token to a set of mass exactly p.
            const float target = r.top_p * total * (1.0f - 1e-6f);
            uint32_t hi = order_key(max_v);
            while (lo < hi) {
                const uint32_t mid = lo + (hi - lo + 1) / 2;
                float m = 0.0f;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                    if (order_key(x[i]) >= mid) m += weight(x[i], scaled_max, t, min_p);
                m = block_sum_f(m, red_f);
                if (m >= target) lo = mid; else hi = mid - 1;
            }
        }
        // The draw: each thread owns a contiguous chunk; a block scan of the chunks' masses
        // finds the chunk holding u * total, whose owner walks it.
        const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
        const int begin = min((int)threadIdx.x * chunk, vocab), end = min(begin + chunk, vocab);
        float mine = 0.0f;
        for (int i = begin; i < end; ++i)
            if (order_key(x[i]) >= lo) mine += weight(x[i], scaled_max, t, min_p);
        // Inclusive scan: within the warp, then over the warps' totals.
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        float incl = mine;
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) scan[warp] = incl;
        if (threadIdx.x == 0) picked = 0x7fffffff;
        __syncthreads();
        if (warp == 0) {
            float w = lane < (int)(blockDim.x >> 5) ? scan[lane] : 0.0f;
            for (int o = 1; o < 32; o <<= 1) {
                const float y = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += y;
            }
            scan[lane] = w;
        }
        __syncthreads();
        const float warp_base = warp > 0 ? scan[warp - 1] : 0.0f;
        incl += warp_base;
        const float excl = incl - mine;
        const float total = scan[(blockDim.x >> 5) - 1];
        float target = r.uniform * total;
        if (target >= total) target = nextafterf(total, 0.0f);
        if (mine > 0.0f && target >= excl && target < incl) {
            float acc = excl;
            int last = -1;
            for (int i = begin; i < end; ++i) {
                const float w = order_key(x[i]) >= lo ? weight(x[i], scaled_max, t, min_p) : 0.0f;
                if (w <= 0.0f) continue;
                last = i;
                acc += w;
                if (target < acc) break;
            }
            // Rounding may let two neighbouring chunks both claim the target: the lower wins.
            if (last >= 0) atomicMin(&picked, last);
        }
        __syncthreads();
        // No chunk claimed it (rounding at a chunk edge): the argmax, always a survivor.
        if (picked != 0x7fffffff) token = picked;
    }
    if (threadIdx.x == 0) {
        out[row] = (uint32_t)token;
        out[rows + row] = __float_as_uint(raw[(long long)row * vocab + token]);
    }
}
