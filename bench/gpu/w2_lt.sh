#!/usr/bin/env bash
# Issue 7, session 7 (h7b): W2 with the eager products through cuBLASLt, the algorithm tuned
# per (shape, rows bucket) (backend/cuda/gemm_lt.rs), and the group-4 decode attention with
# 4 rows per pass, against the session-6 path, plus the checks, in one call. On the GPU
# machine, from the repository root, with $GPU_DIR packed by pack.sh.
# Stages, most needed first (each writes its log to $OUT/<stage>.log as it runs, appends to
# $OUT/summary.txt and refreshes $OUT/logs.tgz, so a call cut by its limit returns what ran;
# the session-7 call lost its checks' output before this):
#  1. W2 (RUNS_W2, default 2) with the tuned products; the engine logs every tuned key
#     (GemmEx vs each cuBLASLt candidate, µs) at start-up;
#  2. W2 once with VLLM_GEMM_LT=0 VLLM_ATT_G4=u2 (the session-6 path: GemmEx products,
#     the group-4 decode attention before change 2);
#  3. checks: model_device + device_checks, bf16/f16 vs HF transformers;
#  4. W1 once (must stay >= 21,000 output tok/s);
#  5. micro/gemm_bench.cu w2 (built here with the machine's nvcc);
#  6. W2 op timing (eager, per-op device time of a decode step), tuned products.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
final=${OUT:-$PWD/gpu-results}
mkdir -p "$final"
work=$(mktemp -d)
stage() { # $1: name; the rest: environment for check_and_bench.sh
  local name=$1; shift
  echo "=== stage $name ($(date +%T))"
  # Straight into $OUT (one file a stage, 8 at most come back): a stage cut by the call's
  # limit still returns what it printed.
  env OUT="$work/$name" "$@" bash "$here/check_and_bench.sh" > "$final/$name.log" 2>&1
  cp "$final/$name.log" "$work/$name.log"
  { echo "--- $name"; sed -n '/^== summary/,$p' "$work/$name.log"; grep -E "^gemm_lt" "$work/$name/"*.txt 2>/dev/null | sed 's/^[^:]*://' | grep "rows<=1024\|rows<=16384\|tuned" ; } >> "$final/summary.txt"
  tar czf "$final/logs.tgz" -C "$work" . 2>/dev/null
  tail -4 "$final/summary.txt"
}
stage w2_lt CHECKS="" WORKLOADS=w2 RUNS=${RUNS_W2:-2}
stage w2_old CHECKS="" WORKLOADS=w2 RUNS=1 VLLM_GEMM_LT=0 VLLM_ATT_G4=u2
stage checks CHECKS="tests hf" WORKLOADS=""
stage w1_lt CHECKS="" WORKLOADS=w1 RUNS=1
echo "=== stage gemm_bench ($(date +%T))"
. "$here/setup.sh" > /dev/null 2>&1
out=$final
nvcc_bin=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null | head -1)
inc=$(dirname "$(find / -name cublasLt.h -path "*include*" 2>/dev/null | head -1)")
libdir=$(echo "$LD_LIBRARY_PATH" | tr ':' '\n' | while read -r d; do [ -e "$d/libcublasLt.so.13" ] && echo "$d" && break; done)
if "$nvcc_bin" -O3 -arch=sm_90 -std=c++17 -I"$inc" "$here/micro/gemm_bench.cu" -L"$libdir" \
    -l:libcublasLt.so.13 -l:libcublas.so.13 -o "$work/gemm_bench" 2> "$work/gemm_build.txt"; then
  timeout 120 "$work/gemm_bench" w2 > "$work/gemm_bench_w2.txt" 2>&1
else
  cp "$work/gemm_build.txt" "$work/gemm_bench_w2.txt"
fi
tail -30 "$work/gemm_bench_w2.txt" | tee -a "$final/summary.txt"
stage op_timing CHECKS="" WORKLOADS="" OP_TIMING=w2
echo "=== done ($(date +%T))"
cat "$final/summary.txt"
