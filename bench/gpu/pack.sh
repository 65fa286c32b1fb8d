#!/usr/bin/env bash
# Builds the CUDA binaries (bench/gpu/build-cuda.sh) and packs everything the GPU machine
# needs into DEST (default .gpu/ of this checkout; git-ignored through info/exclude):
# gzipped binaries, the tiny fixtures, a tokenizer, these scripts and the commit.
#   bench/gpu/pack.sh [DEST]
set -euo pipefail
dest=${1:-.gpu}
shared=${SHARED_DIR:-../shared}
bench/gpu/build-cuda.sh >&2
mkdir -p "$dest/bin" "$dest/bench"
gzip -c .gpu/bin/vllm-bench > "$dest/bin/vllm-bench.gz"
gzip -c .gpu/bin/vllm-logits > "$dest/bin/vllm-logits.gz"
gzip -c .gpu/bin/model_device > "$dest/bin/model_device.gz"
gzip -c .gpu/bin/model_tensor_parallel > "$dest/bin/model_tensor_parallel.gz"
gzip -c .gpu/bin/device_checks > "$dest/bin/device_checks.gz"
gzip -c .gpu/bin/engine_unit > "$dest/bin/engine_unit.gz"
rm -rf "$dest/tiny" && cp -r "$shared/fixtures/tiny" "$dest/tiny" && chmod -R u+w "$dest/tiny"
# Gzipped (setup.sh unpacks them): a call carries at most 64 MiB.
rm -f "$dest/tokenizer.json" "$dest/smollm2_tokenizer.json"
gzip -c "$shared/fixtures/smollm2_tokenizer.json" > "$dest/tokenizer.json.gz"
gzip -c "$shared/fixtures/smollm2_tokenizer.json" > "$dest/smollm2_tokenizer.json.gz"
cp "$shared/fixtures/smollm2_reference.json" "$dest/smollm2_reference.json"
rm -rf "$dest/bench/gpu" && cp -r bench/gpu "$dest/bench/gpu"
# One line: the commit, "+dirty" when the worktree differs from it.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +dirty)" > "$dest/COMMIT"
du -sh "$dest"
