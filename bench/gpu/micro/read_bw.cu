// The read bandwidth this GPU gives a pure stream, to compare the GEMVs against (issue 7,
// session 6: the lm_head and gate_up stream at ~3.0 / ~2.3 TB/s through either the warps'
// loads or the copy engine). Built and run on the GPU machine (or built here and carried):
//   nvcc -O3 -arch=sm_90 -std=c++17 read_bw.cu -o read_bw && ./read_bw
// Per size (the lm_head's 272 MB; gate_up's 17.4 MB, rotating over 24 copies as the layers
// do, so the L2 does not serve them): a read-only sum with 16-byte loads over 1..4 blocks of
// 256..1024 threads per SM, and a device-to-device cudaMemcpy (reads + writes), each the
// median of 20 event-timed launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e = (x);                                                               \
        if (e != cudaSuccess) {                                                            \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            return 1;                                                                      \
        }                                                                                  \
    } while (0)

// Each thread sums UNROLL 16-byte loads in flight per round; the result goes to sink only
// when impossible, so the loads are not optimised away.
template <int UNROLL>
__global__ void read_sum(const uint4* p, long long n, unsigned* sink) {
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

template <typename F> static float median_ms(F launch, int reps = 20) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> t;
    for (int r = 0; r < reps + 2; r++) {
        cudaEventRecord(a);
        launch(r);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        if (r >= 2) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

int main() {
    int dev = 0, sms = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    printf("read_bw on %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
    unsigned* sink;
    CK(cudaMalloc(&sink, 4));
    struct Case { const char* name; size_t bytes; int copies; } cases[] = {{"lm_head 272 MB", 272ull << 20, 1},
                                                                           {"gate_up 17.4 MB x24", 17400ull << 10, 24}};
    for (auto& c : cases) {
        char* buf;
        CK(cudaMalloc(&buf, c.bytes * c.copies));
        CK(cudaMemset(buf, 1, c.bytes * c.copies));
        char* dst;
        CK(cudaMalloc(&dst, c.bytes));
        const long long n = c.bytes / 16;
        for (int per_sm : {1, 2, 4})
            for (int threads : {256, 512, 1024}) {
                if (per_sm * threads > 2048) continue;
                const float ms = median_ms([&](int r) {
                    read_sum<4><<<sms * per_sm, threads>>>((const uint4*)(buf + (r % c.copies) * c.bytes), n, sink);
                });
                printf("%-22s read_sum x4  %d x %4d threads per SM: %8.2f us  %.2f TB/s\n", c.name, per_sm, threads,
                       ms * 1e3, c.bytes / (ms * 1e-3) / 1e12);
            }
        const float ms = median_ms([&](int r) { cudaMemcpyAsync(dst, buf + (r % c.copies) * c.bytes, c.bytes, cudaMemcpyDeviceToDevice); });
        printf("%-22s memcpy D2D (read + write): %8.2f us  %.2f TB/s moved\n", c.name, ms * 1e3, 2.0 * c.bytes / (ms * 1e-3) / 1e12);
        CK(cudaGetLastError());
        CK(cudaFree(buf));
        CK(cudaFree(dst));
    }
    return 0;
}
