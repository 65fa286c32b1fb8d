// Decode attention for small batches, one block per (sequence, query head) (issue 7, W3;
// backend/cuda/decode_heads.rs). The cluster kernel of decode_small.cu spreads a KV head's
// rows over 8 blocks and merges them through two cluster barriers; at batch 1 its blocks
// also take a whole SM's registers, so they only start once the qkv GEMV before them has
// left the SMs, and the cache rows' chain (position, block table, rows) starts then. Here:
//   1. before pdl_wait (nothing below depends on the previous kernel): the position, the
//      block-table entries of the first chunk of rows (into shared memory), then the
//      chunk's key and value rows, copied global -> shared with cp.async (no registers
//      held), the bias and this position's rotary values; the block is small enough
//      (<= 128 registers a thread) to sit beside a GEMV block while it waits;
//   2. after it: the head's query and the KV head's key / value from the qkv row (bias,
//      Qwen3 q/k RMSNorm, rotary), the token's key / value into the chunk and (by the
//      group's first head) into the cache;
//   3. scores one row per thread (keys read from shared memory, swizzled so a warp's rows
//      hit distinct banks; for 16-bit head_dim 64 and 128, 16-row tiles on the tensor
//      cores, session 19), block max, exponentials, then values: each thread one 16-byte
//      column chunk over a strided set of rows; a context longer than the chunk goes
//      chunk by chunk with the softmax rescaled between them.
// No cluster, no counter, no partial buffers: the keys are read by each of the group's
// query heads (from the L2 after the first), the arithmetic per block is 1/G of a KV head's.
// SPLIT > 1 (VLLM_DS_SPLIT, session 9): the context's rows are cut into SPLIT equal ranges,
// one block each, a cluster of SPLIT blocks along z per (sequence, query head): each block
// stages and scores 1/SPLIT of the rows (one SM streams ~100 KB of W3's rows at ~20 B/ns,
// the chain's longest part); the others push their (max, sum, values) partials into block
// 0's shared memory, which merges them in rank order (deterministic, no atomics; session 20:
// pushed rather than read after two cluster barriers, W3 −7 µs with 2 ranges; session 21:
// pushed by st.async with no fences, W3 0.421 -> 0.404 ms, and 4 ranges the best again).
// DH_WHOLE_TABLE in `cap` (VLLM_DS_TABLE, session 9; the launcher sets it when the table row
// fits): row t is sequence t (the decode graphs' token_seq is the identity, graphs.rs), so
// the whole block-table row goes to shared memory by cp.async in parallel with the
// position load, instead of position -> entries -> rows (one dependent trip fewer).
// Rounding as qkv_prepare + paged_attention_v2 (q and k rounded to T after rotary, scores,
// softmax and sums in float32, output rounded to T; the tensor-core scores scale the sum
// rather than the query); exponentials in base 2.

#include "bulk_copy.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "pdl.cuh"

#define DH_THREADS 256
#define DH_WARPS (DH_THREADS / 32)
// Rows a thread scores per chunk: a chunk holds at most DH_THREADS * DH_ROWS_PT rows.
#define DH_ROWS_PT 4
// Flag in the kernels' `cap` argument: the block-table row is staged whole (see above).
#define DH_WHOLE_TABLE (1 << 30)
// Timeline stamps: a block's start (0), its first chunk's copies issued (1), past pdl_wait
// (2), the qkv row read (3), the first chunk in (4), its exponentials summed (5), its values
// summed (6), a split's partials pushed (ranks 1..) or in (rank 0) (7) and the block's end
// (8). None in the engine; bench/gpu/micro/layer_chain.cu defines them.
// Floats of recv and its mbarrier (a multiple of 4, so cur stays 16-byte aligned).
#define DH_RECV(SPLIT, hd) ((SPLIT) > 1 ? (((SPLIT) - 1) * ((hd) + 2) + 2 + 3) / 4 * 4 : 0)
#ifndef DH_STAMP
#define DH_STAMP(point)
#endif

