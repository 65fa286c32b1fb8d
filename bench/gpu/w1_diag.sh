#!/usr/bin/env bash
# Where W1's decode time goes (issue 7, session 5): on the GPU machine, from the repository
# root, after check_and_bench.sh's checks (same $GPU_DIR). Builds one micro with the
# machine's nvcc; writes under $OUT; prints a short summary last.
# 1. micro/gemm_bench.cu: W1's four decode products at 8..256 rows, the engine's cuBLAS
#    GemmEx call against every algorithm cuBLASLt's heuristic offers (GEMM_W2=1: W2's too).
# 2. ncu (--clock-control none --cache-control none): every kernel of ~2 W1 decode steps
#    mid-run (NCU_SKIP kernels skipped, NCU_COUNT timed), summed per kernel and grid.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
lines=()

nvcc_bin=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null | head -1)
inc=$(dirname "$(find / -name cublasLt.h -path "*include*" 2>/dev/null | head -1)")
libdir=$(echo "$LD_LIBRARY_PATH" | tr ':' '\n' | while read -r d; do [ -e "$d/libcublasLt.so.13" ] && echo "$d" && break; done)
echo "== gemm_bench (nvcc $nvcc_bin, cublasLt.h in $inc, libraries in $libdir)"
if "$nvcc_bin" -O3 -arch=sm_90 -std=c++17 -I"$inc" "$here/micro/gemm_bench.cu" -L"$libdir" \
    -l:libcublasLt.so.13 -l:libcublas.so.13 -o /tmp/gemm_bench 2> "$out/gemm_build.txt"; then
  timeout 200 /tmp/gemm_bench 2>&1 | tee "$out/gemm_bench.txt"
  while read -r l; do lines+=("$l"); done < "$out/gemm_bench.txt"
  # GEMM_W2=1: Llama-3.1-8B's products too (W2's decode steps are their products).
  if [ "${GEMM_W2:-0}" = 1 ]; then
    timeout 300 /tmp/gemm_bench w2 2>&1 | tee "$out/gemm_bench_w2.txt"
    while read -r l; do lines+=("$l"); done < <(grep -E "rows 256|^gemm step" "$out/gemm_bench_w2.txt")
  fi
else
  lines+=("gemm_bench: build failed: $(tail -3 "$out/gemm_build.txt")")
fi

if [ "${NCU:-1}" = 1 ]; then
  echo "== ncu: W1 kernels of ~2 decode steps mid-run"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  VLLM_STEP_TIMING= timeout 240 "$ncu_bin" --clock-control none --cache-control none \
    --launch-skip "${NCU_SKIP:-140000}" --launch-count "${NCU_COUNT:-560}" --metrics gpu__time_duration.sum --csv \
    "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy --device cuda \
    --dtype bfloat16 --tokenizer "$gpu/tokenizer.json" --runs 1 --max-model-len 2048 \
    --max-num-batched-tokens 8192 > "$out/ncu-w1.csv" 2> "$out/ncu-w1.err"
  python3 "$here/ncu_summary.py" "$out/ncu-w1.csv" > "$out/ncu-w1.txt" 2>&1 || tail -5 "$out/ncu-w1.err" >> "$out/ncu-w1.txt"
  while read -r l; do lines+=("$l"); done < <(head -24 "$out/ncu-w1.txt")
fi

echo
echo "== w1 diagnosis summary"
printf '%s\n' "${lines[@]}" | tee "$out/w1_diag.txt"
