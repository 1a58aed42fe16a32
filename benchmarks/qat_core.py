"""Core QAT benchmark: FP32 vs W2 (min-max, SAWB, LSQ), W1 (BWN), W2A2 (LSQ, PACT+SAWB).

The same recipe for every row (model, epochs, optimizer, schedule, seed), full Fashion-MNIST with
5% held out for validation, test accuracy at the best-validation epoch (seed 002's protocol), and
the epoch-time ratio to FP32 measured in this same run (median of each run's epochs). First conv
and last linear stay FP32.

    python benchmarks/qat_core.py --model resnet8 --epochs 5 --threads 1

Runs go through ``lowbit.bench.run_grid`` (finished runs are skipped, so a killed benchmark
resumes); writes results.jsonl, summary.csv and summary.md into --out and prints the table.
"""

from __future__ import annotations

import argparse

from lowbit.bench import aggregate, run_grid, write_results

ROWS = {
    "FP32": {},
    "W2 min-max": {"plan": {"weight": {"name": "minmax", "bits": 2}}},
    "W2 SAWB": {"plan": {"weight": {"name": "sawb", "bits": 2}}},
    "W2 LSQ": {"plan": {"weight": {"name": "lsq", "bits": 2}}},
    "W1 BWN": {"plan": {"weight": {"name": "bwn", "bits": 1}}},
    "W2A2 LSQ": {"plan": {"weight": {"name": "lsq", "bits": 2}, "act": {"name": "lsq", "bits": 2}}},
    "W2A2 PACT+SAWB": {"plan": {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--limit", type=int, default=None, help="cap the training set (quick checks)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/qat_core")
    args = ap.parse_args()
    base = {
        "model": {"name": args.model},
        "data": {"name": "fashion-mnist", "limit": args.limit},
        "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                  "threads": args.threads, "progress": False},
    }
    records = run_grid(ROWS, base, args.seeds, args.out, workers=args.workers)
    rows = aggregate(records, reference="FP32")
    print(write_results(args.out, records, rows, reference="FP32", meta=vars(args)))


if __name__ == "__main__":
    main()
