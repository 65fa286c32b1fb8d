#!/usr/bin/env bash
# Issue 7's "Through Elixir" on the GPU machine, from the repository root; builds nothing.
# $GPU_DIR (bench/gpu/pack-elixir.sh): erl/erlang.tar.xz (Erlang/OTP + Elixir from the
# development machine's apt, unpacked to /usr/lib/{erlang,elixir}, absent there), erl/lib
# (libtinfo, libz, used only when missing there), erl/app.tar.gz (the compiled :vllm app,
# its NIF built with `cuda`), bin/vllm-bench.
# Runs the bare engine's W1 (dumping its requests), then the same requests through
# Vllm.AsyncLLMEngine, each streamed to its own process, in the same call.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
runs=${RUNS:-2}
tar -C / -xJf "$gpu/erl/erlang.tar.xz" || exit 1
for lib in libtinfo.so.6 libz.so.1; do
  ldconfig -p | grep -q "$lib" || export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$gpu/erl/lib
done
export PATH=/usr/lib/erlang/bin:/usr/lib/elixir/bin:$PATH
app=$(mktemp -d) && tar -C "$app" -xzf "$gpu/erl/app.tar.gz" || exit 1
# setup.sh has unpacked the pack's .gz files in place.
tok=$gpu/tokenizer.json
config=$here/configs/qwen3-0.6b.json
requests=$(mktemp)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card; commit $(cat "$gpu/COMMIT")"
echo "== bare engine W1 ($runs runs)"
VLLM_BENCH_DUMP_REQUESTS=$requests timeout 200 "$bin/vllm-bench" --workload w1 "$config" --load-format dummy \
  --device cuda --dtype bfloat16 --tokenizer "$tok" --runs "$runs" --max-model-len 2048 \
  --max-num-batched-tokens 8192 2>&1 | tee "$out/w1_bare.txt"
echo "== W1 through Vllm.AsyncLLMEngine ($runs runs)"
timeout 240 elixir -pa "$app/vllm/ebin" "$gpu/elixir_w1.exs" "$config" "$tok" "$requests" "$runs" cuda 2>&1 \
  | tee "$out/w1_elixir.txt"
bare=$(sed -n 's/^w1 median: \([0-9]*\) .*/\1/p' "$out/w1_bare.txt")
ex=$(sed -n 's/^elixir w1 median: \([0-9]*\) .*/\1/p' "$out/w1_elixir.txt")
[ -n "$bare" ] && [ -n "$ex" ] && echo "through Elixir / bare: $ex / $bare = $(python3 -c "print(round($ex / $bare, 3))")"
