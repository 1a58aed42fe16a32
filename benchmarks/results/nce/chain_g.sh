#!/bin/bash
# session 5: the 0.75x FLOPs target, seed 1 (after chain_e; chain_f was stopped, seed 2 runs in chain_h.sh)
cd /work/wt/nce
export PYTHONPATH=$PWD/src
while kill -0 4626 2>/dev/null; do sleep 10; done
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 1 --target-ratio 0.75 --out benchmarks/results/nce/target075
