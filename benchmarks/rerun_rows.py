"""Re-train committed benchmark rows from their run folders and compare with what was committed.

Each argument is a committed run folder (``config.yaml`` + ``metrics.jsonl`` + ``summary.json``).
The config is trained again, exactly as written, into ``--out/<i>``; every epoch's metrics (all
keys but ``epoch_time``) and the summary's test accuracy are compared with the committed ones.
"identical" means bit for bit; otherwise the largest difference is reported. ``--against DIR``
compares with an earlier ``--out`` of this script instead (e.g. the same rows trained by another
version of lowbit on this machine: float results depend on the CPU, so committed rows trained on
another machine need not match bit for bit).

    OMP_NUM_THREADS=1 python benchmarks/rerun_rows.py benchmarks/results/dqa_table/W2A2_PACT-SAWB/seed0 \
        --out /tmp/rerun --json benchmarks/results/core_rerun/rerun.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lowbit.config import load_config
from lowbit.train import run


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference over all numeric metric values (inf if the shapes differ)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for ra, rb in zip(a, b):
        for k in set(ra) | set(rb):
            if k == "epoch_time":
                continue
            va, vb = ra.get(k), rb.get(k)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                worst = max(worst, abs(va - vb))
            elif va != vb:
                return math.inf
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--unfused-mixtures", action="store_true",
                    help="activation mixtures as one autograd Function per member (QuantizerMixture.fused = False), "
                         "the gradient summation order of lowbit before the fused kernels")
    ap.add_argument("--against", type=Path, help="compare with DIR/<i> (an earlier --out) instead of the committed rows")
    args = ap.parse_args()
    if args.unfused_mixtures:
        from lowbit.methods.mixture import QuantizerMixture

        QuantizerMixture.fused = False
    results = []
    for i, rd in enumerate(args.runs):
        cfg = load_config(rd / "config.yaml", ["train.progress=false"])
        res = run(cfg, args.out / str(i))
        ref = args.against / str(i) if args.against else rd
        old, new = _rows(ref / "metrics.jsonl"), _rows(args.out / str(i) / "metrics.jsonl")
        committed = json.loads((ref / "summary.json").read_text())
        diff = _max_diff(old, new)
        r = {"run": str(rd), "reference": str(ref), "method": cfg.plan.method.name, "reference_test_acc": committed["test_acc"],
             "rerun_test_acc": res.summary["test_acc"], "max_metric_diff": diff,
             "identical": diff == 0.0 and committed["test_acc"] == res.summary["test_acc"]}
        results.append(r)
        print(f"{str(rd):60s} {r['method']:12s} test {r['reference_test_acc']:.4f} -> {r['rerun_test_acc']:.4f}  "
              f"max metric diff {diff:.3g}  {'identical' if r['identical'] else 'DIFFERS'}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