__device__ __forceinline__ void dh_cp_async16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void dh_cp_async4(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}
// The merge of SPLIT > 1 (sessions 20-21): the other ranks store their partials straight
// into rank 0's shared memory with st.async, each store counting its bytes off rank 0's
// mbarrier, so no sender fences or arrives. The one cluster barrier, which makes the
// mbarrier's initialisation visible, is arrived at on entry and waited for only before the
// push, so no block waits for another to reach it.
// Relaxed: the only write it publishes is the mbarrier's initialisation, which
// fence.mbarrier_init orders (a release arrive costs every block a MEMBAR.GPU on entry).
__device__ __forceinline__ void dh_cluster_arrive() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
__device__ __forceinline__ void dh_cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
// The address of this block's shared `local` in the shared memory of cluster rank 0.
__device__ __forceinline__ unsigned dh_rank0(const void* local) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote) : "r"(saddr(local)));
    return remote;
}
// Stores one float (dh_push) or two (dh_push2) at the cluster address `dst`, counting their
// bytes off the mbarrier at the cluster address `bar` once they land.
__device__ __forceinline__ void dh_push(unsigned dst, float v, unsigned bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(dst),
                 "r"(__float_as_uint(v)), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void dh_push2(unsigned dst, float a, float b, unsigned bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(dst),
                 "r"(__float_as_uint(a)), "r"(__float_as_uint(b)), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void dh_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void dh_cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Shared memory (launcher: decode_heads.rs, shared_bytes): kbuf, vbuf [cap, hd] T (16-byte
// chunk c of row r at chunk c ^ (r & sw)); qs [hd] (the query times scale and log2(e) for
// the CUDA-core scores); xs [3 * hd] (the qkv slice plus bias); p [cap] (a chunk's
// exponentials); part [max(DH_WARPS * VEC, hd)] (value sums per warp; the tensor-core
// scores' query until then); red [20]; cur [2 * hd] T (this token's key, value); tbl
// [cap / block_size + 2] (block-table entries of the chunk). SPLIT > 1 puts recv
// [(SPLIT - 1) * (hd + 2)] (the other ranks' sums, max and sum) and its mbarrier between red
// and cur, DH_RECV floats in all.
// CHUNKS: the 16-byte chunks of a head's row (head_dim * sizeof(T) / 16) when the kernel is
// built for one (16-bit types only): the scores go through the tensor cores and the value
// loop unrolls (0: any, read from head_dim).
template <typename T, int SPLIT, int CHUNKS>
__device__ void decode_attention_heads(T* out, const T* qkv, const T* bias, const T* q_norm, const T* k_norm,
                                       const float* cos_table, const float* sin_table, const uint32_t* positions,
                                       const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,
                                       int block_size, T* k_cache, T* v_cache, int num_heads, int num_kv_heads,
                                       int head_dim, float scale, int window, float eps, int cap_arg) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ uint4 dh_smem[];
    const int t = blockIdx.x, head = blockIdx.y;
    const bool whole_table = (cap_arg & DH_WHOLE_TABLE) != 0;
    const int cap = cap_arg & ~DH_WHOLE_TABLE;
    const int hd = head_dim, half = hd / 2;
    const int chunks = CHUNKS > 0 ? CHUNKS : hd / VEC;  // a power of two <= 32
    // Scores on the tensor cores where the row length is known (two chunks a step).
    constexpr bool TENSOR = CHUNKS > 0;
    static_assert(!TENSOR || sizeof(T) == 2, "tensor-core scores take 16-bit rows");
    constexpr int KSTEPS = CHUNKS / 2;
    const int sw = chunks < 8 ? chunks - 1 : 7;
    const int group = num_heads / num_kv_heads;
    const int kv_head = head / group;
    const bool writer = head % group == 0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    DH_STAMP(0);

    T* kbuf = reinterpret_cast<T*>(dh_smem);
    T* vbuf = kbuf + (long long)cap * hd;
    float* qs = reinterpret_cast<float*>(vbuf + (long long)cap * hd);
    float* xs = qs + hd;
    float* p = xs + 3 * hd;
    float* part = p + cap;
    const int part_len = max(DH_WARPS * VEC, hd);
    float* red = part + part_len;
    float* recv = red + 20;
    uint64_t* recv_bar = reinterpret_cast<uint64_t*>(recv + (SPLIT - 1) * (hd + 2));
    T* cur = reinterpret_cast<T*>(recv + DH_RECV(SPLIT, hd));
    if constexpr (SPLIT > 1) {
        if (blockIdx.z % SPLIT == 0 && tid == 0) {
            mbar_init(recv_bar, 1);
            mbar_expect_tx(recv_bar, (SPLIT - 1) * (hd + 2) * 4);  // the pushes' bytes
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        dh_cluster_arrive();
    }
    int* tbl = reinterpret_cast<int*>(cur + 2 * hd);

    if (whole_table) {
        // Independent of the position: issued before it is read.
        const uint32_t* row = block_tables + (long long)t * max_blocks;
        for (int i = threadIdx.x; i < max_blocks; i += DH_THREADS) dh_cp_async4(tbl + i, row + i);
        dh_cp_commit();
    }
    const int pos = positions[t];
    const int seq = whole_table ? t : token_seq[t];
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    // This block's rows [lo, hi) of the context [first, pos]; empty for late splits of a
    // context shorter than SPLIT rows. The token's own row is in the last non-empty range.
    const int split = SPLIT > 1 ? (int)blockIdx.z : 0;
    const int per_split = (pos + 1 - first + SPLIT - 1) / SPLIT;
    const int lo = min(first + split * per_split, pos + 1);
    const int hi = min(lo + per_split, pos + 1);
    const long long kv_stride = (long long)num_kv_heads * hd;
    const long long head_off = (long long)kv_head * hd;
    const uint32_t* table = block_tables + (long long)seq * max_blocks;

    // Rows [c0, c0 + cap) of the context that are in the cache (below pos): block-table
    // entries into tbl, then every 16-byte chunk of their keys and values by cp.async.
    auto stage = [&](int c0) {
        const int end = min(min(c0 + cap, hi), pos);  // exclusive; pos itself comes from qkv
        if (whole_table) dh_cp_wait_all();  // the table row (the only group pending at the first chunk)
        if (end <= c0) return;
        int b0 = 0;
        if (!whole_table) {
            b0 = c0 / block_size;
            const int nent = (end - 1) / block_size - b0 + 1;
            for (int i = tid; i < nent; i += DH_THREADS) tbl[i] = (int)table[b0 + i];
        }
        __syncthreads();
        const int n = (end - c0) * chunks;
        for (int k = tid; k < n; k += DH_THREADS) {
            const int r = k / chunks, c = k % chunks;
            const int q = c0 + r;
            const long long slot = (long long)tbl[q / block_size - b0] * block_size + q % block_size;
            const long long src = slot * kv_stride + head_off + c * VEC;
            const int dst = r * hd + (c ^ (r & sw)) * VEC;
            dh_cp_async16(kbuf + dst, k_cache + src);
            dh_cp_async16(vbuf + dst, v_cache + src);
        }
        dh_cp_commit();
    };

    // This block's columns of the qkv row: its query head, its KV head's key and value.
    auto column = [&](int i) {
        const int part_i = i / hd, d = i % hd;
        return part_i == 0 ? head * hd + d
                           : (part_i == 1 ? (num_heads + kv_head) * hd + d : (num_heads + num_kv_heads + kv_head) * hd + d);
    };
    // Independent of the previous kernel: bias and rotary values (3 * hd <= 3 * DH_THREADS,
    // hd <= DH_THREADS: the launcher checks).
    float bias_v[3];
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const int i = tid + k * DH_THREADS;
        bias_v[k] = (bias && i < 3 * hd) ? to_f(bias[column(i)]) : 0.f;
    }
    float cs = 0.f, sn = 0.f;
    if (tid < hd) {
        const long long at = (long long)pos * half + tid % half;
        cs = cos_table[at];
        sn = sin_table[at];
    }
    const long long kv_base = ((long long)table[pos / block_size] * block_size + pos % block_size) * kv_stride + head_off;
    stage(lo);
    DH_STAMP(1);
    // The cache rows above were written by earlier steps; the qkv row is the previous
    // kernel's output (programmatic dependent launch, pdl.cuh).
    pdl_launch_dependents();
    pdl_wait();
    DH_STAMP(2);

    const int width = (num_heads + 2 * num_kv_heads) * hd;
    const T* src = qkv + (long long)t * width;
#pragma unroll
    for (int k = 0; k < 3; k++) {
        const int i = tid + k * DH_THREADS;
        if (i < 3 * hd) xs[i] = to_f(src[column(i)]) + bias_v[k];
    }
    __syncthreads();
    DH_STAMP(3);
    if (q_norm) {
        // Warp 0 the query's RMS, warp 1 the key's.
        if (warp < 2) {
            const float* x = xs + warp * hd;
            float ss = 0.f;
            for (int j = lane; j < hd; j += 32) ss += x[j] * x[j];
            ss = warp_sum(ss);
            if (lane == 0) red[16 + warp] = rsqrtf(ss / hd + eps);
        }
        __syncthreads();
    }
    const float qscale = scale * LOG2E;
    // The token's own row: written straight into the first chunk when it is there (the
    // usual case), else kept in cur and copied when its chunk comes.
    const int own_row = pos - lo;
    const bool own_first = lo <= pos && hi == pos + 1 && own_row < cap;
    auto swizzled = [&](int d) { return ((d / VEC) ^ (own_row & sw)) * VEC + d % VEC; };
    if (tid < hd) {
        // Thread tid: the query's (tid < half) or the key's rotary pair j, j + half.
        const int which = tid / half, j = tid % half;
        float a = xs[which * hd + j], b = xs[which * hd + j + half];
        if (q_norm) {
            const T* w = which == 0 ? q_norm : k_norm;
            const float inv = red[16 + which];
            a = to_f(w[j]) * (a * inv);
            b = to_f(w[j + half]) * (b * inv);
        }
        const T ra = from_f<T>(a * cs - b * sn);
        const T rb = from_f<T>(b * cs + a * sn);
        if (which == 0) {
            if constexpr (TENSOR) {
                // The query as the tensor-core scores take it (part is free until the end).
                reinterpret_cast<T*>(part)[j] = ra;
                reinterpret_cast<T*>(part)[j + half] = rb;
            } else {
                qs[j] = to_f(ra) * qscale;
                qs[j + half] = to_f(rb) * qscale;
            }
        } else {
            cur[j] = ra;
            cur[j + half] = rb;
            if (own_first) {
                kbuf[own_row * hd + swizzled(j)] = ra;
                kbuf[own_row * hd + swizzled(j + half)] = rb;
            }
            if (writer && split == 0) {
                k_cache[kv_base + j] = ra;
                k_cache[kv_base + j + half] = rb;
            }
        }
    }
    for (int d = tid; d < hd; d += DH_THREADS) {
        const T v = from_f<T>(xs[2 * hd + d]);
        cur[hd + d] = v;
        if (own_first) vbuf[own_row * hd + swizzled(d)] = v;
        if (writer && split == 0) v_cache[kv_base + d] = v;
    }

    // Value phase geometry: thread tid sums column chunk pc over rows pg, pg + groups, ...
    const int groups = DH_THREADS / chunks;
    const int pc = tid / groups, pg = tid % groups;
    float M = -INFINITY, L = 0.f;
    float acc[VEC];
#pragma unroll
    for (int x = 0; x < VEC; x++) acc[x] = 0.f;
    for (int c0 = lo; c0 < hi; c0 += cap) {
        const int nrows = min(cap, hi - c0);
        if (c0 != lo) {
            __syncthreads();  // every thread is done with the previous chunk's rows
            stage(c0);
            if (hi == pos + 1 && pos - c0 < cap && tid < 2 * chunks) {
                const int r = pos - c0, c = tid % chunks;
                T* buf = tid < chunks ? kbuf : vbuf;
                reinterpret_cast<uint4*>(buf + r * hd)[c ^ (r & sw)] =
                    reinterpret_cast<const uint4*>(cur + (tid < chunks ? 0 : hd))[c];
            }
        }
        dh_cp_wait_all();
        __syncthreads();  // the chunk's rows (copies and the token's own row) are in place
        if (c0 == lo) DH_STAMP(4);

        float s[DH_ROWS_PT];
        if constexpr (TENSOR) {
            // 16 rows a tile, a warp's tiles every DH_WARPS-th: mma.m16n8k16 with A the
            // tile's keys (ldmatrix of the swizzled rows) and every column of B the query,
            // so D[g][*] is row g's sum; lane (g, 0) stores rows g and g + 8 into p.
            const int g = lane >> 2, tq = lane & 3;
            uint32_t qb[KSTEPS][2];
            const uint32_t* qw = reinterpret_cast<const uint32_t*>(part);
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ks++) {
                qb[ks][0] = qw[ks * 8 + tq];
                qb[ks][1] = qw[ks * 8 + tq + 4];
            }
            for (int tile = warp; tile * 16 < nrows; tile += DH_WARPS) {
                const int row = tile * 16 + (lane & 15);
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int ks = 0; ks < KSTEPS; ks++) {
                    uint32_t a[4];
                    ldmatrix_x4(a, kbuf + row * hd + ((2 * ks + (lane >> 4)) ^ (row & sw)) * VEC);
                    mma_16816<T>(acc, a, qb[ks][0], qb[ks][1]);
                }
                const int r0 = tile * 16 + g;
                if (tq == 0 && r0 < nrows) p[r0] = acc[0] * qscale;
                if (tq == 0 && r0 + 8 < nrows) p[r0 + 8] = acc[2] * qscale;
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < DH_ROWS_PT; i++) {
                const int r = tid + i * DH_THREADS;
                s[i] = r < nrows ? p[r] : 0.f;
            }
        } else {
            // Scores, one row per thread per pass, each row's chunks in turn (a thread skips
            // the passes past the chunk's rows).
#pragma unroll
            for (int i = 0; i < DH_ROWS_PT; i++) {
                s[i] = 0.f;
                const int r = tid + i * DH_THREADS;
                if (r >= nrows) continue;
                const uint4* krow = reinterpret_cast<const uint4*>(kbuf + r * hd);
#pragma unroll 1
                for (int c = 0; c < chunks; c++) {
                    const uint4 raw = krow[c ^ (r & sw)];
                    const T* kv = reinterpret_cast<const T*>(&raw);
                    const float4* q4 = reinterpret_cast<const float4*>(qs + c * VEC);
                    float d = 0.f;
#pragma unroll
                    for (int e4 = 0; e4 < VEC / 4; e4++) {
                        const float4 q = q4[e4];
                        d += q.x * to_f(kv[4 * e4]);
                        d += q.y * to_f(kv[4 * e4 + 1]);
                        d += q.z * to_f(kv[4 * e4 + 2]);
                        d += q.w * to_f(kv[4 * e4 + 3]);
                    }
                    s[i] += d;
                }
            }
        }
        float mloc = -INFINITY;
#pragma unroll
        for (int i = 0; i < DH_ROWS_PT; i++)
            if (tid + i * DH_THREADS < nrows) mloc = fmaxf(mloc, s[i]);
        for (int o = 16; o > 0; o >>= 1) mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, o));
        if (lane == 0) red[warp] = mloc;
        __syncthreads();
        float mc = red[0];
