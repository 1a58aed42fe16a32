"""Peer benchmark: lowbit vs Brevitas, side by side, at W2A2 and W4A4 (issue 4).

The same network (lowbit's CIFAR ResNet, first conv and last linear in FP32 on both sides), the
same weights at initialisation, the same data (Fashion-MNIST, 5% validation split, lowbit's
BatchLoader with the same seed and augmentation), the same recipe (SGD 0.1, momentum 0.9, weight
decay 5e-4 on every parameter, cosine per batch, batch 128) and ONE training loop
(:func:`train_and_test`) for every row; only the quantized layers differ:

* lowbit:   ``quantize(model, {weight: lsq b, act: lsq b})``: LSQ weights (signed, per tensor) and
  LSQ inputs (unsigned) on every inner conv;
* Brevitas: every inner ``nn.Conv2d`` replaced by ``brevitas.nn.QuantConv2d`` with a learned
  per-tensor weight scale (:class:`LearnedScaleWeight`) and a learned unsigned input quantizer
  (``Uint8ActPerTensorFloat``), both at b bits, weights copied from the lowbit model's init.

docs/peer.md says why these quantizers are comparable and where they still differ. An FP32 row in
the same loop gives each toolkit's epoch-time overhead. Reported per row: test accuracy at the
best-validation epoch (seed 002's protocol), the median training-epoch time (training steps only;
evaluation is not timed) and the ratio lowbit / Brevitas. Run with the peer environment::

    bash scripts/peer_env.sh
    OMP_NUM_THREADS=2 .venv-peer/bin/python benchmarks/peer_brevitas.py --model resnet8 --epochs 3 \\
        --seeds 0 --threads 2 --out benchmarks/results/peer

Each (row, seed) is written to OUT/runs/<row>_seed<k>.json when it finishes and is skipped on a
re-run with the same settings, so a killed benchmark resumes. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import TrainConfig
from lowbit.data import BatchLoader, DataSplits, load_dataset
from lowbit.errors import ConfigError, TrainingDiverged
from lowbit.models import create_model
from lowbit.plan import Plan
from lowbit.quantize import quant_state, quantize
from lowbit.train import build_optimizer, build_scheduler, distinct_weight_values, evaluate

#: the recipe shared by every row (lowbit's defaults; benchmarks/qat_core.py uses the same)
RECIPE = {"batch_size": 128, "eval_batch_size": 500, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
          "weight_decay": 5e-4, "schedule": "cosine"}
VAL_FRACTION = 0.05  # seed 002's protocol: best epoch chosen on a held-out 5% of the training set


# ---------------------------------------------------------------------------------------------
# the two quantized models (and FP32), from one initialisation
# ---------------------------------------------------------------------------------------------
def lowbit_plan(bits: int) -> dict:
    """LSQ weights (signed, per tensor) and LSQ unsigned inputs at ``bits``; first/last layer FP32."""
    return {"weight": {"name": "lsq", "bits": bits}, "act": {"name": "lsq", "bits": bits},
            "keep_first": True, "keep_last": True, "method": {"name": "ste"}}


def fp_model(name: str, data: DataSplits, seed: int) -> nn.Module:
    """The FP32 network exactly as ``lowbit.train.build_model`` draws it (seeded, then built)."""
    torch.manual_seed(seed)
    info = data.info
    return create_model(name, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size)


def lowbit_model(name: str, data: DataSplits, seed: int, bits: int) -> nn.Module:
    return quantize(fp_model(name, data, seed), lowbit_plan(bits))


def _brevitas_quantizers():
    """Brevitas quantizer classes (imported late: lowbit's own tests never need Brevitas).

    Both quantize ``q = clamp(round(x/s), n_min, n_max)·s`` with a straight-through round, like
    LSQ (Esser et al. 2020, eq. 1-3), and learn the threshold ``t`` (``s = t / int_scale``) by
    plain autograd (LSQ's 1/sqrt(N·Qp) gradient scale has no Brevitas counterpart).

    Weights: ``Int8WeightPerTensorFloat`` (signed, zero point 0, FP32 per-tensor scale) with two
    overrides that make it LSQ's learned-step quantizer:
      * ``scaling_impl_type = parameter_from_stats``: ``t`` is an ``nn.Parameter`` initialised to
        max|w| on the first forward (``ParameterFromStatsFromParameterScaling``), s = t/2^(b-1).
        The preset's own ``stats`` scaling recomputes s = max|w|/(2^(b-1)-1) at every step and
        has no scale parameter;
      * ``narrow_range = False``: integers -2^(b-1) .. 2^(b-1)-1, LSQ's range (the preset's narrow
        range gives 3 levels at 2 bits: ternary).
    Inputs: ``Uint8ActPerTensorFloat`` as shipped: integers 0 .. 2^b-1, s = t/(2^b-1); for the
    first ``collect_stats_steps`` = 300 training steps t is an EMA (momentum 0.1) of the
    99.999th percentile of |x|, then a learned parameter starting from it.
    The bit width of both is set per layer (``weight_bit_width``, ``input_bit_width``).
    """
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    class LearnedScaleWeight(Int8WeightPerTensorFloat):
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
        narrow_range = False

    return LearnedScaleWeight, Uint8ActPerTensorFloat


def brevitas_model(name: str, data: DataSplits, seed: int, bits: int) -> nn.Module:
    """The same FP32 network with the layers lowbit's plan quantizes swapped for QuantConv2d.

    The layer set comes from lowbit's own ``Plan.resolve`` (so both sides quantize the same
    layers) and each new layer gets the original layer's initial weight.
    """
    from brevitas.nn import QuantConv2d

    weight_quant, act_quant = _brevitas_quantizers()
    model = fp_model(name, data, seed)
    for lp in Plan.from_dict(lowbit_plan(bits)).resolve(model):
        if lp.weight is None:
            continue
        conv = lp.module
        if type(conv) is not nn.Conv2d:
            raise ConfigError(f"--model {name}: layer {lp.name} is {type(conv).__name__}; "
                              "this benchmark swaps Conv2d layers only (use a ResNet)")
        q = QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode,
                        weight_quant=weight_quant, weight_bit_width=bits,
                        input_quant=act_quant, input_bit_width=bits)
        with torch.no_grad():
            q.weight.copy_(conv.weight)  # before the first forward: the scale is initialised from it
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        parent, _, child = lp.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def brevitas_distinct_weight_values(model: nn.Module) -> dict[str, int]:
    """Distinct values of each QuantConv2d's quantized weight (a check that it is b-bit)."""
    from brevitas.nn import QuantConv2d

    with torch.no_grad():
        return {n: int(torch.unique(m.quant_weight().value).numel())
                for n, m in model.named_modules() if isinstance(m, QuantConv2d)}


