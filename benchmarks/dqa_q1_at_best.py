"""'Q1 weight at end' of the committed DQA / BinaryRelax runs, read two ways (session 26).

``summary.json`` of runs written before session 26 read best.pt's attention at the *last* step's temperature
(DQA's T, BinaryRelax's omega), not at the end of the best epoch whose checkpoint is hardened and tested; a
best epoch before the last then showed ~1.0 for a mixture that had not converged. ``metrics.jsonl`` records
every epoch's attention at that epoch's end: its best-epoch row is the tested network's c_1 (the smallest
over all weight and activation mixtures), what lowbit records since session 26.

    python benchmarks/dqa_q1_at_best.py > benchmarks/results/dqa_table_15k/q1_at_best.txt
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("benchmarks/results/dqa_table_15k", "benchmarks/results/dqa_table")
DIAG = "benchmarks/results/dqa_diag"


def c1_at(run: Path, epoch: int) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    b = rows[epoch - 1]
    return min([v[0] for v in b["attention"].values()] + [v[0] for v in b.get("act_attention", {}).values()])


def line(table: str, row: str, seed, best: int, epochs: int, recorded: str, c1: float) -> str:
    flag = "  <-- differs" if abs(float(recorded) - c1) > 0.005 else ""
    return f"{table:14s} {row:28s} s{seed} best {best}/{epochs}  summary {recorded}  at best epoch {c1:.4f}{flag}"


def main() -> None:
    for res in TABLES:
        for ln in (ROOT / res / "results.jsonl").read_text().splitlines():
            r = json.loads(ln)
            if "row" not in r or not ("DQA" in r["row"] or "BR" in r["row"]):
                continue
            rec = r["method_info"]["Q1 weight at end"].split()[1]
            print(line(res.split("/")[-1], r["row"], r["seed"], r["best_epoch"], r["epochs"], rec,
                       c1_at(ROOT / r["run_dir"], r["best_epoch"])))
    for run in sorted((ROOT / DIAG).glob("*/seed*")):
        s = json.loads((run / "summary.json").read_text())
        best = s["best_epoch"]
        epochs = sum(1 for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip())
        rec = s["method_info"]["Q1 weight at end"].split()[1]
        print(line("dqa_diag", run.parent.name, run.name[4:], best, epochs, rec, c1_at(run, best)))


if __name__ == "__main__":
    sys.exit(main())
