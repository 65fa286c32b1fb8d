#!/usr/bin/env bash
# Compiles the `cuda` feature (engine binaries, the device test binary, the NIF) without a
# GPU, so the CUDA path cannot rot: nvcc 13.0 and the CUDA runtime from the pinned Python
# wheels (../shared/tools/cuda-toolkit.sh when present, else the same pins here), cuBLAS and
# the driver as symbol-less link stubs. Nothing is run: there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# scripts/test may have installed Rust without leaving it on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
if [ -x ../shared/tools/cuda-toolkit.sh ]; then
  eval "$(../shared/tools/cuda-toolkit.sh)"
else
  dir=$HOME/.cache/vllm/cuda13
  home=$dir/nvidia/cu13
  if [ ! -x "$home/bin/nvcc" ]; then
    # The GPU machines' driver is CUDA 13.0: the pins must not move past it.
    python3 -m pip install -q --no-deps --target "$dir" \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35
  fi
  mkdir -p "$home/lib/stubs"
  for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13; do
    base=${lib%%.so*}.so
    [ -f "$home/lib/stubs/$base" ] || echo "" | gcc -shared -x c - -o "$home/lib/stubs/$base" -Wl,-soname,$lib
  done
  export CUDA_HOME=$home PATH=$home/bin:$PATH CUDA_COMPUTE_CAP=90
  export LIBRARY_PATH=$home/lib/stubs:$home/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
export CUDA_ROOT=$CUDA_HOME CUDA_PATH=$CUDA_HOME
. bench/gpu/link-stubs.sh
echo "==> cargo build --features cuda (engine binaries, device test binaries, NIF)"
cargo build --release --features cuda -p vllm_engine --bins
cargo test --release --features cuda -p vllm_engine --lib --test model_device --test device_checks --test model_tensor_parallel --no-run
cargo build --release --features cuda -p vllm_nif
