#!/bin/bash
# 002 x 004: NCE widths vs `lowbit budget`'s uniform widths at one memory budget (M0/8), seed 0
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python -m lowbit.cli search nce-budget configs/nce_resnet8_w2a2.yaml train.progress=false --bits 1 2 3 4 8 --ratio 8 --warmup 1 --epochs 3 --threshold 0.3 --arch-lr 0.1 --cap 1.5 --out benchmarks/results/nce/budget_C8
