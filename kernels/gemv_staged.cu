// One-row decode products whose blocks stage their weight rows in shared memory (issue 7,
// W3; backend/cuda/gemv_staged.rs; bench/gpu/micro/gemv_staged.cu measured it).
// gemv_fused (ops.cu) keeps its weights in registers, two 256-thread blocks filling an SM's
// register file, so the next product's blocks cannot be resident, and cannot ask for their
// weights, before this product's blocks retire: the weight stream stops at every hop.
// Here a launch is one block of 512 threads an SM at 64 registers (two such blocks fit
// beside each other, every launch asking for the largest shared-memory carveout), and each
// block, before pdl_wait:
//   1. starts bulk copies of its rows of the weight (and, for SiLU, the same rows of the up
//      half) into shared memory, no registers held, and reads the norm weights;
//   2. calls pdl_launch_dependents, so the next product's blocks start their copies while
//      this one waits for its input;
// then builds x' in shared memory (the norm: one float4 of the residual a thread), reads
// the residual rows a residual-add epilogue will update, waits for its copies and computes
// one weight row a warp, two 16-byte chunks a lane in flight (gate_up in 16-bit types: on the
// tensor cores, tile_sums).
// A block's rows go in chunks of stage_rows through a ring of `stages` buffers, each on its
// own mbarrier, a buffer refilled once every warp is done with it. The products of a layer
// fit whole (one chunk, one stage); the logits (lm_head, ~150k rows) stream through the
// ring, its first stages copied before pdl_wait like the rest.
// Epilogues and roundings as gemv_fused's n = 1 (gemv_epilogue.cuh); the sums run in another
// order, so an output may differ from gemv_fused's in its last bit.
#include "bulk_copy.cuh"
#include "common.cuh"
#include "gemv_epilogue.cuh"
#include "mma.cuh"
#include "pdl.cuh"

#define STG_THREADS 512
#define STG_WARPS (STG_THREADS / 32)
#define STG_MAX_STAGES 16
// gate_up's 16-bit weights summed on the tensor cores (tile_sums); 0 keeps the CUDA-core loop
// for them (bench/gpu/micro/gemv_staged.cu builds both).
#ifndef STG_TENSOR
#define STG_TENSOR 1
#endif
// Timeline stamps: a block's start (0), past pdl_wait (1), x' built (2), its weights in (3)
// and its end (4). None in the engine; bench/gpu/micro/stamps.cuh defines them.
#ifndef STG_STAMP
#define STG_STAMP(point)
#endif

// Starts the copies of chunk c (rows c * stage_rows.. of this block, both halves for SiLU)
// into its ring buffer. One bulk copy a half: cut into 16 KB copies, W3's layer took 0.75 µs
// more. Marked to leave the L2 first: the weights are read once a step, while the KV cache
// and the activations are read again (bench/RESULTS.md, issue 7, session 16).
template <typename T, int H>
__device__ void stage_chunk(T* ring, uint64_t* full, const T* w, int out, int inner, int row0, int rows, int stage_rows,
                            int stages, int c) {
    const int s = c % stages, first = c * stage_rows;
    const unsigned bytes = (unsigned)min(stage_rows, rows - first) * inner * sizeof(T);
    mbar_expect_tx(&full[s], H * bytes);
    for (int h = 0; h < H; h++) {
        const char* src = reinterpret_cast<const char*>(w + ((size_t)h * out + row0 + first) * inner);
        char* dst = reinterpret_cast<char*>(ring + ((size_t)s * H + h) * stage_rows * inner);
        bulk_g2s_evict_first(dst, src, bytes, &full[s]);
    }
}

