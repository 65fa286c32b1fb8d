// The micro-benchmarks' timer: `reps` calls of run(i) on `stream`, each between its own pair
// of events (their median), and optionally all of them once more between one pair (the
// back-to-back total, which includes the launch gaps the median leaves out). Milliseconds.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "check.cuh"

struct Timing {
    float median_ms;
    float back_to_back_ms;  // 0 unless asked for
};

template <typename F>
Timing time_runs(cudaStream_t stream, int reps, F&& run, bool back_to_back = false) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a, stream));
        run(i);
        CK(cudaEventRecord(b, stream));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ts.push_back(ms);
    }
    Timing t{0.f, 0.f};
    if (back_to_back) {
        CK(cudaEventRecord(a, stream));
        for (int i = 0; i < reps; i++) run(reps + i);
        CK(cudaEventRecord(b, stream));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&t.back_to_back_ms, a, b));
    }
    CK(cudaGetLastError());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ts.begin(), ts.end());
    t.median_ms = ts[ts.size() / 2];
    return t;
}

// `body`'s launches on `stream` captured once into a CUDA graph, warmed up, then the median
// of `reps` replays. Milliseconds.
template <typename F>
float time_graph(cudaStream_t stream, F body, int reps = 30) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    body();
    CK(cudaStreamEndCapture(stream, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 3; i++) CK(cudaGraphLaunch(ge, stream));
    const float ms = time_runs(stream, reps, [&](int) { CK(cudaGraphLaunch(ge, stream)); }).median_ms;
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return ms;
}
