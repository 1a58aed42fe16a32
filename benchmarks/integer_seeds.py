"""Integer mode vs today's mode over seeds (issue 17): is the accuracy gap real, and where from?

Same slice and recipe as ``integer_export.py --train`` (ResNet-8, SAWB weights + PACT activations,
first 10,000 Fashion-MNIST training images, 3 epochs, cosine LR 0.1, batch 128), more seeds, plus
rows that separate the causes of the gap:

* ``WxAx today``: the default mode (first conv / last linear FP32, float BN and residuals);
* ``WxAx today 8bit-ends``: today's mode with the first conv and last linear at 8 bits, quantized
  exactly as integer mode quantizes them (LSQ per-channel 8-bit weights; the input signed 8-bit
  LSQ, the classifier input the plan's activation quantizer at 8 bits): today minus this row is
  what the 8-bit ends cost;
* ``WxAx integer``: ``plan.integer: true`` (the integer network);
* ``WxAx integer out r8``: the same with ``integer_residual: output`` and
  ``integer_residual_bits: 8`` (residual operands and the pooled tensor stored at 8 bits), with the
  paper's LSQ init of integer mode's 8-bit quantizers (``integer_init: lsq``, sessions 5-8);
* ``WxAx integer out r8 max``: the same with ``integer_init: max`` (session 9's default);
* these three rows ran with ``integer_bias: coarse`` and ``integer_train_mid: false`` (pinned);
  ``WxAx integer s11``: session 11's defaults (output add, 8-bit stream, init lsq, fine bias,
  training rounds residual convs to ``mid``); ``WxAx integer s11 nomid``: the same without ``mid`` in
  training.

    python benchmarks/integer_seeds.py --rows "W2A2 integer" --seeds 0       # slot
    python benchmarks/integer_seeds.py --jobs "W2A2 integer:1,W2A2 today:1"  # slot; in this order
    python benchmarks/integer_seeds.py --table                               # -> seeds/summary.md

Runs go to ``benchmarks/results/integer_export/seeds/<row>/seed<k>`` (finished runs are skipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path("benchmarks/results/integer_export/seeds")


def rows() -> dict:
    r = {}
    for b in (2, 4, 8):
        plan = {"weight": {"name": "sawb", "bits": b}, "act": {"name": "pact", "bits": b}}
        r[f"W{b}A{b} today"] = {"plan": plan}
        r[f"W{b}A{b} today 8bit-ends"] = {"plan": {
            **plan, "keep_first": False, "keep_last": False,
            "layers": {"conv1": {"weight": {"name": "lsq", "bits": 8, "per_channel": True},
                                 "act": {"name": "lsq", "bits": 8, "signed": True}},
                       "fc": {"weight": {"name": "lsq", "bits": 8, "per_channel": True}, "act": {"bits": 8}}}}}
        # rows of sessions 5-10: coarse bias, mid not trained (pinned: no longer the defaults)
        s10 = {"integer_bias": "coarse", "integer_train_mid": False}
        r[f"W{b}A{b} integer"] = {"plan": {**plan, "integer": True, "integer_residual": "accumulator",
                                           "integer_init": "lsq", **s10}}
        # the output residual add (onnxruntime-exact) with an 8-bit residual stream
        r[f"W{b}A{b} integer out r8"] = {"plan": {**plan, "integer": True, "integer_residual": "output",
                                                  "integer_residual_bits": 8, "integer_init": "lsq", **s10}}
        # the same with session 9's default init of integer mode's 8-bit LSQ quantizers (max|v|/Qp)
        r[f"W{b}A{b} integer out r8 max"] = {"plan": {**plan, "integer": True, "integer_residual": "output",
                                                      "integer_residual_bits": 8, "integer_init": "max", **s10}}
        # session 11's defaults: the bias kept to 1/128 code, training rounds residual convs to mid
        r[f"W{b}A{b} integer s11"] = {"plan": {**plan, "integer": True, "integer_residual": "output",
                                               "integer_residual_bits": 8, "integer_init": "lsq",
                                               "integer_bias": "fine", "integer_train_mid": True}}
        # ... without mid in training (which of the two changes moves training)
        r[f"W{b}A{b} integer s11 nomid"] = {"plan": {**plan, "integer": True, "integer_residual": "output",
                                                     "integer_residual_bits": 8, "integer_init": "lsq",
                                                     "integer_bias": "fine", "integer_train_mid": False}}
    return r


BASE = {
    "model": {"name": "resnet8"},
    "data": {"name": "fashion-mnist", "limit": 10000},
    "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "threads": 1, "progress": False},
}


def main() -> None:
    from lowbit.bench import aggregate, run_grid, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row labels (default: none; see rows())")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", default=None, help='"ROW:SEED,ROW:SEED,..." run in this order (one process)')
    ap.add_argument("--table", action="store_true", help="summary of every finished run")
    ap.add_argument("--paired", default=None, metavar="ROW,BASE",
                    help="per seed ROW − BASE test accuracy (seeds both finished), mean ± standard error, "
                         "for each width: e.g. 'integer out r8 max,today'")
    ap.add_argument("--residual-eval", action="store_true",
                    help="test accuracy of every finished integer run's best.pt: the integer model with "
                         "integer_residual accumulator and output (same weights), and the fake-quantized float "
                         "graph training sees")
    args = ap.parse_args()
    all_rows = rows()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.rows:
        sel = {k.strip(): all_rows[k.strip()] for k in args.rows.split(",")}
        run_grid(sel, BASE, seeds, OUT, workers=1)
    for job in (args.jobs.split(",") if args.jobs else []):
        label, seed = job.rsplit(":", 1)
        run_grid({label.strip(): all_rows[label.strip()]}, BASE, [int(seed)], OUT, workers=1)
    if args.residual_eval:
        residual_eval()
    if args.paired:
        print(paired(*[s.strip() for s in args.paired.split(",")]))
    if args.table:
        done = {k: v for k, v in all_rows.items() if any((OUT / k.replace(" ", "_")).glob("seed*/summary.json"))}
        have = sorted({int(p.name[4:]) for k in done for p in (OUT / k.replace(" ", "_")).glob("seed*")
                       if (p / "summary.json").is_file()})
        recs = []
        for k, v in done.items():
            for s in have:
                if (OUT / k.replace(" ", "_") / f"seed{s}" / "summary.json").is_file():
                    recs += run_grid({k: v}, BASE, [s], OUT, workers=1)
        print(write_results(OUT, recs, aggregate(recs), meta={"note": "integer_seeds.py"}))


def paired(row: str, base: str) -> str:
    """Markdown: per width, ROW − BASE test accuracy per seed where both finished, mean ± SE."""
    import json

    from lowbit.bench.report import mean_se

    lines = [f"| bits | {row} − {base} per seed | mean ± standard error |", "|---|---|---|"]
    for b in (2, 4, 8):
        d = []
        for k in range(10):
            acc = [OUT / f"W{b}A{b} {r}".replace(" ", "_") / f"seed{k}" / "summary.json" for r in (row, base)]
            if all(p.is_file() for p in acc):
                a, c = (100 * json.loads(p.read_text())["test_acc"] for p in acc)
                d.append((k, a - c))
        if d:
            m, se = mean_se([x for _, x in d])
            lines.append(f"| W{b}A{b} | " + " / ".join(f"{x:+.2f} (s{k})" for k, x in d) + f" | **{m:+.2f} ± {se:.2f}** |")
    return "\n".join(lines)


def residual_eval() -> None:
    import json

    import torch

    from lowbit.data import BatchLoader
    from lowbit.train import load_run

    out = {}
    for d in sorted(OUT.glob("*integer*/seed*")):
        if not (d / "best.pt").is_file():
            continue
        _, data, m, _ = load_run(d)
        xs, ys = zip(*BatchLoader(data.test, data.info, 1000))
        x, y = torch.cat(xs), torch.cat(ys).numpy()
        r = {}
        with torch.no_grad():  # the fake-quantized float graph training sees (BN on running statistics)
            r["float_graph"] = float((m._lowbit_state.integer.gm(x).argmax(1).numpy() == y).mean())
        for mode in ("accumulator", "output"):
            m._lowbit_state.plan.integer_residual = mode
            with torch.no_grad():
                r[mode] = float((m(x).argmax(1).numpy() == y).mean())
        out[f"{d.parent.name}/{d.name}"] = r
        print(d, r, flush=True)
    (OUT / "residual_modes.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