// The sums of one weight row (and, for SiLU, its up row `half` values further) with x' over
// a warp, every lane ending with them: two 16-byte chunks a lane in flight (v and v + 32),
// each into its own accumulator.
template <typename T, int H>
__device__ void row_sums(float (&sum)[H], const T* row, size_t half, const T* xs, int vecs, int lane) {
    constexpr int VEC = 16 / sizeof(T);
    float acc[H][2];
#pragma unroll
    for (int h = 0; h < H; h++) acc[h][0] = acc[h][1] = 0.f;
    for (int v0 = lane; v0 < vecs; v0 += 64) {
        uint4 xr[2], wr[H][2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int v = v0 + 32 * u;
            const bool in = v < vecs;
            xr[u] = in ? reinterpret_cast<const uint4*>(xs)[v] : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int h = 0; h < H; h++)
                wr[h][u] = in ? reinterpret_cast<const uint4*>(row + h * half)[v] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const T* xv = reinterpret_cast<const T*>(&xr[u]);
#pragma unroll
            for (int h = 0; h < H; h++) {
                const T* wv = reinterpret_cast<const T*>(&wr[h][u]);
#pragma unroll
                for (int e = 0; e < VEC; e++) acc[h][u] += to_f(wv[e]) * to_f(xv[e]);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < H; h++) sum[h] = warp_sum(acc[h][0] + acc[h][1]);
}

// Tensor-core sums of gate_up (16-bit weights, rows whole, 32 | inner). The block's rows of
// both halves ("virtual rows": the up half after the gate half) go in tiles of 16, each
// tile's columns in chunks of 32, and every warp takes an equal run of the (tile, chunk)
// units: the CUDA-core loop gave W3's 37 rows a block to 16 warps, five of them three rows,
// and unpacked every bf16 to float by hand.
// One mma.m16n8k16 takes the tile's weights as A and x' as B. A dot product may pair its
// terms in any order, so lane (g, t) loads its 16 bytes of rows g and g + 8 and of x' at one
// column, rotated by g (no bank conflicts although every row starts at the same bank), and
// B's column g is x' in lane group g's rotation: D[g][g] and D[g + 8][g] are rows g's and
// g + 8's sums. A warp leaves its sums of each tile it touched in part[warp].
// The same form for o, down and qkv (7-9 rows a block) measured slower than their CUDA-core
// loop (bench/RESULTS.md, issue 7, session 17).
// Warp w's run [u0, u1) of `units` (tile, chunk) units: tile_sums works it, tile_total
// finds whose sums a tile holds.
__device__ __forceinline__ void warp_units(int w, int units, int& u0, int& u1) {
    u0 = w * units / STG_WARPS;
    u1 = (w + 1) * units / STG_WARPS;
}

template <typename T, int H>
__device__ void tile_sums(float* part, const T* ws, size_t half, const T* xs, int rows, int inner, int warp, int lane) {
    const int vecs = inner * (int)sizeof(T) / 16;
    const int vrows = H * rows, tiles = (vrows + 15) / 16, chunks = vecs / 4, units = tiles * chunks;
    int u0, u1;
    warp_units(warp, units, u0, u1);
    const int g = lane >> 2, t = lane & 3;
    const uint4* x4 = reinterpret_cast<const uint4*>(xs);
    // A tile's rows past the last read row 0: a row of A only reaches the same row of D,
    // which nobody reads.
    const auto row_vecs = [&](int vr) {
        const size_t at = vr >= vrows ? 0 : vr < rows ? (size_t)vr * inner : half + (size_t)(vr - rows) * inner;
        return reinterpret_cast<const uint4*>(ws + at);
    };
    int tile = u0 / chunks, c = u0 - tile * chunks;
    for (int u = u0; u < u1; u += chunks - c, tile++, c = 0) {
        const int n = min(chunks - c, u1 - u);
        const uint4 *w0 = row_vecs(tile * 16 + g), *w1 = row_vecs(tile * 16 + g + 8);
        float acc[2][4] = {};
        int j = c + g;
        while (j >= chunks) j -= chunks;
        // Not unrolled: unrolled by 2, gate_up ran 0.15-0.2 µs slower.
#pragma unroll 1
        for (int k = 0; k < n; k++) {
            const int v = 4 * j + t;
            const uint4 xv = x4[v], a0 = w0[v], a1 = w1[v];
            const uint32_t lo[4] = {a0.x, a1.x, a0.y, a1.y}, hi[4] = {a0.z, a1.z, a0.w, a1.w};
            mma_16816<T>(acc[0], lo, xv.x, xv.y);
            mma_16816<T>(acc[1], hi, xv.z, xv.w);
            if (++j == chunks) j = 0;
        }
        // D[g][g] and D[g + 8][g] sit in lane (g, g / 2): elements g % 2 and 2 + g % 2
        // (selects, not an index, so acc stays in registers).
        if (t == g >> 1) {
            const bool odd = g & 1;
            float* p = part + (size_t)warp * tiles * 16 + tile * 16;
            p[g] = odd ? acc[0][1] + acc[1][1] : acc[0][0] + acc[1][0];
            p[g + 8] = odd ? acc[0][3] + acc[1][3] : acc[0][2] + acc[1][2];
        }
    }
}

// Virtual row vr's sum: its tile's partials from the warps whose units reached it, in warp
// order (the same bits every run).
__device__ float tile_total(const float* part, int vr, int tiles, int chunks) {
    const int units = tiles * chunks, lo = vr / 16 * chunks, hi = lo + chunks;
    float s = 0.f;
    for (int w = 0; w < STG_WARPS; w++) {
        int u0, u1;
        warp_units(w, units, u0, u1);
        if (u0 < u1 && u0 < hi && u1 > lo) s += part[(size_t)w * tiles * 16 + vr];
    }
    return s;
}

// The logits' argmax without a kernel of its own (two hops, ~2 µs each, at the end of a W3
// step): every worker warp holds the best of its rows; the block's best goes to scratch
// [2 * block] (index, value bits), and the last block to arrive (fence + counter at
// scratch[2 * gridDim.x], reset for the next launch) writes argmax[0] = id, argmax[1] =
// value bits, as argmax_split_reduce does for one row, and the same to host_out when
// given. (value, lowest index) is a total order, so the result does not depend on which
// block is last.
__device__ void logits_argmax(uint32_t* argmax, uint32_t* scratch, uint32_t* host_out, float v, int idx, int workers,
                              int warp, int lane) {
    __shared__ float best_v[STG_WARPS];
    __shared__ int best_i[STG_WARPS];
    __shared__ bool last;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = idx;
    }
    // The refill warp has left: a barrier of the workers alone.
    asm volatile("bar.sync 1, %0;" ::"r"(workers * 32) : "memory");
    if (warp != 0) return;
    v = lane < workers ? best_v[lane] : -INFINITY;
    idx = lane < workers ? best_i[lane] : 0x7fffffff;
    warp_argmax(v, idx);
    unsigned int* count = scratch + 2 * gridDim.x;
    if (lane == 0) {
        scratch[2 * blockIdx.x] = (uint32_t)idx;
        scratch[2 * blockIdx.x + 1] = __float_as_uint(v);
        __threadfence();
        last = atomicAdd(count, 1u) == gridDim.x - 1;
    }
    __syncwarp();
    if (!last) return;
    __threadfence();
    v = -INFINITY;
    idx = 0x7fffffff;
    for (int b = lane; b < (int)gridDim.x; b += 32)
        argmax_merge(v, idx, __uint_as_float(__ldcg(scratch + 2 * b + 1)), (int)__ldcg(scratch + 2 * b));
    warp_argmax(v, idx);
    if (lane == 0) {
        store_argmax(argmax, host_out, 0, 1, v, idx);
        *count = 0u;
    }
}

