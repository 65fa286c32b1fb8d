// The micro-benchmarks' error checks: a failed CUDA call (CK) or cuBLAS / cuBLASLt call
// (CB, any nonzero status) prints where and exits.
#pragma once
#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                                 \
    do {                                                                                      \
        cudaError_t e = (x);                                                                  \
        if (e != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)
// st_, not s: the call itself may name a variable s (a stream).
#define CB(x)                                                                       \
    do {                                                                            \
        int st_ = (int)(x);                                                         \
        if (st_ != 0) {                                                             \
            fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #x, st_); \
            exit(1);                                                                \
        }                                                                           \
    } while (0)