#pragma unroll
        for (int w = 1; w < DH_WARPS; w++) mc = fmaxf(mc, red[w]);
        const float mn = fmaxf(M, mc);  // finite: every chunk has a row
        const float alpha = M == -INFINITY ? 0.f : exp2f(M - mn);
        float lsum = 0.f;
#pragma unroll
        for (int i = 0; i < DH_ROWS_PT; i++) {
            const int r = tid + i * DH_THREADS;
            if (r < nrows) {
                const float e = exp2f(s[i] - mn);
                p[r] = e;
                lsum += e;
            }
        }
        lsum = warp_sum(lsum);
        if (lane == 0) red[8 + warp] = lsum;
        __syncthreads();
        float lc = 0.f;
#pragma unroll
        for (int w = 0; w < DH_WARPS; w++) lc += red[8 + w];
        L = L * alpha + lc;
        M = mn;
        if (c0 == lo) DH_STAMP(5);
#pragma unroll
        for (int x = 0; x < VEC; x++) acc[x] *= alpha;
#pragma unroll(CHUNKS > 0 ? 4 : 1)
        for (int r = pg; r < nrows; r += groups) {
            const float e = p[r];
            const uint4 raw = reinterpret_cast<const uint4*>(vbuf + r * hd)[pc ^ (r & sw)];
            const T* vv = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int x = 0; x < VEC; x++) acc[x] += e * to_f(vv[x]);
        }
    }

    // Sum the value chunks over the row groups: lanes of one chunk are neighbours.
    const int span = groups < 32 ? groups : 32;
    for (int o = 1; o < span; o <<= 1) {
#pragma unroll
        for (int x = 0; x < VEC; x++) acc[x] += __shfl_xor_sync(0xffffffffu, acc[x], o);
    }
    const int per_chunk = groups / span;  // partial sums per column chunk
    if (pg % span == 0) {
#pragma unroll
        for (int x = 0; x < VEC; x++) part[(pc * per_chunk + pg / span) * VEC + x] = acc[x];
    }
    __syncthreads();
    DH_STAMP(6);
    // One output column a thread (hd <= DH_THREADS: the launcher checks): its unnormalised
    // value sum over the row groups' partials.
    T* dst = out + ((long long)t * num_heads + head) * hd + tid;
    float own = 0.f;
    if (tid < hd) {
        const int c = tid / VEC, x = tid % VEC;
        for (int k = 0; k < per_chunk; k++) own += part[(c * per_chunk + k) * VEC + x];
    }
    if constexpr (SPLIT == 1) {
        const float inv_l = L > 0.f ? 1.f / L : 0.f;
        if (tid < hd) *dst = from_f<T>(own * inv_l);
    } else {
        // The other ranks push their sums with their max and sum into rank 0's recv, which
        // merges them in rank order.
        dh_cluster_wait();  // rank 0's mbarrier is initialised (arrived at on entry)
        if (split != 0) {
            const unsigned slot = dh_rank0(recv + (split - 1) * (hd + 2)), bar = dh_rank0(recv_bar);
            if (tid < hd) dh_push(slot + 4 * tid, own, bar);
            if (tid == 0) dh_push2(slot + 4 * hd, M, L, bar);
            DH_STAMP(7);
        } else {
            // CTA scope: the pushes land in this block's own shared memory, and a cluster-scope
            // acquire would add an L1 invalidation.
            while (!mbar_try(recv_bar, 0)) {
            }
            DH_STAMP(7);
            float ms[SPLIT], ls[SPLIT];
            ms[0] = M;
            ls[0] = L;
            float mg = M;
#pragma unroll
            for (int r = 1; r < SPLIT; r++) {
                ms[r] = recv[(r - 1) * (hd + 2) + hd];
                ls[r] = recv[(r - 1) * (hd + 2) + hd + 1];
                mg = fmaxf(mg, ms[r]);  // finite: the range holding pos has rows
            }
            float lg = 0.f;
#pragma unroll
            for (int r = 0; r < SPLIT; r++) {
                ms[r] = ls[r] > 0.f ? exp2f(ms[r] - mg) : 0.f;
                lg += ms[r] * ls[r];
            }
            const float inv_l = lg > 0.f ? 1.f / lg : 0.f;
            if (tid < hd) {
                float a = ms[0] * own;
#pragma unroll
                for (int r = 1; r < SPLIT; r++) a += ms[r] * recv[(r - 1) * (hd + 2) + tid];
                *dst = from_f<T>(a * inv_l);
            }
        }
    }
    DH_STAMP(8);
}

