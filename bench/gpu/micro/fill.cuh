// The micro-benchmarks' inputs: n values of type E, uniform in [-scale, scale), from a hash
// of the index and `seed` (the same buffers on every run and card).
#pragma once

template <typename E>
__global__ void fill(E* p, long long n, unsigned seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13;
        h *= 0x5bd1e995u;
        h ^= h >> 15;
        p[i] = (E)(((h & 0xffffff) / 16777216.f - 0.5f) * 2.f * scale);
    }
}
