"""The same trained integer-mode runs evaluated with both integer biases (``plan.integer_bias``):
``coarse`` (the bias rounded to whole units of the unscaled accumulator: every run before session 11)
and ``fine`` (each layer's integer weights scaled by 2^k, the bias kept to 1/128 output code,
:func:`lowbit.export.intgraph.weight_prescale`), beside the fake-quantized float graph the run trained
(eval: BatchNorm on running statistics) and the run's today's-mode partner. Same weights, same best
epoch (chosen by the run under ``coarse``), the run's own test split.

    PYTHONPATH=src python benchmarks/integer_bias_eval.py RUN [RUN ...] --out results.jsonl [--images N]   # a line per run
    PYTHONPATH=src python benchmarks/integer_bias_eval.py --table results.jsonl                # markdown table

A run's today's-mode partner is found by name: ``..._int_out_r8[_max]_sK`` -> ``..._today_sK``
(``mbv2_ft/runs``), ``W2A2_integer_out_r8[_max]/seedK`` -> ``W2A2_today/seedK`` (``seeds``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


def partner(run: Path) -> Path | None:
    """The today's-mode run trained from the same start with the same seed, or None."""
    s = str(run)
    for pat, rep in ((r"_int_out_r8(_max)?(_s\d+)$", r"_today\2"), (r"_integer_out_r8(_max)?/(seed\d+)$", r"_today/\2")):
        t = re.sub(pat, rep, s)
        if t != s:
            return Path(t)
    return None


def row_name(run: Path) -> str:
    s = str(run)
    m = re.search(r"(W\d+A\d+s?)_int_out_r8(_max)?_s\d+$", s) or re.search(r"(W\d+A\d+)_integer_out_r8(_max)?/seed\d+$", s)
    model = "MobileNetV2" if "mbv2" in s else "ResNet-8"
    return f"{model} {m.group(1)}{' init max' if m.group(2) else ''}" if m else s


def evaluate_run(run: Path, images: int | None = None) -> dict:
    import torch

    from lowbit.data.base import Split
    from lowbit.train import BatchLoader, evaluate, load_run

    cfg, data, m, _ = load_run(run)
    test = data.test if images is None else Split(data.test.images[:images], data.test.labels[:images])
    loader = lambda: BatchLoader(test, data.info, cfg.train.eval_batch_size)  # noqa: E731
    plan = m._lowbit_state.plan
    out = {"run": str(run), "row": row_name(run), "recorded_bias": plan.integer_bias}
    for bias in ("coarse", "fine"):
        plan.integer_bias = bias
        out[f"integer_{bias}"] = evaluate(m, loader())["acc"]
    hits = n = 0
    with torch.no_grad():
        for x, y in loader():
            hits += int((m._lowbit_state.integer.gm(x).argmax(1) == y).sum())
            n += len(y)
    out["float_graph"] = hits / n
    p = partner(run)
    if p is not None and (p / "summary.json").is_file():
        if images is None:
            out["today"] = json.loads((p / "summary.json").read_text())["test_acc"]
        else:  # the same images
            _, _, mt, _ = load_run(p)
            out["today"] = evaluate(mt, loader())["acc"]
    out["recorded"] = json.loads((run / "summary.json").read_text())["test_acc"]  # the whole split
    out["images"] = n
    return out


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| run | images | today | integer, coarse (recorded on the whole split) | integer, fine | float graph | fine − today | coarse − today |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
        t = r.get("today")
        f = lambda v: f"{100 * v:.2f}"  # noqa: E731
        d = lambda v: f"{100 * (v - t):+.2f}" if t is not None else "–"  # noqa: E731
        lines.append(f"| {r['run'].split('results/integer_export/')[-1]} | {r['images']} | {f(t) if t is not None else '–'} "
                     f"| {f(r['integer_coarse'])} ({f(r['recorded'])}) | {f(r['integer_fine'])} | {f(r['float_graph'])} "
                     f"| {d(r['integer_fine'])} | {d(r['integer_coarse'])} |")
    lines += ["", "| row | seeds | fine − today, mean ± SE | coarse − today, mean ± SE | fine − coarse, mean |", "|---|---|---|---|---|"]
    for name, rs in groups.items():
        rs = [r for r in rs if r.get("today") is not None]
        if not rs:
            continue
        ms = lambda v: (f"{100 * np.mean(v):+.2f} ± {100 * np.std(v, ddof=1) / np.sqrt(len(v)):.2f}"  # noqa: E731
                        if len(v) > 1 else f"{100 * v[0]:+.2f}")
        fine = [r["integer_fine"] - r["today"] for r in rs]
        coarse = [r["integer_coarse"] - r["today"] for r in rs]
        lines.append(f"| {name} | {len(rs)} | {ms(fine)} | {ms(coarse)} | "
                     f"{100 * np.mean([r['integer_fine'] - r['integer_coarse'] for r in rs]):+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, help="append one JSON line per run")
    ap.add_argument("--images", type=int, default=None,
                    help="the first N images of the run's test split only (MobileNetV2's NumPy integer network "
                         "takes minutes per 1,000 images here)")
    ap.add_argument("--table", type=Path, help="print the markdown table of a results file")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    done = set()
    if args.out and args.out.is_file():
        done = {json.loads(line)["run"] for line in args.out.read_text().splitlines() if line.strip()}
    for run in args.runs:
        if str(run) in done:
            continue
        r = evaluate_run(run, args.images)
        print(json.dumps(r), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