// y = epilogue(x' · wᵀ) for one input row; x' = RMSNorm(x) * norm_w (x the float32 residual
// stream, inner <= 4 * STG_THREADS) when norm_w is given, else x. A block computes rows
// row0..row0 + rpb of w (and, for GEMV_SILU, the same rows of the up half at + out). Dynamic
// shared memory: (stages * halves * stage_rows + 1) * inner * sizeof(T) bytes, and for
// tile_sums STG_WARPS * 16 * ceil(2 * rpb / 16) floats more (the launcher checks), stages <=
// STG_MAX_STAGES.
template <typename T, int MODE, bool ARGMAX = false>
__device__ void gemv_staged(void* y, const void* x, const T* w, const T* norm_w, int out, int inner, int rpb,
                            int stage_rows, int stages, float eps, uint32_t* argmax = nullptr,
                            uint32_t* scratch = nullptr, uint32_t* host_out = nullptr) {
    extern __shared__ __align__(128) unsigned char stg_smem[];
    __shared__ __align__(8) uint64_t full[STG_MAX_STAGES], empty[STG_MAX_STAGES];
    __shared__ float red[STG_WARPS];
    constexpr int H = MODE == GEMV_SILU ? 2 : 1;
    // Only the logits stream; a layer's products take their rows whole, and compile without
    // the ring's bookkeeping.
    constexpr bool RING = MODE == GEMV_STORE_F32;
    constexpr bool TENSOR = STG_TENSOR && sizeof(T) == 2 && MODE == GEMV_SILU;
    STG_STAMP(0);
    if (!RING) stage_rows = rpb, stages = 1;
    const int row0 = blockIdx.x * rpb, rows = min(rpb, out - row0);
    const int chunks = RING ? (rows + stage_rows - 1) / stage_rows : 1;
    T* ring = reinterpret_cast<T*>(stg_smem);                // [stages][H][stage_rows][inner]
    T* xs = ring + (size_t)stages * H * stage_rows * inner;  // [inner]
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) {
            mbar_init(&full[s], 1);
            if (RING) mbar_init(&empty[s], STG_WARPS - 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < min(stages, chunks); c++)
            stage_chunk<T, H>(ring, full, w, out, inner, row0, rows, stage_rows, stages, c);
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vecs = inner * sizeof(T) / 16;
    if (norm_w) {
        // The norm weights do not depend on the previous kernel.
        const int i = threadIdx.x * 4;
        float nw[4] = {0.f, 0.f, 0.f, 0.f};
        if (i < inner)
            for (int e = 0; e < 4; e++) nw[e] = to_f(norm_w[i + e]);
        pdl_launch_dependents();
        pdl_wait();
        STG_STAMP(1);
        float4 h = make_float4(0.f, 0.f, 0.f, 0.f);
        if (i < inner) h = *reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
        const float ss = warp_sum(h.x * h.x + h.y * h.y + h.z * h.z + h.w * h.w);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float total = 0.f;
        for (int k = 0; k < STG_WARPS; k++) total += red[k];
        const float inv = rsqrtf(total / inner + eps);
        if (i < inner) {
            xs[i] = from_f<T>(nw[0] * (h.x * inv));
            xs[i + 1] = from_f<T>(nw[1] * (h.y * inv));
            xs[i + 2] = from_f<T>(nw[2] * (h.z * inv));
            xs[i + 3] = from_f<T>(nw[3] * (h.w * inv));
        }
    } else {
        pdl_launch_dependents();
        pdl_wait();
        STG_STAMP(1);
        // One or two rounds (W3's o and down): unrolled, the loop cost the chain 0.2 µs a
        // layer (bench/RESULTS.md, issue 7, session 17).
#pragma unroll 1
        for (int i = threadIdx.x; i < vecs; i += STG_THREADS)
            reinterpret_cast<uint4*>(xs)[i] = static_cast<const uint4*>(x)[i];
    }
    // Past pdl_wait either way: the residual of a warp's first row, read now rather than
    // after its sums (an L2 round trip less on the chain); the add below is the epilogue's,
    // in its order.
    float first_residual = 0.f;
    if (MODE == GEMV_ADD && lane == 0 && warp < rows) first_residual = static_cast<const float*>(y)[row0 + warp];
    __syncthreads();
    STG_STAMP(2);

    if constexpr (TENSOR) {
        float* part = reinterpret_cast<float*>(xs + inner);
        while (!mbar_try(&full[0], 0)) {
        }
        STG_STAMP(3);
        tile_sums<T, H>(part, ring, (size_t)stage_rows * inner, xs, rows, inner, warp, lane);
        __syncthreads();
        const int tiles = (H * rows + 15) / 16, chunks = vecs / 4;
        for (int r = threadIdx.x; r < rows; r += STG_THREADS)
            gemv_epilogue<T>(y, row0 + r, MODE, tile_total(part, r, tiles, chunks),
                             tile_total(part, rows + r, tiles, chunks));
        STG_STAMP(4);
        return;
    }

    // With more chunks than buffers, the last warp refills each buffer once the others are
    // done with it (empty), and they go on to the next chunk without waiting for each other.
    const bool ring_refills = RING && chunks > stages;
    const int workers = ring_refills ? STG_WARPS - 1 : STG_WARPS;
    if (ring_refills && warp == workers) {
        if (lane == 0)
            for (int c = stages; c < chunks; c++) {
                const int s = c % stages;
                while (!mbar_try(&empty[s], (c / stages - 1) & 1)) {
                }
                stage_chunk<T, H>(ring, full, w, out, inner, row0, rows, stage_rows, stages, c);
            }
        return;
    }
    // A warp's rows are every workers-th row of the block, so each chunk's are shared out
    // afresh whatever its size.
    float best_v = -INFINITY;
    int best_i = 0x7fffffff;
    for (int c = 0, next = warp; c < chunks; c++) {
        const int s = c % stages, first = c * stage_rows, end = first + min(stage_rows, rows - first);
        while (!mbar_try(&full[s], (c / stages) & 1)) {
        }
        if (c == 0) STG_STAMP(3);
        const T* ws = ring + (size_t)s * H * stage_rows * inner;
        for (; next < end; next += workers) {
            const int r = next - first;
            float sum[H];
            row_sums<T, H>(sum, ws + (size_t)r * inner, (size_t)stage_rows * inner, xs, vecs, lane);
            if (lane == 0 && MODE == GEMV_ADD && next == warp)
                static_cast<float*>(y)[row0 + next] = first_residual + round_t<T>(sum[0]);
            else if (lane == 0)
                gemv_epilogue<T>(y, row0 + next, MODE, sum[0], sum[H - 1]);
            if (ARGMAX) argmax_merge(best_v, best_i, sum[0], row0 + next);
        }
        if (ring_refills) {
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[s]);
        }
    }
    if constexpr (ARGMAX) logits_argmax(argmax, scratch, host_out, best_v, best_i, workers, warp, lane);
    STG_STAMP(4);
}

