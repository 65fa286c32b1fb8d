// attention_batch (kernels/attention_batch.cu and `bf`, both before this) instantiated beyond the
// engine's forms, for the micro-benchmarks to compare: group size G, U rows per pass, at
// least MINB resident blocks per SM (a register cap), PIPE the pipelined loads.
#pragma once

#define AB_VARIANT(NAME, G, U, MINB, PIPE)                                                                             \
    __global__ void __launch_bounds__(AB_MAX_WARPS * 32, MINB) NAME(                                                   \
        bf* out, float* part_acc, float* part_ml, const bf* q, const bf* k_cache, const bf* v_cache,                  \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,           \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,        \
        int num_splits, unsigned int* done_counts) {                                                                   \
        attention_batch<bf, G, U, PIPE>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,           \
                                        block_tables, max_blocks, block_size, num_heads, num_kv_heads, head_dim,      \
                                        scale, window, partition, num_splits, done_counts);                           \
    }

// The tensor-core form (attention_batch_tc, one warp per block) with STAGES slices in
// flight and at least MINB blocks per SM; the launch adds STAGES * 2 * 16 * 128 * 2 bytes.
#define AB_VARIANT_TC(NAME, STAGES, MINB)                                                                              \
    __global__ void __launch_bounds__(32, MINB) NAME(                                                                 \
        bf* out, float* part_acc, float* part_ml, const bf* q, const bf* k_cache, const bf* v_cache,                  \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks,           \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int window, int partition,        \
        int num_splits, unsigned int* done_counts) {                                                                   \
        attention_batch_tc<bf, 128, 4, STAGES>(out, part_acc, part_ml, q, k_cache, v_cache, positions, token_seq,    \
                                               block_tables, max_blocks, block_size, num_heads, num_kv_heads, scale, \
                                               window, partition, num_splits, done_counts);                          \
    }

// Any of them (and the engine's) as a host-side pointer.
typedef void (*AttnKernel)(bf*, float*, float*, const bf*, const bf*, const bf*, const uint32_t*, const uint32_t*,
                           const uint32_t*, int, int, int, int, int, float, int, int, int, unsigned int*);
