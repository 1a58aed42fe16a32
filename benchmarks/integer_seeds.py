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
* these three rows ran with ``integer_bias: coarse`` and ``integer_train_mid: false`` (pinned; every
  row before session 12 pins ``integer_mid_range: cover``, what it ran with);
  ``WxAx integer s11``: session 11's defaults (output add, 8-bit stream, init lsq, fine bias,
  training rounds residual convs to ``mid``); ``WxAx integer s11 nomid``: the same without ``mid`` in
  training (today's defaults); ``WxAx integer s12 observed``: ``mid`` trained on its observed range;
* session 13, BatchNorm frozen (``train.freeze_bn_after``), in both modes (``WxAx today ...`` and
  ``WxAx integer s13 ...``, today's integer defaults): ``freeze`` (the last epoch, the batch gradient),
  ``freeze plain`` (the last epoch, the frozen map's own gradient) and ``freeze late`` (the last half
  epoch, the frozen map's own gradient: the recipe docs/integer-log.md recommends).

* session 34, integer mode from scratch after one FP32 epoch: ``R8 fp32 warm1`` (the warm-up, per seed),
  ``WxAx integer warm1`` (integer mode's defaults from it), ``WxAx today fw1`` (today's mode from it) and the pilot's
  ``WxAx today warm1`` / ``WxAx integer tw1`` (a warm-up in today's mode); ``--one-config`` trains such a row again
  as one config with ``train.float_warmup_epochs: 1``.

    python benchmarks/integer_seeds.py --rows "W2A2 integer" --seeds 0       # slot
    python benchmarks/integer_seeds.py --jobs "W2A2 integer:1,W2A2 today:1"  # slot; in this order
    python benchmarks/integer_seeds.py --table                               # -> seeds/summary.md
    python benchmarks/integer_seeds.py --ft --jobs "W2A2 today:0,..."        # fine-tune protocol -> seeds_ft/

Runs go to ``benchmarks/results/integer_export/seeds/<row>/seed<k>`` (finished runs are skipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path("benchmarks/results/integer_export/seeds")


def rows(epochs: int = 3) -> dict:
    """Every row; ``epochs`` (the protocol's): the ``freeze`` rows freeze BatchNorm for the last epoch
    or half epoch."""
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
        s10 = {**plan, "integer": True, "integer_bias": "coarse", "integer_train_mid": False,
               "integer_mid_range": "cover"}
        r[f"W{b}A{b} integer"] = {"plan": {**s10, "integer_residual": "accumulator", "integer_init": "lsq"}}
        # the output residual add (onnxruntime-exact) with an 8-bit residual stream
        out_r8 = {**s10, "integer_residual": "output", "integer_residual_bits": 8}
        r[f"W{b}A{b} integer out r8"] = {"plan": {**out_r8, "integer_init": "lsq"}}
        # the same with session 9's default init of integer mode's 8-bit LSQ quantizers (max|v|/Qp)
        r[f"W{b}A{b} integer out r8 max"] = {"plan": {**out_r8, "integer_init": "max"}}
        # session 11's defaults: the bias kept to 1/128 code, training rounds residual convs to mid
        s11 = {**out_r8, "integer_init": "lsq", "integer_bias": "fine", "integer_train_mid": True}
        r[f"W{b}A{b} integer s11"] = {"plan": s11}
        # ... without mid in training (which of the two changes moves training; today's defaults)
        r[f"W{b}A{b} integer s11 nomid"] = {"plan": {**s11, "integer_train_mid": False}}
        # session 12: mid trained, covering the range its conv values took in training (a finer grid)
        r[f"W{b}A{b} integer s12 observed"] = {"plan": {**s11, "integer_mid_range": "observed"}}
        # session 13: BatchNorm frozen (train.freeze_bn_after), both modes: for the last epoch with the
        # gradient through the batch's statistics ("freeze") or the frozen map's own ("plain"); for the last
        # half epoch with the frozen map's own gradient ("late", the default gradient)
        for suffix, at, grad in (("", epochs - 1, "batch"), (" plain", epochs - 1, "running"),
                                 (" late", epochs - 0.5, "running")):
            fz = {"train": {"freeze_bn_after": at, "freeze_bn_gradient": grad}}
            r[f"W{b}A{b} today freeze{suffix}"] = {"plan": plan, **fz}
            r[f"W{b}A{b} integer s13 freeze{suffix}"] = {"plan": {**s11, "integer_train_mid": False}, **fz}
            r[f"W{b}A{b} integer s13 observed freeze{suffix}"] = {"plan": {**s11, "integer_mid_range": "observed"},
                                                                 **fz}
            if b == 8:
                # session 21: the same rows with 8-bit weights on an int8 grid (LSQ per channel, the paper's init),
                # the form whose every conv onnxruntime runs on its integer kernels; 8-bit SAWB's 256 odd levels do
                # not fit int8 (docs/export.md). Declared before they ran, seeds 0-7: integer mode meets the
                # accuracy target at W8A8 when the one-sided 95 % lower bound of "lsq integer s13 freeze late
                # − lsq today" is above −0.5 (and, second, against "lsq today freeze late")
                lsq8 = {**plan, "weight": {"name": "lsq", "bits": 8, "per_channel": True}}
                if suffix == " late":
                    r["W8A8 lsq today"] = {"plan": lsq8}
                    r["W8A8 lsq today freeze late"] = {"plan": lsq8, **fz}
                    r["W8A8 lsq integer s13 freeze late"] = {
                        "plan": {**s11, "weight": lsq8["weight"], "integer_train_mid": False}, **fz}
        # session 34: integer mode FROM SCRATCH after a warm-up in the same 3-epoch budget. Epoch 1 trains at lr 0.1
        # (constant: a 3-epoch cosine is at 0.075 by its end), unquantized ("warm1": WARM_FP32) or in today's mode at
        # the same width ("tw1": "WbAb today warm1"); epochs 2-3 train integer mode's defaults from its latent weights
        # (model.init_from, the seed's own warm-up run), lr 0.075 cosine (a 3-epoch cosine's last two epochs start
        # there). INIT_FROM_SEED in init_from: that seed's run folder (main() fills it in)
        stage2 = {"plan": {**s11, "integer_train_mid": False}, "train": {"epochs": epochs - 1, "lr": 0.075}}
        r[f"W{b}A{b} today warm1"] = {"plan": plan, "train": WARM_TRAIN}
        # "today fw1": today's mode after the same FP32 warm-up and schedule (what the warm-up alone is worth)
        today2 = {"plan": plan, "train": stage2["train"]}
        for label, warm, row in ((f"W{b}A{b} integer warm1", WARM_FP32, stage2),
                                 (f"W{b}A{b} integer tw1", f"W{b}A{b} today warm1", stage2),
                                 (f"W{b}A{b} today fw1", WARM_FP32, today2)):
            WARM_OF[label] = warm
            r[label] = {**row, "model": {"init_from": str(OUT / slug(warm) / INIT_FROM_SEED)}}
    r[WARM_FP32] = {"plan": {"weight": None, "act": None}, "train": WARM_TRAIN}
    return r


#: session 34's warm-up (the first epoch of a from-scratch run, before integer mode): an FP32 ResNet-8, or today's
#: mode ("WbAb today warm1"), 1 epoch at a constant lr 0.1; WARM_OF: the warm-up row of each row that starts from one
WARM_FP32 = "R8 fp32 warm1"
WARM_TRAIN = {"epochs": 1, "schedule": "constant"}
WARM_OF: dict[str, str] = {}
INIT_FROM_SEED = "seed{seed}"


def slug(label: str) -> str:
    from lowbit.bench.runner import slug as _slug

    return _slug(label)


def for_seed(row: dict, seed: int) -> dict:
    """``row`` with its warm-up run's folder (``model.init_from``) filled in for ``seed``."""
    src = row.get("model", {}).get("init_from")
    if not src or INIT_FROM_SEED not in src:
        return row
    return {**row, "model": {**row["model"], "init_from": src.replace(INIT_FROM_SEED, f"seed{seed}")}}


#: Session 33, declared before any of these runs: ResNet-8 W8A8 FROM SCRATCH (this file's protocol: 10,000
#: images, 3 epochs, lr 0.1 cosine), integer mode's defaults ("W8A8 integer s11 nomid": output add, 8-bit
#: residual stream, lsq init, fine bias, mid not trained, no BatchNorm freeze) against "W8A8 today", seeds 5-14
#: (fresh for both rows). The from-scratch W8A8 target (issue 17: within 0.5 points) is met when the one-sided
#: 95 % lower bound (Student's t) of their paired difference over these 10 seeds alone is above −0.5:
#:     python benchmarks/integer_seeds.py --paired "integer s11 nomid,today" --paired-seeds 5-14
#: W2A2 / W4A4 from scratch are not in it: their paired differences spread by 1.25 points per seed (sessions
#: 11-12), so 10 pairs bound the mean only to about −0.75 below it; about 45 pairs per width would be needed.
DECLARED_S33 = {"rows": ("W8A8 integer s11 nomid", "W8A8 today"), "seeds": tuple(range(5, 15))}
#: Session 33, the second declared sample, written after 12 of the 20 W8A8 runs above had finished (a run takes
#: about 50 s on this session's machine, not the 4 min assumed above) and before any W2A2 / W4A4 run on these
#: seeds: ResNet-8 W2A2 and W4A4 FROM SCRATCH, the same two rows ("WbAb integer s11 nomid" − "WbAb today"),
#: seeds 5-54 (50 fresh pairs per width). Per width, the target is met when the one-sided 95 % lower bound
#: (Student's t) of the paired difference over these 50 seeds alone is above −0.5; if the session ends first,
#: the finished pairs are reported as PARTIAL and the same seeds continue:
#:     python benchmarks/integer_seeds.py --paired "integer s11 nomid,today" --paired-seeds 5-54
DECLARED_S33_LOW = {"rows": tuple(f"W{b}A{b} {r}" for b in (2, 4) for r in ("integer s11 nomid", "today")),
                    "seeds": tuple(range(5, 55))}

#: Session 34, declared before any run of these rows on these seeds (a pilot on seeds 0-4 chose the FP32 warm-up,
#: "integer warm1", over today's mode's, "integer tw1": +2.4 / +0.6 points over "today" at W2A2 / W4A4 against
#: +0.9 (1 seed) / +0.7): ResNet-8 FROM SCRATCH in the same 3-epoch budget, epoch 1 FP32 (lr 0.1), epochs 2-3
#: integer mode's defaults (lr 0.075 cosine). Seeds 5-54 at W2A2 and W4A4, 5-14 at W8A8 (session 33's seeds: the
#: "today" runs are reused; no "integer warm1" or "today fw1" run on them exists yet). Per width, two tests, each
#: met when the one-sided 95 % lower bound (Student's t) of the paired difference over these seeds is above −0.5:
#: (1) the issue's target, "integer warm1" − "today" (today's mode as a user trains it from scratch);
#: (2) the mode's own cost under one recipe, "integer warm1" − "today fw1" (today's mode after the same warm-up).
#: If the session ends first, the finished pairs are reported as PARTIAL and the same seeds continue:
#:     python benchmarks/integer_seeds.py --paired "integer warm1,today" --paired-seeds 5-54
#:     python benchmarks/integer_seeds.py --paired "integer warm1,today fw1" --paired-seeds 5-54
DECLARED_S34 = {"rows": ("integer warm1", "today", "today fw1"), "seeds": {2: tuple(range(5, 55)),
                                                                       4: tuple(range(5, 55)), 8: tuple(range(5, 15))}}

BASE = {
    "model": {"name": "resnet8"},
    "data": {"name": "fashion-mnist", "limit": 10000},
    "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "threads": 1, "progress": False},
}
# --ft (session 12): every row fine-tuned from one FP32 ResNet-8 (as integer_mbv2_ft.py does for
# MobileNetV2), so that seeds differ only in the fine-tune: from scratch, ResNet-8's paired
# differences spread by 1-3 points per seed, more than the 0.5-point question
OUT_FT = Path("benchmarks/results/integer_export/seeds_ft")
PRETRAIN_LABEL, PRETRAIN_SEED = "R8 fp32 pretrain", 100
PRETRAIN = {"plan": {"weight": None, "act": None}, "data": {"name": "fashion-mnist", "limit": 24000}}
BASE_FT = {
    "model": {"name": "resnet8", "init_from": str(OUT_FT / "R8_fp32_pretrain" / f"seed{PRETRAIN_SEED}")},
    "data": {"name": "fashion-mnist", "limit": 10000},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.01, "schedule": "cosine", "threads": 1, "progress": False},
}


def main() -> None:
    from lowbit.bench import aggregate, run_grid, select_rows, write_results
    from lowbit.errors import ConfigError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row labels (default: none; see rows())")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", default=None, help='"ROW:SEED,ROW:SEED,..." run in this order (one process)')
    ap.add_argument("--table", action="store_true", help="summary of every finished run")
    ap.add_argument("--paired", default=None, metavar="ROW,BASE",
                    help="per seed ROW − BASE test accuracy (seeds both finished), mean ± standard error, "
                         "for each width: e.g. 'integer out r8 max,today'")
    ap.add_argument("--ft", action="store_true",
                    help=f"the fine-tune protocol: runs under {OUT_FT}, each row fine-tuned (2 epochs, lr 0.01) from "
                         "one FP32 ResNet-8 (24,000 images, 3 epochs, lr 0.1, seed 100; trained first if missing)")
    ap.add_argument("--recal", type=int, default=0, metavar="N",
                    help="test accuracy of every finished run's network after re-estimating its BatchNorm statistics on "
                         "N training batches (what train.bn_recalibrate: N does; the run's seed) -> recal_N.json; "
                         "with --paired, the paired differences of those accuracies")
    ap.add_argument("--residual-eval", action="store_true",
                    help="test accuracy of every finished integer run's best.pt: the integer model with "
                         "integer_residual accumulator and output (same weights), and the fake-quantized float "
                         "graph training sees")
    ap.add_argument("--paired-seeds", default=None, metavar="A-B",
                    help="with --paired: only seeds A..B (default 0-9); e.g. 5-14, the declared sample of session 33")
    ap.add_argument("--one-config", default=None, metavar="ROW:SEED",
                    help="a row that starts from a warm-up (e.g. 'W4A4 integer warm1:5') trained again as ONE config "
                         "with train.float_warmup_epochs: 1 (lowbit.schedules.warmup), into seeds/one_config/; prints "
                         "its test accuracy and loss beside the chained runs' (the row must be finished)")
    args = ap.parse_args()
    paired_seeds = None
    if args.paired_seeds:
        try:
            lo, hi = (int(v) for v in args.paired_seeds.split("-"))
        except ValueError:
            ap.error(f"--paired-seeds must look like A-B, got {args.paired_seeds!r}")
        if hi < lo:  # an empty range would print a table with no rows
            ap.error(f"--paired-seeds A-B needs A <= B, got {args.paired_seeds!r}")
        paired_seeds = list(range(lo, hi + 1))
    global OUT
    base = BASE
    if args.ft:
        OUT, base = OUT_FT, BASE_FT
    all_rows = rows(base["train"]["epochs"])
    seeds = [int(s) for s in args.seeds.split(",")]
    try:  # an unknown row is one line naming the rows (a KeyError traceback before session 29)
        sel = select_rows(all_rows, [k.strip() for k in args.rows.split(",")]) if args.rows else []
        jobs = [(label.strip(), int(seed)) for label, seed in (j.rsplit(":", 1) for j in args.jobs.split(","))] \
            if args.jobs else []
        select_rows(all_rows, [label for label, _ in jobs])
    except ConfigError as e:  # before ValueError: ConfigError is one (an unknown row read as a malformed --jobs)
        ap.error(str(e))
    except ValueError:
        ap.error(f"--jobs must look like ROW:SEED,ROW:SEED, got {args.jobs!r}")
    if args.ft and (sel or jobs):  # the FP32 start, once
        run_grid({PRETRAIN_LABEL: PRETRAIN}, BASE, [PRETRAIN_SEED], OUT, workers=1)
    def train(label: str, seed: int) -> None:
        warm = WARM_OF.get(label)
        if warm is not None:  # the seed's warm-up run first (skipped when finished)
            run_grid({warm: all_rows[warm]}, base, [seed], OUT, workers=1)
        run_grid({label: for_seed(all_rows[label], seed)}, base, [seed], OUT, workers=1)

    for label in sel:
        for seed in seeds:
            train(label, seed)
    for label, seed in jobs:
        train(label, seed)
    if args.one_config:
        label, _, seed = args.one_config.rpartition(":")
        if not seed.isdigit():
            ap.error(f"--one-config must look like ROW:SEED, got {args.one_config!r}")
        if label not in WARM_OF or WARM_OF[label] != WARM_FP32:
            ap.error(f"--one-config: {label!r} is not a row that starts from the FP32 warm-up ({WARM_FP32!r})")
        print(one_config(all_rows[label], label, int(seed), base))
    if args.residual_eval:
        residual_eval()
    if args.recal:
        recal_eval(args.recal)
    if args.paired:
        print(paired(*[s.strip() for s in args.paired.split(",")], recal=args.recal, seeds=paired_seeds))
    if args.table:
        done = {k: v for k, v in all_rows.items() if any((OUT / k.replace(" ", "_")).glob("seed*/summary.json"))}
        have = sorted({int(p.name[4:]) for k in done for p in (OUT / k.replace(" ", "_")).glob("seed*")
                       if (p / "summary.json").is_file()})
        recs = []
        for k, v in done.items():
            for s in have:
                if (OUT / k.replace(" ", "_") / f"seed{s}" / "summary.json").is_file():
                    recs += run_grid({k: for_seed(v, s)}, base, [s], OUT, workers=1)
        print(write_results(OUT, recs, aggregate(recs), meta={"note": "integer_seeds.py"}))


def one_config(row: dict, label: str, seed: int, base: dict) -> str:
    """``row`` (chained to the FP32 warm-up by model.init_from) as one config with train.float_warmup_epochs: 1,
    trained into OUT/one_config/<row>/seed<k>: a JSON line with both runs' test accuracy and loss."""
    import json

    from lowbit.bench import run_grid

    chained = json.loads((OUT / slug(label) / f"seed{seed}" / "summary.json").read_text())
    ov = {"plan": row["plan"], "train": {"float_warmup_epochs": 1}}  # the base's 3 epochs and lr, in one run
    run_grid({label: ov}, base, [seed], OUT / "one_config", workers=1)
    one = json.loads((OUT / "one_config" / slug(label) / f"seed{seed}" / "summary.json").read_text())
    return json.dumps({"row": label, "seed": seed, "one_config": [one["test_acc"], one["test_loss"]],
                       "chained": [chained["test_acc"], chained["test_loss"]],
                       "equal": (one["test_acc"], one["test_loss"]) == (chained["test_acc"], chained["test_loss"])})


def paired(row: str, base: str, recal: int = 0, seeds: list[int] | None = None) -> str:
    """Markdown: per width, ROW − BASE test accuracy per seed where both finished, mean ± SE and the
    one-sided 95 % lower bound of the mean (``recal``: the accuracies after re-estimating BatchNorm
    statistics on that many batches, ``recal_N.json``; ``seeds``: only these, default 0-9)."""
    import json

    from lowbit.bench.report import format_bound, lower_bound, mean_se

    re = json.loads((OUT / f"recal_{recal}.json").read_text()) if recal else {}

    def acc(run: str) -> float | None:
        if recal:
            return re[run]["recal"] if run in re else None
        p = OUT / run / "summary.json"
        return json.loads(p.read_text())["test_acc"] if p.is_file() else None

    what = f" after BN re-estimation on {recal} batches" if recal else ""
    lines = [f"| bits | {row} − {base} per seed{what} | mean ± standard error | one-sided 95 % lower bound |",
             "|---|---|---|---|"]
    for b in (2, 4, 8):
        d = []
        for k in (range(10) if seeds is None else seeds):
            a, c = (acc(f"W{b}A{b} {r}".replace(" ", "_") + f"/seed{k}") for r in (row, base))
            if a is not None and c is not None:
                d.append((k, 100 * a - 100 * c))
        if d:
            xs = [x for _, x in d]
            m, se = mean_se(xs)
            lines.append(f"| W{b}A{b} | " + " / ".join(f"{x:+.2f} (s{k})" for k, x in d)
                         + f" | **{m:+.2f} ± {se:.2f}** | {format_bound(lower_bound(xs))} |")
    return "\n".join(lines)


def recal_eval(batches: int) -> None:
    """Every finished run (with its best.pt): test accuracy as recorded, and after
    ``recalibrate_run_bn`` on ``batches`` training batches -> ``OUT/recal_<batches>.json`` (runs
    already in it are kept)."""
    import json

    from lowbit.data import BatchLoader
    from lowbit.fit import evaluate
    from lowbit.train import load_run, recalibrate_run_bn

    path = OUT / f"recal_{batches}.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    for d in sorted(OUT.glob("W*/seed*")):
        key = f"{d.parent.name}/{d.name}"
        if key in out or not (d / "best.pt").is_file() or not (d / "summary.json").is_file():
            continue
        cfg, data, m, _ = load_run(d)
        recalibrate_run_bn(m, cfg, data, batches)
        acc = evaluate(m, BatchLoader(data.test, data.info, 500))["acc"]
        out[key] = {"test_acc": json.loads((d / "summary.json").read_text())["test_acc"], "recal": acc}
        print(key, out[key], flush=True)
        path.write_text(json.dumps(out, indent=1, sort_keys=True))


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