#define INSTANTIATE_STAGED(SUFFIX, T, NAME, MODE)                                                                       \
    extern "C" __global__ void __launch_bounds__(STG_THREADS, 2) gemv_staged_##NAME##_##SUFFIX(                        \
        void* y, const void* x, const T* w, const T* norm_w, int out, int inner, int rpb, int stage_rows, int stages,   \
        float eps) {                                                                                                    \
        gemv_staged<T, MODE>(y, x, w, norm_w, out, inner, rpb, stage_rows, stages, eps);                                \
    }
#define INSTANTIATE_LOGITS_ARGMAX(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(STG_THREADS, 2) gemv_staged_logits_argmax_##SUFFIX(                   \
        void* y, const void* x, const T* w, const T* norm_w, int out, int inner, int rpb, int stage_rows, int stages,   \
        float eps, uint32_t* argmax, uint32_t* scratch, uint32_t* host_out) {                                           \
        gemv_staged<T, GEMV_STORE_F32, true>(y, x, w, norm_w, out, inner, rpb, stage_rows, stages, eps, argmax,          \
                                             scratch, host_out);                                                        \
    }
#define INSTANTIATE_STAGED_MODES(SUFFIX, T)                                                                             \
    INSTANTIATE_STAGED(SUFFIX, T, store, GEMV_STORE)                                                                    \
    INSTANTIATE_STAGED(SUFFIX, T, add, GEMV_ADD)                                                                        \
    INSTANTIATE_STAGED(SUFFIX, T, silu, GEMV_SILU)                                                                      \
    INSTANTIATE_STAGED(SUFFIX, T, logits, GEMV_STORE_F32)                                                               \
    INSTANTIATE_LOGITS_ARGMAX(SUFFIX, T)

INSTANTIATE_STAGED_MODES(f32, float)
INSTANTIATE_STAGED_MODES(bf16, __nv_bfloat16)
INSTANTIATE_STAGED_MODES(f16, __half)
