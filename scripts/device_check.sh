#!/usr/bin/env bash
# The GPU checks, as one prepared run (3-4 minutes on an H100), from the repository root:
#   OUT=/tmp/gpu bash scripts/device_check.sh
# 1. the compiled kernel tests; 2. benchmark.py attention in bf16 at the paper's shape (a) and a long
# GQA shape (b), with the stage breakdown and the card's copy bandwidth, then a sweep over S with its
# plot; 3. decode-step benchmarks at 8k and 32k positions; 4. the core tests on the GPU (ALL_TESTS=0
# skips them).
# Logs and JSON go to $OUT; each part has its own time limit, so one hang does not cost the others.
set -u
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0; fi
OUT=${OUT:-/tmp/sparq_device_check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
part() { echo; echo "=== $1 ($(date +%T))"; }

part environment
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
$PY -c "import jax, pallas_kernels; print('jax', jax.__version__, jax.devices()); \
print('triton backend', pallas_kernels.gpu_kernels_available())" 2>&1

part "compiled kernel tests"
timeout 180 $PY -m pytest tests/test_kernels.py -k compiled -v -p no:cacheprovider -W ignore::DeprecationWarning \
  >"$OUT/test_compiled.log" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/test_compiled.log" | tail -20
grep -E "^E " "$OUT/test_compiled.log" | head -20

bench() {  # name, args...
  local name=$1; shift
  part "benchmark $name"
  timeout 150 $PY scripts/benchmark.py attention --dtype bfloat16 --impl all --reps 15 \
    --json "$OUT/bench_gpu_$name.json" "$@" >"/tmp/bench_$name.log" 2>&1
  echo "rc=$?"; grep -v "^\s*$" "/tmp/bench_$name.log" | grep -v -i "warn\|import decode_attention" | tail -25
}
bench a --batch 64 --q-heads 32 --kv-heads 32 --seq-len 4096 --rank 32 --top-k 128 --single-copy --breakdown
bench b --batch 8 --q-heads 32 --kv-heads 8 --seq-len 32768 --compression 1/8 --breakdown
bench sweep --batch 8 --q-heads 32 --kv-heads 8 --compression 1/8 --sweep 4096,16384,65536,131072 \
  --plot "$OUT/sweep_gpu.png"

part "decode benchmark"
timeout 120 $PY scripts/benchmark.py decode --seq-lens 8192,32768 --reps 10 --json "$OUT/decode_gpu.json" \
  >"$OUT/decode.log" 2>&1
echo "rc=$?"; grep "^S=" "$OUT/decode.log"; tail -2 "$OUT/decode.log"

if [ "${ALL_TESTS:-1}" = 1 ]; then
  # The core tests with the XLA path's GPU branches; fp32 products as on a CPU (the default, tf32,
  # is outside the tests' tolerances), so the references stay the same.
  part "core tests on the GPU"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY -m pytest tests/test_core.py -q -p no:cacheprovider \
    >"$OUT/test_core.log" 2>&1
  echo "rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/test_core.log" | head; tail -2 "$OUT/test_core.log"
fi
part done
