#!/bin/bash
# threshold sweep (seed 0; T = 0.3 comes from the main table), then the joint width x precision question
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 0 --thresholds 0.15 0.2 0.25 --nce-only --out benchmarks/results/nce
