// Helpers shared by the kernel files (each .cu is its own module; this header is included,
// not linked): storage-type conversions and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Rounds through the storage type (a no-op for float32).
template <typename T> __device__ __forceinline__ float round_t(float x) { return to_f<T>(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Argmax order: the larger value wins, the lower index on equal values.
__device__ __forceinline__ void argmax_merge(float& v, int& idx, float ov, int oi) {
    if (ov > v || (ov == v && oi < idx)) {
        v = ov;
        idx = oi;
    }
}

// Every lane ends with the warp's (value, index) in argmax order.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
}

// Row `row` of `rows` as the argmax kernels leave it: out[row] the id (0 where no value
// won), out[rows + row] the value's float32 bits; the same to `host_out` (page-locked host
// memory the host reads after an event) when given.
__device__ __forceinline__ void store_argmax(uint32_t* out, uint32_t* host_out, unsigned row, unsigned rows, float v,
                                             int idx) {
    const uint32_t id = idx == 0x7fffffff ? 0u : (uint32_t)idx;
    out[row] = id;
    out[rows + row] = __float_as_uint(v);
    if (host_out) {
        host_out[row] = id;
        host_out[rows + row] = __float_as_uint(v);
        __threadfence_system();
    }
}
