"""000 Tables 1 and 3 on Fashion-MNIST: quantization through search (RDHS, SGT) vs BinaryConnect and BWN.

Rows (the same recipe, epochs and seeds for every row; first conv / last linear FP32; no scale on
the searched value sets: the following BatchNorm absorbs the magnitude, as 000 does):

* Table 1: FP32; BinaryConnect = sign-STE (``valueset`` {±1}, scale none, method ``ste``: forward
  sign(w), identity gradient; BC proper also zeroes the gradient where |w| > 1 and clips the latent
  weight to [-1, 1], which no registered quantizer does; with Kaiming-scale latent weights, far
  inside ±1, the difference is small); BWN (β = E|w| per output filter, as XNOR-Net);
  SGT and RDHS over {±1}, {±1, ±1/2}, {±1, ±1/2, ±1/4, ±1/8}. RDHS runs with the authors' schedule
  τ = max(0.97^epoch, 1e-5) and, as extra rows, with each other ``--rdhs-tau0`` (default 0.02; see
  docs/valuesearch.md: our logits start at the latent weight's scale, far below τ = 1).
* Table 3: RDHS over {±1} with Gumbel noise μ ∈ {0, 0.001, 0.01, 0.1} (μ = 0 is the Table 1 row).

    python benchmarks/valuesearch_table.py --model resnet8 --epochs 10 --seeds 0 1 2 --threads 1 \\
        --out benchmarks/results/valuesearch_table

Test accuracy at the best-validation epoch (002's protocol), mean ± std over seeds; ΔAcc against
FP32; "Req. Mult" and the value space actually used are read from each trained network (best
checkpoint) by ``lowbit.methods.valuesearch.value_space`` for every quantized layer. Finished runs
are skipped and killed ones resumed (``lowbit.bench.run_grid``); disjoint ``--rows`` subsets may
run in parallel into the same ``--out``, and a last call with all rows (all done) writes the
tables. Writes results.jsonl, summary.csv, summary.md, table1.md, table3.md and claims.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.bench import aggregate, run_grid, select_rows, write_results
from lowbit.bench.report import format_paired, paired
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.methods.valuesearch import overall, value_space_report
from lowbit.train import build_model, load_data

SETS = {  # bits -> (named value set, 000's notation)
    1: ("binary", "{±1}"),
    2: ("po2-2bit", "{±1, ±1/2}"),
    3: ("po2-3bit", "{±1, ±1/2, ±1/4, ±1/8}"),
}
MUS = (0.001, 0.01, 0.1)


def vs(bits: int) -> dict:
    return {"name": "valueset", "values": SETS[bits][0], "scale": "none"}


def rdhs_label(bits: int, tau0: float, mu: float = 0.0) -> str:
    s = f"RDHS {SETS[bits][1]}"
    s += "" if tau0 == 1.0 else f" τ0={tau0:g}"
    return s + ("" if mu == 0 else f" μ={mu:g}")


def make_rows(tau0s: list[float]) -> dict[str, dict]:
    """Row label -> plan, in table order (the searched value space of a row: :func:`searched`)."""
    rows = {
        "FP32": {},
        "BinaryConnect": {"weight": vs(1), "method": {"name": "ste"}},
        "BWN": {"weight": {"name": "bwn", "bits": 1, "per_channel": True}, "method": {"name": "ste"}},
    }
    for b in SETS:
        rows[f"SGT {SETS[b][1]}"] = {"weight": vs(b), "method": {"name": "sgt"}}
    for tau0 in [1.0] + [t for t in tau0s if t != 1.0]:
        for b in SETS:
            rows[rdhs_label(b, tau0)] = {"weight": vs(b), "method": {"name": "rdhs", "mu": 0.0, "tau0": tau0}}
    for mu in MUS:
        rows[rdhs_label(1, 1.0, mu)] = {"weight": vs(1), "method": {"name": "rdhs", "mu": mu, "tau0": 1.0}}
    return rows


def searched(label: str) -> str:
    """The value space a row trains over, in 000's notation (Table 1's "Value Space")."""
    for _, s in reversed(SETS.values()):  # the longest notation first
        if s in label:
            return s
    return {"FP32": "R", "BinaryConnect": "{±1}", "BWN": "{±1}·β (R)"}.get(label, "?")


# ---------------------------------------------------------------------------------------------
# reading the trained networks
# ---------------------------------------------------------------------------------------------
def trained_value_space(run_dir: str, cache: dict) -> tuple[str, bool]:
    """(value space used over all quantized layers, any layer needs a multiplier) of a run's
    best checkpoint; no quantized layer (FP32) is ("R", True)."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    key = (cfg.data.name, cfg.data.root, cfg.data.limit, cfg.data.val_fraction)
    if key not in cache:
        cache[key] = load_data(cfg)
    model = build_model(cfg, cache[key])
    model.load_state_dict(torch.load(Path(run_dir) / "best.pt", weights_only=False)["model"])
    model.eval()
    return overall(value_space_report(model))


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def table1(agg: dict[str, dict], spaces: dict[str, tuple[str, str]], labels: list[str]) -> str:
    fp = agg.get("FP32")
    lines = ["| method | value space searched | value space used | acc % (mean ± std) | ΔAcc (FP32 − row) "
             "| Req. Mult | epoch time / FP32 | n |", "|---|---|---|---|---|---|---|---|"]
    for lb in labels:
        if lb not in agg:
            continue
        r = agg[lb]
        used, mult = spaces[lb]
        d = "" if fp is None or lb == "FP32" else f"{100 * (fp['acc_mean'] - r['acc_mean']):.2f}"
        acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"
        lines.append(f"| {lb} | {searched(lb)} | {used} | {acc} | {d} | {mult} | {r['time_ratio']:.2f} | {r['n']} |")
    return "\n".join(lines)


