#!/usr/bin/env bash
# The README's results table (about 35 min on a shared 2-core CPU); resumable: cells already in the JSON are kept.
cd "$(dirname "$0")/.."
COMMON="--model smollm2-135m-instruct --context-length 2048 --batch 10 --json docs/results_smollm2.json --methods dense,sparq,sparq-mean,sparq-logits,h2o,streaming"
for t in passkey multikey; do
  python scripts/evaluate.py $COMMON --tasks $t --limit 20 --compression 1/4,1/8,1/16
done
python scripts/evaluate.py $COMMON --tasks repetition --limit 20 --compression 1/8
python scripts/evaluate.py $COMMON --tasks bpc --limit 10 --compression 1/8 --bpc-tokens 128
