"""Integer-only deployment benchmark (issue 17): integer-mode QAT vs today's mode, and the export.

Part 1 (``--train``): ResNet-8 on a Fashion-MNIST slice (``--limit`` training images, ``--epochs``),
W2A2 / W4A4 / W8A8 (SAWB weights, PACT activations), each in today's mode (first conv / last
linear FP32, float BN, float residuals) and in integer mode (``plan.integer: true``: every layer
quantized, BN as per-channel requantization, residual adds and pooling on codes); test accuracy at
the best validation epoch. Runs through ``lowbit.bench.run_grid`` (finished runs are skipped).

Part 2 (``--export``): every integer run exported (integer package, C, integer ONNX) and checked
on the whole test set: agreement with the PyTorch integer-mode model (NumPy reference from the
file, C build, ONNX), C RAM vs seed 002's Mem, C flash vs the packed size, onnxruntime latency of
the integer ONNX vs the FP32 ONNX vs onnxruntime's own ``quantize_static`` of that FP32 model.

    python benchmarks/integer_export.py --train --limit 10000 --epochs 3
    python benchmarks/integer_export.py --export
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("benchmarks/results/integer_export")
BITS = (2, 4, 8)


def rows() -> dict:
    r = {}
    for b in BITS:
        plan = {"weight": {"name": "sawb", "bits": b}, "act": {"name": "pact", "bits": b}}
        r[f"W{b}A{b} today"] = {"plan": plan}
        r[f"W{b}A{b} integer"] = {"plan": {**plan, "integer": True}}
    return r


def train(args) -> None:
    from lowbit.bench import aggregate, run_grid, write_results

    base = {
        "model": {"name": "resnet8"},
        "data": {"name": "fashion-mnist", "limit": args.limit},
        "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "threads": 1,
                  "progress": False},
    }
    records = run_grid(rows(), base, [0], OUT / "runs", workers=1)
    agg = aggregate(records, reference="W8A8 today")
    print(write_results(OUT / "runs", records, agg, reference="W8A8 today", meta=vars(args)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.train:
        train(args)
    if args.export:
        from lowbit.export.int_api import export_int_runs

        export_int_runs(sorted((OUT / "runs").glob("*integer*/seed0")), OUT)


if __name__ == "__main__":
    main()
