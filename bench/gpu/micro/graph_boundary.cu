// What a decode step pays between two replays of its graph (issue 7, session 18): a graph
// of W3's launch count (123 kernels, ~3.5 µs each, programmatic dependent launches after
// the first, as the engine captures them) replayed back to back, bare or with the stream
// operations the engine puts between replays: the inputs' upload (pageable or pinned) and
// the argmax's copy back plus its event. The first and last kernels stamp %globaltimer, so
// the gap between one replay's end and the next one's start is measured on the device.
//   nvcc -O3 -arch=sm_90 -std=c++17 graph_boundary.cu -o graph_boundary && ./graph_boundary
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "check.cuh"

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// role 1: first kernel (stamps the start), 2: last (stamps the end, counts the replay).
__global__ void step_kernel(unsigned long long* stamps, unsigned* count, int role, long long cycles, const unsigned* in,
                            unsigned* out) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (role == 1 && blockIdx.x == 0 && threadIdx.x == 0) stamps[2 * *count] = now_ns();
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
    if (role == 1 && threadIdx.x == 0 && in) out[blockIdx.x] = in[blockIdx.x];
    if (role == 2 && blockIdx.x == 0 && threadIdx.x == 0) {
        stamps[2 * *count + 1] = now_ns();
        *count += 1;
    }
}

static void launch(cudaStream_t st, bool pdl, unsigned long long* stamps, unsigned* count, int role, long long cycles,
                   const unsigned* in, unsigned* out) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(132);
    cfg.blockDim = dim3(256);
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, step_kernel, stamps, count, role, cycles, in, out));
}

int main() {
    const int kernels = 123, replays = 300, meta = 600;  // meta: u32 of the inputs' upload
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    unsigned long long* stamps;
    unsigned *count, *meta_dev, *sink, *argmax, *pinned_in, *pinned_out;
    CK(cudaMalloc(&stamps, 2 * 8 * 4 * replays * 8));
    CK(cudaMalloc(&count, 4));
    CK(cudaMalloc(&meta_dev, meta * 4));
    CK(cudaMalloc(&sink, 4096));
    CK(cudaMalloc(&argmax, 8));
    CK(cudaMallocHost(&pinned_in, meta * 4));
    CK(cudaMallocHost(&pinned_out, 8));
    std::vector<unsigned> pageable(meta, 1);
    const long long cycles = 3500LL * 1980 / 1000;  // ~3.5 µs at 1,980 MHz

    // steps: decode steps captured into one graph (1 = the engine today).
    auto capture = [&](int steps) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        for (int s = 0; s < steps; s++)
            for (int k = 0; k < kernels; k++) {
                const int role = (s == 0 && k == 0) ? 1 : (s == steps - 1 && k == kernels - 1) ? 2 : 0;
                launch(st, k > 0 || s > 0, stamps, count, role, cycles, k == 0 ? meta_dev : nullptr, sink);
            }
        CK(cudaStreamEndCapture(st, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        return ge;
    };
    struct Mode {
        const char* name;
        int steps;
        int upload;  // 0 none, 1 pageable, 2 pinned
        bool fetch;  // the argmax's copy back + an event
    };
    const Mode modes[] = {
        {"bare replays", 1, 0, false},
        {"+ event", 1, 0, true},
        {"+ pageable upload + copy back + event (today)", 1, 1, true},
        {"+ pinned upload + copy back + event", 1, 2, true},
        {"two steps a graph, today's operations", 2, 1, true},
        {"four steps a graph, today's operations", 4, 1, true},
    };
    cudaEvent_t ev, a, b;
    CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    printf("| mode | µs a step (period) | in-graph µs a step | between replays µs |\n|---|---|---|---|\n");
    for (int round = 0; round < 2; round++)
        for (const Mode& m : modes) {
            cudaGraphExec_t ge = capture(m.steps);
            const int n = replays / m.steps;
            CK(cudaMemset(count, 0, 4));
            CK(cudaStreamSynchronize(st));
            CK(cudaEventRecord(a, st));
            for (int i = 0; i < n; i++) {
                if (m.upload == 1) CK(cudaMemcpyAsync(meta_dev, pageable.data(), meta * 4, cudaMemcpyHostToDevice, st));
                if (m.upload == 2) CK(cudaMemcpyAsync(meta_dev, pinned_in, meta * 4, cudaMemcpyHostToDevice, st));
                CK(cudaGraphLaunch(ge, st));
                if (m.fetch) {
                    if (m.upload) CK(cudaMemcpyAsync(pinned_out, argmax, 8, cudaMemcpyDeviceToHost, st));
                    CK(cudaEventRecord(ev, st));
                }
            }
            CK(cudaEventRecord(b, st));
            CK(cudaEventSynchronize(b));
            float ms;
            CK(cudaEventElapsedTime(&ms, a, b));
            std::vector<unsigned long long> h(2 * n);
            CK(cudaMemcpy(h.data(), stamps, 16 * n, cudaMemcpyDeviceToHost));
            double inside = 0, between = 0;
            for (int i = 10; i < n; i++) {
                inside += h[2 * i + 1] - h[2 * i];
                between += h[2 * i] - h[2 * i - 1];
            }
            const int counted = n - 10;
            printf("| %s | %.2f | %.2f | %.2f |\n", m.name, ms * 1e3 / replays, inside / counted / 1e3 / m.steps,
                   between / counted / 1e3 / m.steps);
            CK(cudaGraphExecDestroy(ge));
        }
    return 0;
}
