#!/usr/bin/env bash
# Builds the CUDA variant of the engine's binaries on the development machine (no GPU) and
# packs them for the GPU machine: .gpu/bin/{vllm-bench,vllm-logits} (stripped), which
# bench/gpu/check_and_bench.sh runs there. Run from the repository root.
#   bench/gpu/build-cuda.sh            # CARGO_TARGET_DIR defaults to target-cuda
set -euo pipefail
root=$(pwd)
shared=${SHARED_DIR:-../shared}
eval "$("$shared/tools/cuda-toolkit.sh")"
export CUDA_ROOT=$CUDA_HOME CUDA_PATH=$CUDA_HOME
. "$root/bench/gpu/link-stubs.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
cargo build --release --features cuda -p vllm_engine --bin vllm-bench --bin vllm-logits
mkdir -p .gpu/bin
for b in vllm-bench vllm-logits; do
  strip -o ".gpu/bin/$b" "$CARGO_TARGET_DIR/release/$b"
done
# The device-generic engine tests, run there with VLLM_TEST_DEVICE=cuda, and the crate's
# unit tests (engine_unit; those of backend/cuda need the real driver libraries to load).
for t in model_device device_checks model_tensor_parallel engine_unit; do
  target=(--test "$t"); [ "$t" = engine_unit ] && target=(--lib)
  test_bin=$(cargo test --release --features cuda -p vllm_engine "${target[@]}" --no-run 2>&1 \
    | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
  strip -o ".gpu/bin/$t" "$test_bin"
done
ex="$(git rev-parse --git-common-dir)/info/exclude"; grep -qx '/.gpu/' "$ex" 2>/dev/null || echo '/.gpu/' >> "$ex"
ls -la .gpu/bin
