#!/usr/bin/env bash
# On a multi-GPU machine, from the repository root; builds nothing (needs .gpu/ from
# bench/gpu/pack.sh). W1 (Qwen3-0.6B shape, dummy bf16 weights) through one engine and
# through N replicas, one per GPU (`vllm-bench --data-parallel N`: requests split by least
# pending tokens), in the same call; the speed-up last. Logs and JSON under $OUT.
#   DP="2" RUNS=2 bash bench/gpu/data_parallel.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
runs=${RUNS:-2}
dps=${DP:-2}
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$out/nvidia-smi.txt"
commit=$(cat "$gpu/COMMIT" 2>/dev/null || echo unknown)

w1() {
  timeout 400 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy \
    --device cuda --dtype bfloat16 --tokenizer "$gpu/tokenizer.json" --runs "$runs" \
    --max-model-len 2048 --max-num-batched-tokens 8192 --data-parallel "$1" --json "$out/w1-dp$1.json" \
    2>&1 | tee "$out/w1-dp$1.txt"
}

summary=("commit $commit")
w1 1
base=$(sed -n 's/^w1 median: \([0-9]*\) output tok\/s.*/\1/p' "$out/w1-dp1.txt")
summary+=("DP=1: $(grep -E '^w1 median' "$out/w1-dp1.txt" || echo FAILED)")
for n in $dps; do
  w1 "$n"
  v=$(sed -n 's/^w1 median: \([0-9]*\) output tok\/s.*/\1/p' "$out/w1-dp$n.txt")
  ratio=$(python3 -c "print(f'{$v / $base:.2f}x')" 2>/dev/null || echo "?")
  summary+=("DP=$n: $(grep -E '^w1 median' "$out/w1-dp$n.txt" || echo FAILED) -> $ratio of DP=1")
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
