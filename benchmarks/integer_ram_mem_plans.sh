#!/usr/bin/env bash
# C RAM / 002 Mem of integer builds outside the MCU table (session 26): the quickstart's W2A2 ResNet-8 in integer
# mode's default form, with keep_first / keep_last off and at width 0.5. Each run ~10 s: 1 epoch on 300 images (the
# memory does not depend on training). Output: benchmarks/results/integer_export/ram_mem_plans.txt
#   bash benchmarks/integer_ram_mem_plans.sh > benchmarks/results/integer_export/ram_mem_plans.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src
P=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for args in "plan.keep_first=true" "plan.keep_first=false" "plan.keep_first=false plan.keep_last=false" \
            "model.width=0.5 plan.keep_first=false" "model.width=0.5 plan.keep_first=false plan.keep_last=false"; do
  d=$tmp/$(echo "$args" | tr ' =.' '___')
  $P -m lowbit.cli train configs/w2a2_integer.yaml data.limit=300 train.epochs=1 train.threads=1 $args --out "$d" \
    >/dev/null 2>&1
  echo "$args: $($P -m lowbit.cli export "$d" --format c --limit 20 --c-images 4 --latency-repeats 0 2>&1 | grep '^C  ')"
done
