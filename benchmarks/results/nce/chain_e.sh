#!/bin/bash
# session 5: W3A3 main table (3 seeds), same protocol as W2A2
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 3 --seeds 0 1 2 --out benchmarks/results/nce
