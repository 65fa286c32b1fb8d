#!/usr/bin/env bash
# On the GPU machine, after check_and_bench.sh (same $GPU_DIR): issue 7's GEMV diagnosis.
# 1. ncu per-kernel times of one W3 step (gpu__time_duration only, one pass) for each
#    "tag:VAR=value[,VAR=value]" in DIAG_MODES (default: the default path and
#    VLLM_GEMV_STREAM=0, gemv_fused);
# 2. DIAG_METRICS=1: stall reasons, occupancy, L1 / L2 / DRAM traffic of DIAG_COUNT (12)
#    consecutive one-row GEMV launches (kernels replayed per metric pass), for each
#    "tag:VAR=value" of DIAG_METRICS_MODES (default: VLLM_GEMV_STREAM=0, then the default).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
w3=(--workload w3 "$here/configs/qwen2.5-0.5b.json" --load-format dummy --device cuda --dtype bfloat16
  --tokenizer "$gpu/tokenizer.json" --runs 1 --max-model-len 1024)
for m in ${DIAG_MODES-default: old:VLLM_GEMV_STREAM=0}; do
  tag=${m%%:*}; envs=${m#*:}
  echo "== ncu times, W3 step, $tag ($envs)"
  env ${envs//,/ } VLLM_STEP_TIMING= timeout 200 "$ncu_bin" --clock-control none --cache-control none \
    --launch-skip "${NCU_SKIP:-20000}" --launch-count "${NCU_COUNT:-130}" --metrics gpu__time_duration.sum --csv \
    "$bin/vllm-bench" "${w3[@]}" > "$out/ncu-$tag.csv" 2> "$out/ncu-$tag.err"
  python3 "$here/ncu_summary.py" "$out/ncu-$tag.csv" 2>&1 | tee "$out/ncu-$tag.txt" | head -16 || tail -20 "$out/ncu-$tag.err"
done
if [ "${DIAG_METRICS:-0}" = 1 ]; then
  sections=(--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis)
  for m in ${DIAG_METRICS_MODES-old:VLLM_GEMV_STREAM=0 default:}; do
    tag=${m%%:*}; envs=${m#*:}
    echo "== ncu metrics, $tag ($envs)"
    env ${envs//,/ } VLLM_STEP_TIMING= timeout ${DIAG_METRICS_TIMEOUT:-150} "$ncu_bin" --clock-control none --kernel-name "regex:gemv_(fused_r1|stream)_bf16" \
      --launch-skip "${DIAG_SKIP:-3000}" --launch-count "${DIAG_COUNT:-12}" "${sections[@]}" --csv --page details \
      "$bin/vllm-bench" "${w3[@]}" > "$out/ncu-metrics-$tag.csv" 2> "$out/ncu-metrics-$tag.err"
    python3 - "$out/ncu-metrics-$tag.csv" <<'PY' | tee "$out/ncu-metrics-$tag.txt"
import csv, sys
from collections import OrderedDict
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
k = OrderedDict()
for r in csv.DictReader(lines):
    k.setdefault((r["ID"], r["Kernel Name"].split("(")[0], r.get("Grid Size", "")), {})[r["Metric Name"]] = (r["Metric Value"], r["Metric Unit"])
for (i, name, grid), m in k.items():
    print(f"-- {name} grid {grid}")
    for n, (v, u) in sorted(m.items()):
        print(f"   {n:<75} {v} {u}")
PY
  done
fi
