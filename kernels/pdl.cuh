// Programmatic dependent launch (backend/cuda/pdl.rs): a kernel launched with programmatic
// stream serialization may start before the previous kernel on the stream has finished.
// It calls pdl_launch_dependents once its own blocks may let the next kernel start, issues
// what does not depend on the previous kernel, then pdl_wait before touching anything that
// kernel wrote or reads. Both are no-ops for a normal launch and before sm_90.
#pragma once

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
