// Device buffers compared on the host: copied back as float, and the relative L2 error of one
// against a reference (infinite when it holds a non-finite value).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "check.cuh"

template <typename E> static std::vector<float> host(const E* d, size_t n) {
    std::vector<E> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(E), cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = (float)h[i];
    return f;
}

template <typename E> static double rel(const E* a, const E* b, size_t n) {
    auto x = host(a, n), y = host(b, n);
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(x[i])) return INFINITY;
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += y[i] * y[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}
