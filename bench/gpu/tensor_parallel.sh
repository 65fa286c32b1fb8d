#!/usr/bin/env bash
# On a 2-GPU machine, from the repository root; builds nothing (needs the folder that
# bench/gpu/pack.sh made, GPU_DIR). Checks, then times, in one call:
#   1. where libnccl comes from; the tensor-parallel device tests (model_tensor_parallel);
#   2. W2 (Llama-3.1-8B shape, dummy bf16): TP=1 (graphs), TP=2 (eager), TP=2 with the
#      all-reduce skipped (VLLM_TP_SKIP_ALLREDUCE=1: its share of the step, as a bound),
#      with EAGER=1 also TP=1 eager (TP=2's fair baseline). Logs and JSON under $OUT.
#   GPU_DIR=$PWD/.gpu-h12 RUNS=1 bash .gpu-h12/bench/gpu/tensor_parallel.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
export NCCL_NVLS_ENABLE=0
runs=${RUNS:-1}
commit=$(cat "$gpu/COMMIT" 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$out/nvidia-smi.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/libs.txt"
python3 -c 'import nvidia.nccl, os; print(os.listdir(os.path.dirname(nvidia.nccl.__file__) + "/lib"))' >> "$out/libs.txt" 2>&1
summary=("commit $commit" "$(sed -n 2,3p "$out/nvidia-smi.txt" | tr '\n' ' ')")

echo "== model_tensor_parallel"
VLLM_FIXTURES_DIR=$gpu timeout 240 "$bin/model_tensor_parallel" --test-threads=1 2>&1 | tee "$out/tests.txt"
summary+=("tests: $(grep -E '^test result' "$out/tests.txt" || echo 'FAILED (see tests.txt)')")
summary+=("$(grep -c SKIPPED "$out/tests.txt") skipped")

w2() {
  local tag=$1; shift
  timeout "${W2_TIMEOUT:-150}" "$bin/vllm-bench" --workload w2 "$here/configs/llama-3.1-8b.json" --load-format dummy \
    --device cuda --dtype bfloat16 --tokenizer "$gpu/tokenizer.json" --runs "$runs" \
    --max-model-len 2048 --max-num-batched-tokens 8192 --json "$out/w2-$tag.json" "$@" 2>&1 | tee "$out/w2-$tag.txt"
  summary+=("$tag: $(grep -E '^w2 median' "$out/w2-$tag.txt" || echo "FAILED (see w2-$tag.txt)")")
}
echo "== W2"
w2 tp1
w2 tp2 --tensor-parallel 2
VLLM_TP_SKIP_ALLREDUCE=1 w2 tp2-no-allreduce --tensor-parallel 2
[ "${EAGER:-0}" = 1 ] && w2 tp1-eager --enforce-eager true
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
