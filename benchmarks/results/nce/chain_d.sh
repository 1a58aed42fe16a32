#!/bin/bash
# W2A2 under a FLOPs target of 0.75 x the original (3 seeds): the search must choose which layers to shrink
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 0 1 2 --target-ratio 0.75 --out benchmarks/results/nce/target075
