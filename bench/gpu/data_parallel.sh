#!/usr/bin/env bash
# On a multi-GPU machine, from the repository root; builds nothing (needs .gpu/ from
# bench/gpu/pack.sh). W1 (Qwen3-0.6B shape, dummy bf16 weights) through one engine and
# through N replicas, one per GPU (`vllm-bench --data-parallel N`: requests split by least
# pending tokens), in the same call; the speed-up last. REQUESTS lists the request counts
# (default W1's 256; "256 512" adds the same seeded workload with twice the requests, more
# than one engine batches at once). Logs and JSON under $OUT.
#   DP="2" REQUESTS="256 512" RUNS=2 bash bench/gpu/data_parallel.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
runs=${RUNS:-2}
dps=${DP:-2}
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$out/nvidia-smi.txt"
commit=$(cat "$gpu/COMMIT" 2>/dev/null || echo unknown)

# w1 REQUESTS DP: one vllm-bench run; prints the median output tok/s.
w1() {
  local tag="w1-n$1-dp$2"
  timeout 400 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy \
    --device cuda --dtype bfloat16 --tokenizer "$gpu/tokenizer.json" --runs "$runs" \
    --max-model-len 2048 --max-num-batched-tokens 8192 --num-requests "$1" --data-parallel "$2" \
    --json "$out/$tag.json" >"$out/$tag.txt" 2>&1 || tail -5 "$out/$tag.txt" >&2
  sed -n 's/^w1 median: \([0-9]*\) output tok\/s.*/\1/p' "$out/$tag.txt"
}

summary=("commit $commit")
for n in ${REQUESTS:-256}; do
  base=$(w1 "$n" 1)
  summary+=("$n requests, DP=1: ${base:-FAILED} output tok/s")
  for d in $dps; do
    v=$(w1 "$n" "$d")
    ratio=$(python3 -c "print(f'{$v / $base:.2f}x')" 2>/dev/null || echo "?")
    summary+=("$n requests, DP=$d: ${v:-FAILED} output tok/s -> $ratio of DP=1")
  done
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
