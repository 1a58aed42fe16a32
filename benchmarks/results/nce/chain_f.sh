#!/bin/bash
# session 5: 002 x 004 at M0/8, the 4- and 8-bit rows (the 1-3 bit rows are read back from budget.json);
# then the T sweep and the 0.75x FLOPs target for seeds 1 and 2
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python -m lowbit.cli search nce-budget configs/nce_resnet8_w2a2.yaml train.progress=false --bits 1 2 3 4 8 --ratio 8 --warmup 1 --epochs 3 --threshold 0.3 --arch-lr 0.1 --cap 1.5 --out benchmarks/results/nce/budget_C8
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 1 2 --thresholds 0.15 0.2 0.25 --nce-only --out benchmarks/results/nce
# stopped at 14:55 (this bash only; the T sweep ran on): seeds 1 and 2 ran beside each other in chain_g.sh, chain_h.sh
# /work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 1 2 --target-ratio 0.75 --out benchmarks/results/nce/target075
