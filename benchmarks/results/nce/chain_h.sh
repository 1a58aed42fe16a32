#!/bin/bash
# session 5: the 0.75x FLOPs target, seed 2 (beside chain_g's seed 1, once the T sweep had finished)
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 2 --target-ratio 0.75 --out benchmarks/results/nce/target075
