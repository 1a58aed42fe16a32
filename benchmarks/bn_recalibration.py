"""Test accuracy of finished runs as trained and after BatchNorm re-estimation (train.bn_recalibrate).

A mixture method (DQA, BinaryRelax) trains its BatchNorm statistics on the mixture and is then
hardened to Q_1; when Q_1's weight in the mixture was still far from 1 at the end, those statistics
describe another network. This script measures how much of a row's loss that explains: for each run
folder (``RESULTS/ROW/seedN``) it evaluates the finalized best checkpoint as the run did, then after
``lowbit.train.recalibrate_run_bn`` on N training batches (what ``train.bn_recalibrate: N`` does at the end
of a run). Nothing in the run folders is changed.

    python benchmarks/bn_recalibration.py benchmarks/results/dqa_table --rows DQA BR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lowbit.train import BatchLoader, evaluate, load_run, recalibrate_run_bn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results folder holding results.jsonl")
    ap.add_argument("--rows", nargs="*", default=None,
                    help="measure the rows whose label contains one of these strings (default: every row)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = Path(args.results)
    records = [json.loads(ln) for ln in (res / "results.jsonl").read_text().splitlines() if ln.strip()]
    by_row: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if args.rows and not any(k in r["row"] for k in args.rows):
            continue
        cfg, data, model, _ = load_run(r["run_dir"])
        test = BatchLoader(data.test, data.info, 1000)
        before = evaluate(model, test)["acc"]
        recalibrate_run_bn(model, cfg, data, args.batches)
        after = evaluate(model, test)["acc"]
        q1 = (r.get("method_info") or {}).get("Q1 weight at end", "")
        print(f"{r['row']} seed {r['seed']}: {100 * before:.2f} -> {100 * after:.2f}  {q1}", flush=True)
        by_row.setdefault(r["row"], []).append((before, after))
    lines = [f"BatchNorm re-estimation on {args.batches} training batches after finalize ({res})", "",
             "| row | test acc % as trained | after BN re-estimation | n |", "|---|---|---|---|"]
    for row, v in by_row.items():
        b, a = [x for x, _ in v], [y for _, y in v]
        sd = (lambda z: statistics.stdev(z) if len(z) > 1 else 0.0)
        lines.append(f"| {row} | {100 * statistics.fmean(b):.2f} ± {100 * sd(b):.2f} | "
                     f"{100 * statistics.fmean(a):.2f} ± {100 * sd(a):.2f} | {len(v)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (res / "bn_recalibration.md").write_text(text)


if __name__ == "__main__":
    main()
