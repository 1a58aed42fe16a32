#!/bin/bash
# session 5: 002 x 004 at M0/8, seed 1 (a second seed for "does the best precision move?"; started 15:08, finished 15:48; rows
# are written as they finish, whatever is not done by 15:55 is left out)
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python -m lowbit.cli search nce-budget configs/nce_resnet8_w2a2.yaml train.progress=false train.seed=1 --bits 1 2 3 4 8 --ratio 8 --warmup 1 --epochs 3 --threshold 0.3 --arch-lr 0.1 --cap 1.5 --out benchmarks/results/nce/budget_C8_s1
