// How far a micro-benchmark's bf16 result is from its reference: relative L2 error, and
// (when asked) the largest absolute difference.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <vector>

static double rel_l2(const std::vector<__nv_bfloat16>& a, const std::vector<__nv_bfloat16>& b,
                     double* max_abs = nullptr) {
    double num = 0, den = 0, worst = 0;
    for (size_t i = 0; i < a.size(); i++) {
        const double x = __bfloat162float(a[i]), y = __bfloat162float(b[i]);
        num += (x - y) * (x - y);
        den += y * y;
        worst = std::max(worst, std::fabs(x - y));
    }
    if (max_abs) *max_abs = worst;
    return std::sqrt(num / std::max(den, 1e-30));
}