// Measurement only (VLLM_DS_KIND=stub): the attention replaced by a copy of the head's
// query, as bench/gpu/micro/persistent_chain.cu's stand-in; no cache write. Wrong tokens.
template <typename T>
__device__ void decode_attention_stub(T* out, const T* qkv, int num_heads, int num_kv_heads, int head_dim) {
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x, head = blockIdx.y;
    const int width = (num_heads + 2 * num_kv_heads) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        out[((long long)t * num_heads + head) * head_dim + d] = qkv[(long long)t * width + head * head_dim + d];
}

#define DH_PARAMS(T)                                                                                                \
    T *out, const T *qkv, const T *bias, const T *q_norm, const T *k_norm, const float *cos_table,                      \
        const float *sin_table, const uint32_t *positions, const uint32_t *token_seq, const uint32_t *block_tables,     \
        int max_blocks, int block_size, T *k_cache, T *v_cache, int num_heads, int num_kv_heads, int head_dim,          \
        float scale, int window, float eps, int cap
#define DH_ARGS                                                                                                    \
    out, qkv, bias, q_norm, k_norm, cos_table, sin_table, positions, token_seq, block_tables, max_blocks, block_size, \
        k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, window, eps, cap

// The SPLIT > 1 kernels: clusters of N blocks along z. NAME carries the chunk count C when
// the kernel is built for one.
#define INSTANTIATE_DH_SPLIT(NAME, SUFFIX, T, N, C)                                                                 \
    extern "C" __global__ void __cluster_dims__(1, 1, N) __launch_bounds__(DH_THREADS, 2)                           \
        decode_attention_heads_s##N##NAME##_##SUFFIX(DH_PARAMS(T)) {                                                   \
        decode_attention_heads<T, N, C>(DH_ARGS);                                                                   \
    }

