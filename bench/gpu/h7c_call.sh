#!/usr/bin/env bash
# Issue 7, session 6 (h7c): one GPU call: checks and W3 A/B (check_and_bench.sh), then the
# GEMV diagnosis (gemv_diag.sh); everything but the logs' summaries packed into one archive
# ($OUT returns at most 8 files). From the repository root: bash .gpu-h7c/bench/gpu/h7c_call.sh
set -o pipefail
export GPU_DIR=$PWD/.gpu-h7c
g=$GPU_DIR/bench/gpu
CHECKS=${CHECKS-"tests tiny hf"} WORKLOADS=${WORKLOADS:-w3} RUNS=${RUNS:-2} ENV_MODES=${ENV_MODES-} \
  timeout ${CB_TIMEOUT:-400} bash "$g/check_and_bench.sh" > "$OUT/cb.log" 2>&1
mv "$OUT/summary.txt" "$OUT/summary-w3.txt" 2>/dev/null
# W1_TOO=1: W1 once more, default path only, no checks (CHECKS="" would mean all of them
# in check_and_bench.sh; the summary is at the end of w1.log).
[ "${W1_TOO:-0}" = 1 ] && CHECKS=none WORKLOADS=w1 RUNS=1 ENV_MODES="" timeout ${W1_TIMEOUT:-90} bash "$g/check_and_bench.sh" > "$OUT/w1.log" 2>&1
rm -f "$OUT/summary.txt"
[ "${DIAG:-1}" = 1 ] && timeout ${DIAG_TIMEOUT:-200} bash "$g/gemv_diag.sh" > "$OUT/diag.log" 2>&1
# Everything but the logs into one archive built outside $OUT.
cd "$OUT" && tar czf /tmp/rest.tgz --exclude=./summary-w3.txt --exclude=./cb.log --exclude=./w1.log --exclude=./diag.log .
find . -mindepth 1 -maxdepth 1 ! -name summary-w3.txt ! -name cb.log ! -name w1.log ! -name diag.log -exec rm -rf {} +
mv /tmp/rest.tgz "$OUT/rest.tgz"
cat "$OUT/summary-w3.txt"; grep -A12 "== summary" "$OUT/w1.log"; grep -E "^(  |ncu|==|-- |   )" "$OUT/diag.log" | head -150
