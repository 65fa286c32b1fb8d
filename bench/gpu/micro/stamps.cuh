// gemv_staged's timeline (with -DSTG_STAMPS): the kernel's STG_STAMP points (start, past
// pdl_wait, x' built, weights in, end), stamped by every block of two layers' products, and
// printed as the earliest, median and latest block of each point, µs after the first
// product's first start. A stamp costs the chain ~2 µs a layer (the stamped chain runs ~16
// against ~13.7 µs), so read the gaps between points, not the total.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "check.cuh"

#define STAMP_PRODUCTS 8
#define STAMP_BLOCKS 256
__device__ unsigned long long g_stamps[STAMP_PRODUCTS][STAMP_BLOCKS][5];
// In the constant cache, so a stamp adds no L2 round trip to the chain.
__constant__ const char* g_stamp_lo;
__constant__ size_t g_stamp_layer;

__device__ __forceinline__ unsigned long long stamp_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Points 0-3 go to shared memory (thread 0's), and at the end (4) thread 0 writes them out
// while every warp's lane 0 raises the end (the latest warp wins). product: 0 qkv, 1 o,
// 2 gate_up, 3 down of the first layer, 4.. the second's.
__device__ __forceinline__ void stamp_at(const void* w, int product, int point) {
    __shared__ unsigned long long at[4];
    const char* p = static_cast<const char*>(w);
    if (product < 0 || p < g_stamp_lo || p >= g_stamp_lo + 2 * g_stamp_layer) return;
    const unsigned long long t = stamp_now();
    if (point < 4) {
        if (threadIdx.x == 0) at[point] = t;
        return;
    }
    if ((threadIdx.x & 31) != 0) return;
    unsigned long long* out = g_stamps[product + 4 * (int)((p - g_stamp_lo) / g_stamp_layer)][blockIdx.x];
    if (threadIdx.x == 0)
        for (int k = 0; k < 4; k++) out[k] = at[k];
    atomicMax(&out[4], t);
}

#define STG_STAMP(point) \
    stamp_at(w, MODE == GEMV_STORE ? 0 : MODE == GEMV_SILU ? 2 : MODE == GEMV_ADD ? (inner < 2048 ? 1 : 3) : -1, point)

static void stamps_setup(const void* lo, size_t layer_bytes) {
    CK(cudaMemcpyToSymbol(g_stamp_lo, &lo, sizeof lo));
    CK(cudaMemcpyToSymbol(g_stamp_layer, &layer_bytes, sizeof layer_bytes));
}

// One timeline row: for each point k, the earliest, median and latest of blocks' stamps
// at[b * points + k] (0: not stamped), µs after t0.
static void stamps_row(const char* name, const unsigned long long* at, int blocks, int points,
                       const char* const* labels, unsigned long long t0) {
    printf("  %-11s", name);
    for (int k = 0; k < points; k++) {
        std::vector<double> v;
        for (int b = 0; b < blocks; b++)
            if (at[b * points + k]) v.push_back((at[b * points + k] - t0) / 1e3);
        std::sort(v.begin(), v.end());
        if (v.empty()) continue;
        printf(" | %s %5.2f %5.2f %5.2f", labels[k], v.front(), v[v.size() / 2], v.back());
    }
    printf("\n");
}

// Prints the products' rows; returns the origin (layer 12's first qkv start) for others.
static unsigned long long stamps_print() {
    static unsigned long long s[STAMP_PRODUCTS][STAMP_BLOCKS][5];
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpyFromSymbol(s, g_stamps, sizeof s));
    const char* names[4] = {"qkv", "o", "gate_up", "down"};
    const char* points[5] = {"start", "wait", "x'", "weights", "end"};
    unsigned long long t0 = ~0ull;
    for (int b = 0; b < STAMP_BLOCKS; b++)
        if (s[0][b][0]) t0 = std::min(t0, s[0][b][0]);
    printf("timeline of the last chain, us after layer 12's first qkv start (earliest / median / latest block):\n");
    for (int p = 0; p < STAMP_PRODUCTS; p++) {
        char name[32];
        snprintf(name, sizeof name, "L%d %s", 12 + p / 4, names[p % 4]);
        stamps_row(name, &s[p][0][0], STAMP_BLOCKS, 5, points, t0);
    }
    return t0;
}
