"""003 Tables 1-2 on Fashion-MNIST: plain STE vs BinaryRelax vs DQA, 3 seeds, mean ± std.

Rows (the same recipe, epochs and seeds for every row; first conv / last linear FP32):

* FP32 (reference for accuracy and epoch time);
* W2 min-max: plain | BR original (Q, FP) | BR eq. 8 (2/4/8) | DQA 2/4/8, λ = 5;
* W2 SAWB: plain | BR eq. 8 (2/4/8) | DQA 2/4/8, λ = 1;
* W1 BWN: plain | BR eq. 8 (BWN/TWN/FP) | DQA BWN/TWN/FP, λ = 5;
* W2A2 min-max: plain | BR original (weights and inputs relaxed towards FP) | DQA 2/4/8 on both, λ = 5;
* W2A2 PACT-SAWB: plain | BR original (both towards FP) | DQA SAWB 2/4/8 + PACT 2/4/8, λ = 1.

This is 003's choice of BR per row (Table 1: BR with the same 2/4/8 mixture where 003 has it, and
with FP for BWN/TWN/FP; Table 2: BR with FP) and 003's CIFAR-10 λ per row (Fashion-MNIST, 10
classes, is the nearest of its settings). DQA's temperature goes from T(0) = 100 to T(B) = 0.03
over all batches of the run, whatever its length (003 Algorithm 1); BR's growth is the papers'
path (η: ×1.04/epoch over 150 epochs, then 25% purely quantized; ω: ×1.02/epoch over 300) spread
over the run (see lowbit/methods/binaryrelax.py). Nothing here is tuned on these results.

    python benchmarks/dqa_table.py --model resnet8 --epochs 10 --seeds 0 1 2 --threads 1 \\
        --out benchmarks/results/dqa_table

Test accuracy at the best-validation epoch (002's protocol; DQA/BR validate the final Q_1
network); epoch time is the median over a run's epochs, as a ratio to FP32 with the same seed.
Finished runs are skipped, killed ones resumed. ``--part 1/2`` and ``--part 2/2`` (or disjoint
``--rows``) may run in parallel into the same ``--out``; a last call without ``--part`` (nothing
left to train) writes the full table.
Writes results.jsonl, summary.csv, summary.md and ordering.md (DQA vs BR vs plain, paired by seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.bench import aggregate, run_grid, select_rows, write_results
from lowbit.errors import ConfigError
from lowbit.bench.report import format_paired, paired

MM = lambda b: {"name": "minmax", "bits": b}  # noqa: E731
SAWB = lambda b: {"name": "sawb", "bits": b}  # noqa: E731
PACT = lambda b: {"name": "pact", "bits": b, "init": 6.0}  # noqa: E731
BWN = {"name": "bwn", "bits": 1}  # one β = E|w| per layer (003 eq. 14)
BR_FP = {"name": "binaryrelax", "form": "original"}
BR_FP_ACT = {**BR_FP, "act_mixture": [{"name": "fp"}]}  # weights and inputs relaxed towards FP


def br_mix(members):
    return {"name": "binaryrelax", "form": "mixture", "mixture": members}


def dqa(members, lam, act=None):
    m = {"name": "dqa", "mixture": members, "lam": lam}
    return {**m, "act_mixture": act} if act else m


#: family -> {row label -> plan}; the first row of a family is its plain STE baseline
FAMILIES = {
    "FP32": {"FP32": {}},
    "W2 min-max": {
        "W2 min-max": {"weight": MM(2)},
        "W2 min-max BR (FP)": {"weight": MM(2), "method": BR_FP},
        "W2 min-max BR (2/4/8)": {"weight": MM(2), "method": br_mix([MM(4), MM(8)])},
        "W2 min-max DQA (2/4/8)": {"weight": MM(2), "method": dqa([MM(4), MM(8)], 5)},
    },
    "W2 SAWB": {
        "W2 SAWB": {"weight": SAWB(2)},
        "W2 SAWB BR (2/4/8)": {"weight": SAWB(2), "method": br_mix([SAWB(4), SAWB(8)])},
        "W2 SAWB DQA (2/4/8)": {"weight": SAWB(2), "method": dqa([SAWB(4), SAWB(8)], 1)},
    },
    "W1 BWN": {
        "W1 BWN": {"weight": BWN},
        "W1 BWN BR (BWN/TWN/FP)": {"weight": BWN, "method": br_mix([{"name": "twn"}, {"name": "fp"}])},
        "W1 BWN DQA (BWN/TWN/FP)": {"weight": BWN, "method": dqa([{"name": "twn"}, {"name": "fp"}], 5)},
    },
    "W2A2 min-max": {
        "W2A2 min-max": {"weight": MM(2), "act": MM(2)},
        "W2A2 min-max BR (FP)": {"weight": MM(2), "act": MM(2), "method": BR_FP_ACT},
        "W2A2 min-max DQA (2/4/8)": {"weight": MM(2), "act": MM(2), "method": dqa([MM(4), MM(8)], 5, [MM(4), MM(8)])},
    },
    "W2A2 PACT-SAWB": {
        "W2A2 PACT-SAWB": {"weight": SAWB(2), "act": PACT(2)},
        "W2A2 PACT-SAWB BR (FP)": {"weight": SAWB(2), "act": PACT(2), "method": BR_FP_ACT},
        "W2A2 PACT-SAWB DQA (2/4/8)": {"weight": SAWB(2), "act": PACT(2),
                                       "method": dqa([SAWB(4), SAWB(8)], 1, [PACT(4), PACT(8)])},
    },
}
ROWS = {label: plan for fam in FAMILIES.values() for label, plan in fam.items()}


def ordering(records: list[dict], rows: list[dict]) -> str:
    """Per family: is 003's ordering DQA > BR > plain there, and by how much (paired by seed)."""
    mean = {r["row"]: r["acc_mean"] for r in rows}
    exact = {}
    for r in records:
        info = r.get("method_info", {})
        if "exact Q1" in info:
            exact.setdefault(r["row"], set()).add(info["exact Q1"].split(":")[0])
    lines = ["| family | plain | best BR | DQA | DQA − plain | DQA − BR | BR − plain | 003 ordering |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, members in FAMILIES.items():
        labels = [lb for lb in members if lb in mean]
        plain = labels[0] if labels and labels[0] == next(iter(members)) else None
        brs = [lb for lb in labels if " BR " in lb]
        dq = next((lb for lb in labels if " DQA " in lb), None)
        if not (plain and brs and dq):
            continue
        br = max(brs, key=lambda lb: mean[lb])
        holds = mean[dq] > mean[br] > mean[plain]
        lines.append(f"| {fam} | {100 * mean[plain]:.2f} | {br[len(fam) + 1:]} {100 * mean[br]:.2f} | "
                     f"{100 * mean[dq]:.2f} | {format_paired(paired(records, dq, plain))} | "
                     f"{format_paired(paired(records, dq, br))} | "
                     f"{format_paired(paired(records, br, plain))} | {'holds' if holds else 'does not hold'} |")
    checks = ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in exact.items())
    return "\n".join(lines) + f"\n\nfinal network exactly Q1 (distinct values <= 2^n1 after hardening): {checks}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="cap the training/test sets (quick checks)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="*", default=None, help="subset of the rows (default all): " + "; ".join(ROWS))
    ap.add_argument("--part", default=None, metavar="K/N",
                    help="train only every N-th row starting at the K-th (1-based), to run N processes in parallel")
    ap.add_argument("--out", default="benchmarks/results/dqa_table")
    args = ap.parse_args()
    try:
        labels = select_rows(ROWS, args.rows, args.part)
    except ConfigError as e:
        ap.error(str(e))
    base = {
        "model": {"name": args.model},
        "data": {"name": "fashion-mnist", "limit": args.limit},
        "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                  "threads": args.threads, "progress": False},
    }
    rows = {lb: {"plan": ROWS[lb]} for lb in labels}
    records = run_grid(rows, base, args.seeds, args.out)
    agg = aggregate(records, reference="FP32")
    table = write_results(args.out, records, agg, reference="FP32", meta={"args": vars(args)})
    order = ordering(records, agg)
    (Path(args.out) / "ordering.md").write_text(order)
    print(table)
    print()
    print(order)
    print(json.dumps({"out": args.out}))


if __name__ == "__main__":
    main()
