#!/bin/bash
# W2A2 main table (3 seeds), then W3A3 (3 seeds)
cd /work/wt/nce
export PYTHONPATH=$PWD/src
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 2 --seeds 0 1 2 --out benchmarks/results/nce
/work/tools/slot /work/main/.venv/bin/python benchmarks/nce_table.py --bits 3 --seeds 0 1 2 --out benchmarks/results/nce