#define INSTANTIATE_DH_CHUNKS(NAME, SUFFIX, T, C)                                                                   \
    extern "C" __global__ void __launch_bounds__(DH_THREADS, 2) decode_attention_heads##NAME##_##SUFFIX(DH_PARAMS(T)) { \
        decode_attention_heads<T, 1, C>(DH_ARGS);                                                                   \
    }                                                                                                               \
    INSTANTIATE_DH_SPLIT(NAME, SUFFIX, T, 2, C)                                                                     \
    INSTANTIATE_DH_SPLIT(NAME, SUFFIX, T, 4, C)                                                                     \
    INSTANTIATE_DH_SPLIT(NAME, SUFFIX, T, 8, C)

// Any head_dim; in 16-bit types also rows of 8 and 16 chunks (head_dim 64 and 128), whose
// scores go through the tensor cores.
#define INSTANTIATE_DH(SUFFIX, T)                                                                                   \
    INSTANTIATE_DH_CHUNKS(, SUFFIX, T, 0)                                                                           \
    extern "C" __global__ void decode_attention_stub_##SUFFIX(DH_PARAMS(T)) {                                       \
        decode_attention_stub<T>(out, qkv, num_heads, num_kv_heads, head_dim);                                      \
    }
#define INSTANTIATE_DH_16BIT(SUFFIX, T)                                                                             \
    INSTANTIATE_DH(SUFFIX, T)                                                                                       \
    INSTANTIATE_DH_CHUNKS(_c8, SUFFIX, T, 8)                                                                        \
    INSTANTIATE_DH_CHUNKS(_c16, SUFFIX, T, 16)

INSTANTIATE_DH(f32, float)
INSTANTIATE_DH_16BIT(bf16, __nv_bfloat16)
INSTANTIATE_DH_16BIT(f16, __half)
