"""Seed 001 on Fashion-MNIST: SinReQ with DoReFa and WRPN, SINAREQ's learned bits, WRPN's widths.

Rows (ResNet-8, first conv / last linear FP32, 002 protocol: test accuracy at the best-validation
epoch, mean ± std over seeds; nothing here is tuned on these results):

* FP32;
* W{3,4,5}A{same}: DoReFa | DoReFa + SinReQ | WRPN | WRPN + SinReQ (strength 1, the quantizer's
  domain; 001 reports +2.82 (DoReFa) and +2.11 (WRPN) points on CIFAR-10/SVHN);
* SINAREQ on DoReFa weights from 8 bits, DoReFa A4 (lam_f 0.03, bits [2, 8], β lr 0.3, the last
  epoch a fine-tune at the rounded-up bits) against uniform W2A4 / W3A4 / W4A4 DoReFa at width 1 and,
  once every SINAREQ seed is done, uniform W{2,3,4}A4 at the widest width (1/16 grid) whose 002 memory
  fits SINAREQ's mean memory ("same memory" rows);
* WRPN width x1 / x2 at W2A2 and W4A4 (accuracy, params, BitOPs).

    python benchmarks/sinreq_table.py --epochs 3 --limit 5000 --seeds 0 1 2 --threads 1
    # two processes: --part 1/2 and --part 2/2 into the same --out, then once more without --part

Paired differences (same seed: same init and batch order) for SinReQ − plain and the same-memory
rows are in comparisons.md / comparisons.json beside results.jsonl, summary.csv, summary.md.
Finished runs are skipped, killed ones resumed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from lowbit.bench import aggregate, run_grid, select_rows, write_results
from lowbit.errors import ConfigError
from lowbit.bench.report import format_paired, paired

DOREFA = lambda b: {"name": "dorefa", "bits": b}  # noqa: E731
WRPN = lambda b: {"name": "wrpn", "bits": b}  # noqa: E731
SINREQ = {"name": "sinreq", "strength": 1.0}
SINAREQ = {"name": "sinareq", "lam_f": 0.03, "bits": [2, 8], "bits_lr": 0.3, "strength": 1.0, "finetune_epochs": 1}
SINAREQ_ROW = "SINAREQ DoReFa A4"


def _rows() -> dict[str, dict]:
    rows: dict[str, dict] = {"FP32": {"plan": {}}}
    for b in (3, 4, 5):
        for fam, q in (("DoReFa", DOREFA), ("WRPN", WRPN)):
            plan = {"weight": q(b), "act": q(b)}
            rows[f"W{b}A{b} {fam}"] = {"plan": plan}
            rows[f"W{b}A{b} {fam} + SinReQ"] = {"plan": {**plan, "method": SINREQ}}
    rows[SINAREQ_ROW] = {"plan": {"weight": DOREFA(8), "act": DOREFA(4), "method": SINAREQ}}
    for b in (2, 3, 4):
        rows[f"W{b}A4 DoReFa"] = {"plan": {"weight": DOREFA(b), "act": DOREFA(4)}}
    for b in (2, 4):
        rows[f"W{b}A{b} WRPN x2"] = {"plan": {"weight": WRPN(b), "act": WRPN(b)}, "model": {"width": 2.0}}
    rows["W2A2 WRPN"] = {"plan": {"weight": WRPN(2), "act": WRPN(2)}}
    return rows


ROWS = _rows()


def memory_of(model_name: str, plan: dict, width: float) -> int:
    """002 memory (bits) of the quantized model at this width, as the run summary counts it."""
    import torch

    from lowbit import create_model, quantize
    from lowbit.cost import profile
    from lowbit.quantize import layer_bits

    m = quantize(create_model(model_name, in_channels=1, num_classes=10, image_size=28, width=width), plan)
    x = torch.zeros(1, 1, 28, 28)
    m.eval()
    with torch.no_grad():
        m(x)
    return profile(m, x, layer_bits(m)).mem_bits


def widest_at_memory(model_name: str, plan: dict, budget: float, max_j: int = 48) -> float:
    """The widest width j/16 whose 002 memory fits ``budget`` (bisection: memory grows with width)."""
    lo, hi = 1, max_j
    if memory_of(model_name, plan, hi / 16) <= budget:
        return hi / 16
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_of(model_name, plan, mid / 16) <= budget else (lo, mid)
    return lo / 16


def _avg_bits(rec: dict) -> float:
    m = re.match(r"([\d.]+) per weight", rec.get("method_info", {}).get("avg weight bits", ""))
    return float(m.group(1)) if m else float("nan")


def comparisons(records: list[dict], same_mem: dict[str, float]) -> tuple[str, dict]:
    by_row: dict[str, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    acc = lambda row: [r["test_acc"] for r in by_row.get(row, [])]  # noqa: E731
    # one seed has no spread (was "± 0.00")
    ms = lambda v: f"{100 * statistics.fmean(v):.2f} ± {f'{100 * statistics.stdev(v):.2f}' if len(v) > 1 else '–'}" if v else "n/a"  # noqa: E731
    out: dict = {"sinreq": [], "sinareq": [], "wrpn_width": []}
    lines = ["## SinReQ vs plain (paired by seed; 001: +2.82 DoReFa, +2.11 WRPN)", "",
             "| bits | quantizer | plain | + SinReQ | SinReQ − plain | quant. error plain → SinReQ |", "|---|---|---|---|---|---|"]
    for b in (3, 4, 5):
        for fam in ("DoReFa", "WRPN"):
            a, s = f"W{b}A{b} {fam}", f"W{b}A{b} {fam} + SinReQ"
            if a not in by_row or s not in by_row:
                continue
            p = paired(records, s, a)
            err = lambda row: statistics.fmean(_qerr(r) for r in by_row[row])  # noqa: E731
            lines.append(f"| W{b}A{b} | {fam} | {ms(acc(a))} | {ms(acc(s))} | {format_paired(p)} | {err(a):.3f} → {err(s):.3f} |")
            out["sinreq"].append({"bits": b, "quantizer": fam, "diff": p, "plain": acc(a), "sinreq": acc(s)})
    lines += ["", "## SINAREQ vs uniform bits (A4 DoReFa; 002 memory)", "",
              "| row | width | avg weight bits | accuracy | 002 memory KiB | − SINAREQ (paired) | learned bits (seed 0) |",
              "|---|---|---|---|---|---|---|"]
    names = [SINAREQ_ROW] + [f"W{b}A4 DoReFa" for b in (2, 3, 4)] + list(same_mem)
    for row in names:
        if row not in by_row:
            continue
        rs = by_row[row]
        mem = statistics.fmean(r["mem_002_bits"] for r in rs) / 8 / 1024
        bits = statistics.fmean(_avg_bits(r) for r in rs) if row == SINAREQ_ROW else rs[0]["weight_bits"][0]
        width = rs[0]["config"]["model"].get("width", 1.0)
        learned = rs[0].get("method_info", {}).get("learned bits", "") if row == SINAREQ_ROW else ""
        d = "" if row == SINAREQ_ROW else format_paired(paired(records, row, SINAREQ_ROW))
        lines.append(f"| {row} | {width:g} | {bits:.2f} | {ms(acc(row))} | {mem:.1f} | {d} | {learned} |")
        out["sinareq"].append({"row": row, "width": width, "avg_bits": bits, "acc": acc(row), "mem_kib": mem,
                               "learned": learned})
    lines += ["", "## WRPN width (x1 vs x2)", "", "| bits | width | accuracy | params | GBitOPs | x2 − x1 |",
              "|---|---|---|---|---|---|"]
    for b in (2, 4):
        for row, w in ((f"W{b}A{b} WRPN", 1), (f"W{b}A{b} WRPN x2", 2)):
            if row in by_row:
                r0 = by_row[row][0]
                d = format_paired(paired(records, row, f"W{b}A{b} WRPN")) if w == 2 else ""
                lines.append(f"| W{b}A{b} | x{w} | {ms(acc(row))} | {r0['params']} | {r0['bitops'] / 1e9:.3f} | {d} |")
                out["wrpn_width"].append({"row": row, "acc": acc(row), "params": r0["params"], "bitops": r0["bitops"]})
    return "\n".join(lines) + "\n", out


def _qerr(rec: dict) -> float:
    """Mean |u - Q(u)|/step over the layers at the end of the run (plain runs: from the run folder)."""
    m = re.match(r"mean \|u-Q\(u\)\|/step ([\d.]+)", rec.get("method_info", {}).get("quant error", ""))
    if m:
        return float(m.group(1))
    from lowbit.methods.sinreq import quantization_error
    from lowbit.train import load_run

    err = quantization_error(load_run(rec["run_dir"])[2])
    return statistics.fmean(err.values()) if err else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=5000, help="cap the training/test sets")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="runs at once, as separate processes")
    ap.add_argument("--rows", nargs="*", default=None, help="subset of the rows (default all): " + "; ".join(ROWS))
    ap.add_argument("--part", default=None, metavar="K/N", help="train only every N-th row from the K-th (1-based)")
    ap.add_argument("--out", default="benchmarks/results/sinreq")
    args = ap.parse_args()
    try:
        labels = select_rows(ROWS, args.rows, args.part)
    except ConfigError as e:
        ap.error(str(e))
    base = {"model": {"name": args.model}, "data": {"name": "fashion-mnist", "limit": args.limit},
            "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine",
                      "threads": args.threads, "progress": False}}
    if args.epochs < 2:  # SINAREQ's fine-tune epoch needs an epoch of learning before it
        ROWS[SINAREQ_ROW]["plan"]["method"] = {**SINAREQ, "finetune_epochs": 0}
    records = run_grid({lb: ROWS[lb] for lb in labels}, base, args.seeds, args.out, workers=args.workers)
    # same-memory rows: only once SINAREQ is done for every seed (then deterministic from its results)
    same_mem: dict[str, float] = {}
    sin_dirs = [Path(args.out) / "SINAREQ_DoReFa_A4" / f"seed{s}" / "summary.json" for s in args.seeds]
    if SINAREQ_ROW in (args.rows or ROWS) and all(p.is_file() for p in sin_dirs) and not args.part:
        budget = statistics.fmean(json.loads(p.read_text())["mem_002_bits"] for p in sin_dirs)
        extra = {}
        for b in (2, 3, 4):
            plan = {"weight": DOREFA(b), "act": DOREFA(4)}
            w = widest_at_memory(args.model, plan, budget)
            label = f"W{b}A4 DoReFa @SINAREQ memory"
            extra[label] = {"plan": plan, "model": {"width": w}}
            same_mem[label] = w
        records += run_grid(extra, base, args.seeds, args.out, workers=args.workers)
    elif SINAREQ_ROW in (args.rows or ROWS):
        print("same-memory rows: run again without --part once every SINAREQ seed has finished")
    agg = aggregate(records, reference="FP32" if any(r["row"] == "FP32" for r in records) else None)
    table = write_results(args.out, records, agg, reference="FP32", meta={"args": vars(args)})
    text, comp = comparisons(records, same_mem)
    (Path(args.out) / "comparisons.md").write_text(text)
    (Path(args.out) / "comparisons.json").write_text(json.dumps(comp, indent=1) + "\n")
    print(table)
    print()
    print(text)
    print(json.dumps({"out": args.out}))


if __name__ == "__main__":
    main()
