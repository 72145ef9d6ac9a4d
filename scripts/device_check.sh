#!/usr/bin/env bash
# The GPU run for issue 16, as one prepared script (its parts' time limits add up to 8 minutes,
# compiles included), from the repository root:
#   OUT=/tmp/gpu bash scripts/device_check.sh           # on the GPU machine
#   OUT=/tmp/smoke bash scripts/device_check.sh --smoke # every stage at tiny shapes, on CPU (kernels interpreted)
# 1. whole decode loops (benchmark.py decode: lm.decode of 32 tokens, Dense and SparQ interleaved) at
#    S=32k, bf16, 8 layers of 32/8 heads of 128, B=1 and B=8, with an XLA dump -> launches per layer;
# 2. the same with random weights in SmolLM2-135M's shape (30 layers, 9/3 heads of 64, tied) at 8k;
# 3. one attention call at B=8, 32/8 heads, S=32k, 1/8, with the stage breakdown;
# 4. one attention call at the paper's shape (B=64, 32 heads, S=4096, r=32, k=128);
# 5. the compiled kernel tests; 6. stage 1 at B=1 again with XLA's own command-buffer defaults (the
#    package's +WHILE,+CONDITIONAL left out), for the effect of capturing the decode loop.
# JSON and logs go to $OUT; each part has its own time limit, so one hang does not cost the others.
set -u
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0; fi
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
OUT=${OUT:-/tmp/sparq_device_check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
T0=$(date +%s)
part() { echo; echo "=== $1 (at $(( $(date +%s) - T0 )) s)"; }

if [ $SMOKE = 1 ]; then
  export JAX_PLATFORMS=cpu
  LLAMA="--layers 2 --hidden 64 --q-heads 4 --kv-heads 2 --head-dim 16 --intermediate 128 --vocab 256"
  SMOL="--layers 2 --vocab 256"
  DECODE_1="--seq-lens 64 --batch 1,2 --steps 3 --reps 1 --compression 1/4"
  DECODE_2="--seq-lens 64 --batch 1 --steps 3 --reps 1 --compression 1/4"
  CALL_B="--batch 2 --q-heads 4 --kv-heads 2 --seq-len 256 --head-dim 16 --compression 1/4"
  CALL_A="--batch 2 --q-heads 2 --kv-heads 2 --seq-len 128 --head-dim 32 --rank 8 --top-k 32"
  ATTN="--reps 1 --warmup 1 --interpret"
  BREAKDOWN_A=""  # stage 3 runs the breakdown's code already
  LIMIT=600
else
  LLAMA=""
  SMOL=""
  DECODE_1="--seq-lens 32768 --batch 1,8 --steps 32 --reps 3 --dtype bfloat16"
  DECODE_2="--seq-lens 8192 --batch 1,8 --steps 32 --reps 3 --dtype bfloat16"
  CALL_B="--batch 8 --q-heads 32 --kv-heads 8 --seq-len 32768 --compression 1/8"
  CALL_A="--batch 64 --q-heads 32 --kv-heads 32 --seq-len 4096 --rank 32 --top-k 128 --single-copy"
  ATTN="--reps 15 --dtype bfloat16"
  BREAKDOWN_A="--breakdown"
  LIMIT=0
fi
limit() { if [ $LIMIT -gt 0 ]; then echo $LIMIT; else echo "$1"; fi; }

part environment
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | head -3
$PY -c "import os, jax, sparq_jax, pallas_kernels; print('jax', jax.__version__, jax.devices()); \
print('triton backend', pallas_kernels.gpu_kernels_available()); print('XLA_FLAGS', os.environ.get('XLA_FLAGS'))" 2>&1

part "1. whole decode loops, 8 layers, S=32k"
DUMP=$(mktemp -d /tmp/sparq_xla_dump.XXXX)
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_dump_to=$DUMP --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode_loop.*" \
  timeout "$(limit 140)" $PY scripts/benchmark.py decode --preset llama-8l $LLAMA $DECODE_1 \
  --json "$OUT/decode_gpu.json" >"$OUT/decode.log" 2>&1
echo "rc=$?"; grep "^B=" "$OUT/decode.log"; grep -v "^B=" "$OUT/decode.log" | grep -i "error\|Traceback" | tail -3

part "launches per decode step (optimized HLO of the decode loops: dense, sparq per batch size)"
$PY scripts/benchmark.py launches "$DUMP" --layers "$( [ $SMOKE = 1 ] && echo 2 || echo 8 )" \
  --json "$OUT/launches.json" 2>&1 | tail -8
mkdir -p "$OUT/xla_dump"
cp "$DUMP"/*decode_loop*after_optimizations.txt "$OUT/xla_dump/" 2>/dev/null
# Command buffers are formed from XLA's thunks, after the HLO: what the dump says of them, if anything.
grep -l -i "command.buffer\|CommandBuffer" "$DUMP"/* 2>/dev/null | head -5 | while read -r f; do
  echo "$(basename "$f"): $(grep -c -i "command.buffer\|CommandBuffer" "$f") mentions of command buffers"
  case "$f" in *thunk*) cp "$f" "$OUT/xla_dump/";; esac
done

part "2. whole decode loops, SmolLM2-135M shape, S=8k"
timeout "$(limit 90)" $PY scripts/benchmark.py decode --preset smollm2-135m $SMOL $DECODE_2 \
  --json "$OUT/decode_smollm2_gpu.json" >"$OUT/decode_smollm2.log" 2>&1
echo "rc=$?"; grep "^B=" "$OUT/decode_smollm2.log"; grep -i "error\|Traceback" "$OUT/decode_smollm2.log" | tail -3

bench() {  # name, time limit, args...
  local name=$1 seconds=$2; shift 2
  timeout "$(limit "$seconds")" $PY scripts/benchmark.py attention --impl all $ATTN \
    --json "$OUT/bench_gpu_$name.json" "$@" >"$OUT/bench_$name.log" 2>&1
  echo "rc=$?"; grep -v "^\s*$" "$OUT/bench_$name.log" | grep -v -i "warn\|import decode_attention" | tail -28
}
part "3. one call: B=8, 32/8 heads, S=32k, 1/8"
bench b 80 $CALL_B --breakdown
part "4. one call: the paper's shape"
bench a 60 $CALL_A $BREAKDOWN_A

if [ $SMOKE = 0 ]; then
  part "5. compiled kernel tests"
  timeout 60 $PY -m pytest tests/test_kernels.py -k compiled -q -p no:cacheprovider -W ignore::DeprecationWarning \
    >"$OUT/test_compiled.log" 2>&1
  echo "rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/test_compiled.log" | tail -12
fi

part "6. stage 1 at B=1 with XLA's command-buffer defaults (no +WHILE,+CONDITIONAL)"
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=-WHILE" \
  timeout "$(limit 40)" $PY scripts/benchmark.py decode --preset llama-8l $LLAMA $DECODE_1 --batch 1 \
  --json "$OUT/decode_gpu_xla_command_buffers.json" >"$OUT/decode_xla_cb.log" 2>&1
echo "rc=$?"; grep "^B=" "$OUT/decode_xla_cb.log"; grep -i "error\|Traceback" "$OUT/decode_xla_cb.log" | tail -3

part "done"