def table3(agg: dict[str, dict], records: list[dict]) -> str:
    base = rdhs_label(1, 1.0)
    lines = ["| μ | acc % (mean ± std) | vs μ = 0 (paired by seed) | n |", "|---|---|---|---|"]
    for mu in (0.0,) + MUS:
        lb = rdhs_label(1, 1.0, mu)
        if lb not in agg:
            continue
        r = agg[lb]
        vs0 = "" if mu == 0 else format_paired(paired(records, lb, base))
        lines.append(f"| {mu:g} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {vs0} | {r['n']} |")
    return "\n".join(lines)


def claims(agg: dict[str, dict], records: list[dict], tau0s: list[float]) -> str:
    """000's claims, checked on these runs (accuracy only; time and memory: valuesearch_cost.py)."""
    out = []
    mu_rows = [rdhs_label(1, 1.0, mu) for mu in (0.0,) + MUS if rdhs_label(1, 1.0, mu) in agg]
    if len(mu_rows) > 1:
        best = max(mu_rows, key=lambda lb: agg[lb]["acc_mean"])
        out.append(f"- μ = 0 best (000 Table 3): {'holds' if best == mu_rows[0] else 'does not hold'} "
                   f"(best: {best}, {100 * agg[best]['acc_mean']:.2f}%)")
    for b, (_, s) in SETS.items():
        for tau0 in [1.0] + [t for t in tau0s if t != 1.0]:
            sg, rd = f"SGT {s}", rdhs_label(b, tau0)
            if sg in agg and rd in agg:
                out.append(f"- {sg} − {rd}: {format_paired(paired(records, sg, rd))} "
                           f"(000 Table 4: RDHS ahead on average by "
                           f"0.2/0.8/1.6 top-1 points at 1/2/3 bits; std over seeds SGT "
                           f"{100 * agg[sg]['acc_std']:.2f} vs RDHS {100 * agg[rd]['acc_std']:.2f})")
    if "BWN" in agg:
        for lb in [f"SGT {SETS[1][1]}"] + [rdhs_label(1, t) for t in [1.0] + [t for t in tau0s if t != 1.0]]:
            if lb in agg:
                p = paired(records, lb, "BWN")
                out.append(f"- {lb} ≥ BWN (000 Table 1): {'holds' if p and p[0] >= 0 else 'does not hold'} "
                           f"({format_paired(p)})")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="cap the training/test sets (quick checks)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rdhs-tau0", type=float, nargs="*", default=[0.02],
                    help="extra RDHS rows with this initial temperature (the authors' 1.0 always runs)")
    ap.add_argument("--rows", nargs="*", default=None, help="subset of the rows (default all)")
    ap.add_argument("--out", default="benchmarks/results/valuesearch_table")
    args = ap.parse_args()
    plans = make_rows(args.rdhs_tau0)
    try:
        labels = select_rows(plans, args.rows)
    except ConfigError as e:
        ap.error(str(e))
    base = {
        "model": {"name": args.model},
        "data": {"name": "fashion-mnist", "limit": args.limit},
        "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                  "weight_decay": 5e-4, "threads": args.threads, "progress": False},
    }
    records = run_grid({lb: {"plan": plans[lb]} for lb in labels}, base, args.seeds, args.out)
    agg_rows = aggregate(records, reference="FP32")
    write_results(args.out, records, agg_rows, reference="FP32", meta={"args": vars(args)})
    agg = {r["row"]: r for r in agg_rows}

    cache: dict = {}
    per_run = {(r["row"], r["seed"]): trained_value_space(r["run_dir"], cache) for r in records}
    spaces = {}
    for lb in agg:
        runs = [v for (row, _), v in per_run.items() if row == lb]
        used = sorted({u for u, _ in runs})
        spaces[lb] = (" / ".join(used), "Y" if any(m for _, m in runs) else "N")
    t1_labels = [lb for lb in plans if " μ=" not in lb]
    t1, t3, cl = table1(agg, spaces, t1_labels), table3(agg, records), claims(agg, records, args.rdhs_tau0)
    out = Path(args.out)
    head = (f"Fashion-MNIST, {args.model}, {args.epochs} epochs, seeds {args.seeds}"
            f"{'' if args.limit is None else f', limit {args.limit}'}; first conv / last linear FP32; "
            "searched sets without scale (BatchNorm absorbs it)\n\n")
    (out / "table1.md").write_text(head + t1 + "\n")
    (out / "table3.md").write_text(head + t3 + "\n")
    (out / "claims.md").write_text(head + cl)
    print("000 Table 1 analogue\n" + t1 + "\n\n000 Table 3 analogue (RDHS {±1})\n" + t3 + "\n\nclaims\n" + cl)
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
