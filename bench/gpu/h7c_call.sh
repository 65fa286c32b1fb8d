#!/usr/bin/env bash
# Issue 7, session 6 (h7c): one GPU call: checks and W3 A/B (check_and_bench.sh), then the
# GEMV diagnosis (gemv_diag.sh); everything but the logs' summaries packed into one archive
# ($OUT returns at most 8 files). From the repository root: bash .gpu-h7c/bench/gpu/h7c_call.sh
set -o pipefail
export GPU_DIR=$PWD/.gpu-h7c
g=$GPU_DIR/bench/gpu
CHECKS=${CHECKS-"tests tiny hf"} WORKLOADS=${WORKLOADS:-w3} RUNS=${RUNS:-2} ENV_MODES=${ENV_MODES-} \
  timeout ${CB_TIMEOUT:-400} bash "$g/check_and_bench.sh" > "$OUT/cb.log" 2>&1
[ "${DIAG:-1}" = 1 ] && timeout ${DIAG_TIMEOUT:-200} bash "$g/gemv_diag.sh" > "$OUT/diag.log" 2>&1
cd "$OUT" && mkdir -p keep && mv summary.txt cb.log diag.log keep/ 2>/dev/null
tar czf rest.tgz --exclude=keep . && find . -maxdepth 1 ! -name keep ! -name rest.tgz ! -name . -exec rm -rf {} + && mv keep/* . && rmdir keep
cat "$OUT/summary.txt"; grep -E "^(  |ncu|==|-- |   )" "$OUT/diag.log" | head -150
