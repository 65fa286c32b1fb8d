#!/usr/bin/env bash
# Adds to DEST (made by pack-lora.sh or pack.sh) what bench/gpu/elixir_w1.sh needs: the
# development machine's Erlang/OTP and Elixir (apt, /usr/lib/{erlang,elixir}, without the
# GUI/telecom apps and sources), libtinfo and libz in case that machine lacks them, the
# compiled :vllm app with the NIF built with `cuda`, and bench/elixir_w1.exs.
#   SHARED_DIR=/work/shared CARGO_TARGET_DIR=<cuda target> bench/gpu/pack-elixir.sh DEST
set -euo pipefail
dest=$1
shared=${SHARED_DIR:-../shared}
eval "$("$shared/tools/cuda-toolkit.sh")"
export CUDA_ROOT=$CUDA_HOME CUDA_PATH=$CUDA_HOME
cargo build --release --features cuda -p vllm_nif
# The app's .beam files (a CPU build of the NIF is fine here: it is replaced below).
(unset CARGO_TARGET_DIR; CARGO_TARGET_DIR=${CPU_TARGET_DIR:-target} mix compile >&2)
mkdir -p "$dest/erl/lib"
skip=(wx observer megaco diameter common_test odbc edoc eldap et snmp)
tar -C / $(printf -- "--exclude=usr/lib/erlang/lib/%s-* " "${skip[@]}") --exclude='*/src/*' --exclude='*/include/*' \
  -cJf "$dest/erl/erlang.tar.xz" usr/lib/erlang usr/lib/elixir
cp -L /lib/x86_64-linux-gnu/libtinfo.so.6 /lib/x86_64-linux-gnu/libz.so.1 "$dest/erl/lib/"
app=$(mktemp -d)
mkdir -p "$app/vllm/priv/native"
cp -r _build/dev/lib/vllm/ebin "$app/vllm/ebin"
strip -o "$app/vllm/priv/native/libvllm_nif.so" "$CARGO_TARGET_DIR/release/libvllm_nif.so"
tar -C "$app" -czf "$dest/erl/app.tar.gz" vllm
rm -rf "$app"
cp bench/elixir_w1.exs "$dest/elixir_w1.exs"
[ -e "$dest/tokenizer.json.gz" ] || gzip -c "$shared/fixtures/smollm2_tokenizer.json" > "$dest/tokenizer.json.gz"
cp -r bench/gpu/. "$dest/bench/gpu/"
du -sb "$dest"
