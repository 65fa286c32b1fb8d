// Weights a kernel asks the L2 to fetch for the kernels after it (backend/cuda/l2_prefetch.rs).
// A batch-1 decode step is a chain of short kernels, each of which reads its weights from
// DRAM only while it runs, so DRAM idles through every kernel's ramp-up, tail and the
// attention between products. A kernel that names the next weights here keeps DRAM busy
// through those gaps; the products after it then read the L2.
#pragma once

#define L2_PREFETCH_PIECES 4
// Bytes one cp.async.bulk.prefetch asks for; pieces are spread over the grid in these units.
#define L2_PREFETCH_UNIT (16 * 1024)

// Up to L2_PREFETCH_PIECES address ranges (16-byte aligned, lengths multiples of 16; unused
// ones have 0 bytes).
struct L2Prefetch {
    unsigned long long ptr[L2_PREFETCH_PIECES];
    unsigned long long bytes[L2_PREFETCH_PIECES];
};

// Issues `pf` from a 1-D grid: unit u of the ranges goes to block u % gridDim.x, so every SM's
// copy engine shares the requests. Fire and forget: nothing waits for the data.
__device__ __forceinline__ void l2_prefetch(const L2Prefetch& pf) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned long long threads = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long me = (unsigned long long)threadIdx.x * gridDim.x + blockIdx.x;
    unsigned long long first = 0;  // units of the earlier pieces
#pragma unroll
    for (int p = 0; p < L2_PREFETCH_PIECES; p++) {
        const unsigned long long bytes = pf.bytes[p];
        const unsigned long long units = (bytes + L2_PREFETCH_UNIT - 1) / L2_PREFETCH_UNIT;
        for (unsigned long long u = (me + threads - first % threads) % threads; u < units; u += threads) {
            const unsigned long long at = u * L2_PREFETCH_UNIT;
            const unsigned size = (unsigned)min((unsigned long long)L2_PREFETCH_UNIT, bytes - at);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(pf.ptr[p] + at), "r"(size) : "memory");
        }
        first += units;
    }
#endif
}
