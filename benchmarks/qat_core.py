"""Core QAT benchmark: FP32 vs W2 (min-max, SAWB, LSQ), W1 (BWN), W2A2 (LSQ, PACT+SAWB).

The same recipe for every row (model, epochs, optimizer, schedule, seed), full Fashion-MNIST with
5% held out for validation, test accuracy at the best-validation epoch (seed 002's protocol), and
the epoch-time ratio to FP32 measured in this same run (median of the epochs, so that one slow
epoch on a shared machine does not decide it). First conv and last linear stay FP32.

    python benchmarks/qat_core.py --model resnet8 --epochs 5 --threads 1 --out benchmarks/results/qat_core

Finished rows are skipped when re-run (each row is a run folder with summary.json), so a killed
benchmark resumes. Writes results.json, results.csv and results.md in --out and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from lowbit.config import Config
from lowbit.train import run

ROWS = {
    "FP32": {},
    "W2 min-max": {"weight": {"name": "minmax", "bits": 2}},
    "W2 SAWB": {"weight": {"name": "sawb", "bits": 2}},
    "W2 LSQ": {"weight": {"name": "lsq", "bits": 2}},
    "W1 BWN": {"weight": {"name": "bwn", "bits": 1}},
    "W2A2 LSQ": {"weight": {"name": "lsq", "bits": 2}, "act": {"name": "lsq", "bits": 2}},
    "W2A2 PACT+SAWB": {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="cap the training set (quick checks)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of: " + ", ".join(ROWS))
    ap.add_argument("--out", default="benchmarks/results/qat_core")
    args = ap.parse_args()
    out = Path(args.out)
    results = []
    for label in args.rows:
        plan = ROWS[label]
        run_dir = out / label.replace(" ", "_").replace("+", "-")
        if not (run_dir / "summary.json").is_file():
            cfg = Config.model_validate({
                "name": label, "model": {"name": args.model},
                "data": {"name": "fashion-mnist", "limit": args.limit},
                "plan": plan,
                "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                          "seed": args.seed, "threads": args.threads, "progress": False},
            })
            print(f"== {label}", flush=True)
            run(cfg, run_dir, resume=(run_dir / "last.pt").is_file())
        summary = json.loads((run_dir / "summary.json").read_text())
        epochs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        results.append({
            "row": label, "test_acc": summary["test_acc"], "best_epoch": summary["best_epoch"],
            "size_kib": summary["size_bytes"] / 1024, "bitops_g": summary["bitops"] / 1e9,
            "epoch_time_s": statistics.median(e["epoch_time"] for e in epochs),
        })
    fp = next((r["epoch_time_s"] for r in results if r["row"] == "FP32"), None)
    for r in results:
        r["time_vs_fp32"] = r["epoch_time_s"] / fp if fp else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    lines = ["| row | test acc % | best epoch | size KiB | GBitOPs | epoch time / FP32 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {100 * r['test_acc']:.2f} | {r['best_epoch']} | {r['size_kib']:.1f} | "
              f"{r['bitops_g']:.3f} | {r['time_vs_fp32']:.2f} |" for r in results]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