# ---------------------------------------------------------------------------------------------
# the one loop every row trains in
# ---------------------------------------------------------------------------------------------
def train_and_test(model: nn.Module, data: DataSplits, t: TrainConfig) -> dict:
    """Train ``model`` with recipe ``t``; test accuracy at the best-validation epoch.

    The step is lowbit.train.run's (forward, cross-entropy, backward, SGD step, per-batch cosine
    step, the same running loss/accuracy bookkeeping), with the same loaders and optimizer
    builders. Instead of reloading a best checkpoint, the test split is evaluated after every
    epoch and the value of the best-validation epoch (the first of ties, as in ``run``) is kept:
    the same number, without relying on Brevitas restoring its scale state from a state dict.
    """
    train_loader = BatchLoader(data.train, data.info, t.batch_size, shuffle=True, augment=True, seed=t.seed)
    val_loader = BatchLoader(data.val, data.info, t.eval_batch_size)
    test_loader = BatchLoader(data.test, data.info, t.eval_batch_size)
    steps = len(train_loader)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t, steps)
    history = []
    for epoch in range(t.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        tot_loss, correct, seen = 0.0, 0, 0
        for i, (x, y) in enumerate(train_loader):
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        epoch_time = time.perf_counter() - t0
        val, test = evaluate(model, val_loader), evaluate(model, test_loader)
        history.append({"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": correct / seen,
                        "val_acc": val["acc"], "test_acc": test["acc"], "epoch_time": epoch_time})
        print(f"   epoch {epoch + 1}/{t.epochs}  loss {tot_loss / seen:.4f}  val {val['acc']:.4f}  "
              f"test {test['acc']:.4f}  {epoch_time:.1f}s", flush=True)
    best = max(history, key=lambda h: -1.0 if math.isnan(h["val_acc"]) else h["val_acc"])
    return {"test_acc": best["test_acc"], "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
            "epoch_time": statistics.median(h["epoch_time"] for h in history),
            "steps_per_epoch": steps, "history": history}


# ---------------------------------------------------------------------------------------------
# rows, seeds, table
# ---------------------------------------------------------------------------------------------
def rows(bits_list: list[int]) -> list[tuple[str, str, int | None]]:
    """(label, toolkit, bits): FP32 first, then lowbit/Brevitas pairs per bit width."""
    out = [("FP32", "fp32", None)]
    for b in bits_list:
        out += [(f"lowbit W{b}A{b}", "lowbit", b), (f"Brevitas W{b}A{b}", "brevitas", b)]
    return out


def run_row(toolkit: str, bits: int | None, model_name: str, data: DataSplits, t: TrainConfig) -> dict:
    if toolkit == "fp32":
        model = fp_model(model_name, data, t.seed)
    elif toolkit == "lowbit":
        model = lowbit_model(model_name, data, t.seed, bits)
        assert quant_state(model).method.name == "ste"  # no method hooks to call: plain STE
    else:
        model = brevitas_model(model_name, data, t.seed, bits)
    try:
        rec = train_and_test(model, data, t)
    except TrainingDiverged as e:
        return {"diverged": str(e), "test_acc": float("nan"), "epoch_time": float("nan")}
    if toolkit == "lowbit":
        dv = distinct_weight_values(model)
    elif toolkit == "brevitas":
        dv = brevitas_distinct_weight_values(model)
    else:
        dv = {}
    rec["max_distinct_weight_values"] = max(dv.values()) if dv else None
    rec["quantized_layers"] = len(dv)
    return rec


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in values if not math.isnan(v)]
    if not vals:
        return "diverged"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def summarize(records: list[dict], bits_list: list[int]) -> list[dict]:
    """Per row: accuracies, epoch times, time / FP32 (same seed) and lowbit / Brevitas (same seed)."""
    by = {(r["row"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    out = []
    for label, toolkit, bits in rows(bits_list):
        rs = [by[(label, s)] for s in seeds]
        fp = [by[("FP32", s)]["epoch_time"] for s in seeds]
        row = {"row": label, "toolkit": toolkit, "bits": bits, "seeds": seeds,
               "test_acc": [r["test_acc"] for r in rs], "best_epoch": [r.get("best_epoch") for r in rs],
               "epoch_time": [r["epoch_time"] for r in rs],
               "time_vs_fp32": [r["epoch_time"] / f for r, f in zip(rs, fp)],
               "max_distinct_weight_values": max((r.get("max_distinct_weight_values") or 0) for r in rs) or None,
               "diverged": [r["diverged"] for r in rs if "diverged" in r]}
        if toolkit == "lowbit":
            peer = [by[(f"Brevitas W{bits}A{bits}", s)] for s in seeds]
            row["time_lowbit_over_brevitas"] = [r["epoch_time"] / p["epoch_time"] for r, p in zip(rs, peer)]
            row["acc_lowbit_minus_brevitas"] = [r["test_acc"] - p["test_acc"] for r, p in zip(rs, peer)]
        out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    head = ["row", "test acc %", "epoch time s", "time / FP32", "time lowbit / Brevitas",
            "acc lowbit − Brevitas (pp)", "distinct w values (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        lowbit = r["toolkit"] == "lowbit"
        lines.append("| " + " | ".join([
            r["row"], _fmt(r["test_acc"], 100), _fmt(r["epoch_time"], 1, 1), _fmt(r["time_vs_fp32"]),
            _fmt(r["time_lowbit_over_brevitas"]) if lowbit else "",
            _fmt(r["acc_lowbit_minus_brevitas"], 100) if lowbit else "",
            str(r["max_distinct_weight_values"] or ""),
        ]) + " |")
    return "\n".join(lines)


def warn_collect_phase(steps_per_epoch: int, epochs: int) -> None:
    """Warn when most epochs include Brevitas' statistics-collection phase: for its first
    ``collect_stats_steps`` steps an input scale is a running percentile (a kthvalue per layer and
    step), not learned, so the median epoch time and the accuracy would not be those of the
    learned quantizer."""
    _, act_quant = _brevitas_quantizers()
    collect = int(act_quant.collect_stats_steps)
    learned_epochs = epochs - math.ceil(collect / steps_per_epoch)  # epochs entirely after collection
    if learned_epochs <= epochs // 2:  # the median epoch time would include collection steps
        print(f"warning: Brevitas' input quantizers collect statistics for their first {collect} steps "
              f"= {collect / steps_per_epoch:.1f} of the {epochs} epochs ({steps_per_epoch} steps each); "
              f"use more data or epochs so that most timed epochs train learned scales", flush=True)


def versions() -> dict:
    import brevitas

    import lowbit

    return {"torch": torch.__version__, "brevitas": brevitas.__version__, "lowbit": lowbit.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def main() -> None:
    try:
        bench()
    except ConfigError as e:  # a bad option: one line, no traceback
        raise SystemExit(f"peer_brevitas: error: {e}") from None


def bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet8", help="a lowbit CIFAR ResNet (resnet8, resnet20, ...)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="cap the training and test sets (quick checks)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="WbAb pairs to compare")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default="benchmarks/results/peer")
    args = ap.parse_args()
    if any(not 2 <= b <= 8 for b in args.bits):
        raise ConfigError(f"--bits: each must be 2..8 (LSQ's signed weights need 2), got {args.bits}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "epochs": args.epochs, "limit": args.limit, "threads": args.threads,
                "recipe": RECIPE, "val_fraction": VAL_FRACTION, "dataset": "fashion-mnist"}
    records = []
    for seed in args.seeds:
        data = load_dataset("fashion-mnist", val_fraction=VAL_FRACTION, seed=seed, limit=args.limit)
        t = TrainConfig(epochs=args.epochs, seed=seed, threads=args.threads, progress=False, **RECIPE)
        if seed == args.seeds[0]:  # before any training (the split sizes do not depend on the seed):
            for b in args.bits:  # a model or bits either side cannot take fails here, not after FP32
                lowbit_model(args.model, data, seed, b)
                brevitas_model(args.model, data, seed, b)
            warn_collect_phase(math.ceil(len(data.train) / t.batch_size), t.epochs)
        for label, toolkit, bits in rows(args.bits):
            path = out / "runs" / f"{label.replace(' ', '_')}_seed{seed}.json"
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get("settings") == settings:
                    print(f"== {label} (seed {seed}): done, reusing {path}", flush=True)
                    records.append(rec)
                    continue
            print(f"== {label} (seed {seed})", flush=True)
            rec = {"row": label, "toolkit": toolkit, "bits": bits, "seed": seed, "settings": settings,
                   **run_row(toolkit, bits, args.model, data, t)}
            path.write_text(json.dumps(rec, indent=1) + "\n")
            records.append(rec)
    summary = summarize(records, args.bits)
    table = markdown(summary)
    meta = {**settings, "seeds": args.seeds, "bits": args.bits, "versions": versions(),
            "brevitas_act_collect_stats_steps": int(_brevitas_quantizers()[1].collect_stats_steps)}
    note = (f"{args.model}, Fashion-MNIST{f' (limit {args.limit})' if args.limit else ''}, {args.epochs} epochs, "
            f"seeds {' '.join(map(str, args.seeds))}, {torch.get_num_threads()} threads; torch "
            f"{meta['versions']['torch']}, Brevitas {meta['versions']['brevitas']}. Test accuracy at the "
            f"best-validation epoch; epoch time = median training-epoch time; ratios per seed, then averaged.")
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n\n" + note + "\n")
    print(table)
    print()
    print(note)


if __name__ == "__main__":
    main()
