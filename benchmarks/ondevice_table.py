"""On-device training results (docs/ondevice.md): NITI vs FP32 backprop, local loss vs backprop at W3A3,
and the training-memory table.

    python benchmarks/ondevice_table.py niti  --seeds 0 1 2     # FP32 backprop / NITI int8 / NITI 4-bit weights
    python benchmarks/ondevice_table.py local --seeds 0 1 2     # backprop W3A3 / local loss W3A3 (all blocks, greedy)
    python benchmarks/ondevice_table.py niti_resnet8 --seeds 0 1 2 --set data.limit=3000 train.epochs=4
                                                                # FP32 backprop / NITI int8, BN-free ResNet-8
    python benchmarks/ondevice_table.py memory                  # measured peak memory of one step vs the cost model
    python benchmarks/ondevice_table.py memory_model            # that table's cost-model column again (measured kept)
    python benchmarks/ondevice_table.py table                   # README.md from what finished

Each run is a `lowbit.run` folder under benchmarks/results/ondevice/train/<row>-s<seed>/ (skipped when its
summary.json exists, so a killed sweep resumes); protocol 002: test accuracy at the best-validation epoch
(5% of the training slice held out).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "results" / "ondevice"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _niti_rows() -> dict[str, dict]:
    base = yaml.safe_load((CONFIGS / "niti_lenet5.yaml").read_text())
    fp = copy.deepcopy(base)
    fp["plan"] = {"weight": "fp", "act": "fp"}
    fp["train"].update(lr=0.05)
    w4 = copy.deepcopy(base)
    w4["plan"]["weight"]["bits"] = 4
    return {"fp32_backprop": fp, "niti_int8": base, "niti_w4": w4}


def _local_rows() -> dict[str, dict]:
    base = yaml.safe_load((CONFIGS / "local_w3a3.yaml").read_text())
    bp = copy.deepcopy(base)
    bp["plan"]["method"] = {"name": "ste"}
    greedy = copy.deepcopy(base)
    greedy["plan"]["method"]["greedy"] = True
    return {"backprop_w3a3": bp, "local_w3a3": base, "local_greedy_w3a3": greedy}


def _niti_resnet8_rows() -> dict[str, dict]:
    """The NITI rows on a BN-free, bias-free ResNet-8 (same hyper-parameters as the LeNet-5 rows)."""
    rows = {}
    for row, cfg in _niti_rows().items():
        if row == "niti_w4":
            continue
        cfg["name"] = cfg["name"].replace("lenet5", "resnet8")
        cfg["model"] = {"name": "resnet8", "batch_norm": False, "bias": False}
        rows[row.replace("fp32_backprop", "fp32_backprop_resnet8").replace("niti_int8", "niti_int8_resnet8")] = cfg
    return rows


PARTS = {"niti": _niti_rows, "local": _local_rows, "niti_resnet8": _niti_resnet8_rows}


def run_rows(part: str, seeds: list[int], rows: list[str] | None, overrides: list[str], tag: str = "") -> None:
    tag = f"-{tag}" if tag else ""
    import torch

    from lowbit import load_config, run
    from lowbit.data import BatchLoader

    torch.set_num_threads(1)
    for seed in seeds:
        for row, cfg_dict in PARTS[part]().items():
            if rows and row not in rows:
                continue
            d = OUT / "train" / f"{row}{tag}-s{seed}"
            if (d / "summary.json").is_file():
                continue
            cfg_dict = copy.deepcopy(cfg_dict)
            cfg_dict["name"] = row
            cfg_dict["train"]["seed"] = seed
            inp = d.parent / f"{d.name}.input.yaml"  # run() trains only into a folder holding nothing else
            inp.parent.mkdir(parents=True, exist_ok=True)
            inp.write_text(yaml.safe_dump(cfg_dict))
            cfg = load_config(inp, overrides)
            t0 = time.perf_counter()
            run(cfg, d)
            inp.replace(d / "input.yaml")
            extra = {"wall_s": time.perf_counter() - t0, "part": part, "row": row + tag, "seed": seed,
                     "overrides": overrides}
            if cfg.plan.method.name == "niti":  # the integer network's own accuracy (what a device runs)
                from lowbit.methods.niti import integer_evaluate
                from lowbit.train import load_run

                _, data, model, _ = load_run(d)
                extra["integer_test_acc"] = integer_evaluate(model, BatchLoader(data.test, data.info, 500))["acc"]
            s = json.loads((d / "summary.json").read_text())
            (d / "ondevice.json").write_text(json.dumps({**extra, "test_acc": s["test_acc"]}, indent=1))
            print(row, seed, s["test_acc"], extra, flush=True)


def niti_stats(run_dir: Path, images: int = 500) -> dict:
    """What the integer network computes, at initialisation and after training (``last.pt``): per unit
    the output exponent and the share of zero / saturated int8 codes, per layer the share of weight
    codes at +-qmax, the integer error of the loss, and the predicted-class histogram (why a NITI
    run does or does not train)."""
    import torch

    from lowbit.data import BatchLoader
    from lowbit.methods import niti
    from lowbit.ondevice import intops
    from lowbit.config import load_config
    from lowbit.train import build_model, load_data

    torch.set_num_threads(1)
    cfg = load_config(run_dir / "config.yaml")
    data = load_data(cfg)
    x, y = next(iter(BatchLoader(data.test, data.info, images)))
    out = {}
    for when in ("init", "last"):
        model = build_model(cfg, data)
        if when == "last":
            model.load_state_dict(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["model"])
        h, tape, acts = intops.from_float(x), [], []
        for name, m in niti.program(model):
            h = niti._forward(m, h, tape)
            q = h.q.to(torch.int32)
            acts.append({"unit": name, "exp": h.e, "zero": float((q == 0).float().mean()),
                         "saturated": float((q.abs() >= 127).float().mean()), "mean_abs": float(q.abs().float().mean())})
        err = intops.ce_error(h, y, torch.Generator().manual_seed(0))
        weights = {n: {"at_qmax": float((mod.code.abs() >= mod.quantizer.qmax).float().mean()),
                       "zero": float((mod.code == 0).float().mean()), "exp": int(mod.exp)}
                   for n, mod in model.named_modules() if isinstance(mod, niti.IntegerWeight)}
        pred = h.q.argmax(1)
        out[when] = {"acc": float((pred == y).float().mean()),
                     "predicted_class_histogram": torch.bincount(pred, minlength=h.q.shape[1]).tolist(),
                     "logit_distinct_values_per_image": float(torch.tensor([len(set(r.tolist())) for r in h.q]).float().mean()),
                     "error_zero": float((err.q == 0).float().mean()), "activations": acts, "weights": weights}
    return out


def _mean_std(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def table() -> str:
    rows: dict[str, list[dict]] = {}
    for f in sorted((OUT / "train").glob("*/ondevice.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["row"], []).append(r)
    lines = ["| part | row | test error % (float twin) | test error % (integer inference) | runs | wall s / run |",
             "|---|---|---|---|---|---|"]
    for part, fn in PARTS.items():
        names = [r for base in fn() for r in sorted(rows) if r == base or r.startswith(base + "-")] or list(fn())
        for row in dict.fromkeys(names):
            rs = rows.get(row, [])
            err = [100 * (1 - r["test_acc"]) for r in rs]
            ierr = [100 * (1 - r["integer_test_acc"]) for r in rs if "integer_test_acc" in r]
            wall = statistics.mean(r["wall_s"] for r in rs) if rs else float("nan")
            # runs of one row trained with other --set overrides (without a --tag): said, not pooled silently
            sets = sorted({" ".join(r.get("overrides") or []) or "no --set" for r in rs})
            mixed = f" (MIXED settings: {' / '.join(sets)})" if len(sets) > 1 else ""
            lines.append(f"| {part} | {row} | {_mean_std(err)} | {_mean_std(ierr)} | {len(rs)}"
                         f"{' (PARTIAL)' if 0 < len(rs) < 3 else ''}{mixed} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "memory", "memory_model", "niti_stats", "table"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="*", default=None)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value for every run")
    ap.add_argument("--tag", default="", help="suffix of the row names for runs with other settings (e.g. long)")
    a = ap.parse_args()
    if a.part == "memory":
        from lowbit.ondevice.memory import memory_table, table_002

        (OUT / "table_002.json").write_text(json.dumps(table_002(), indent=1))
        memory_table(OUT)
    elif a.part == "memory_model":  # the cost model's column again, the measured peaks kept
        from lowbit.ondevice.memory import remodel_table

        remodel_table(OUT)
    elif a.part == "niti_stats":  # python benchmarks/ondevice_table.py niti_stats --rows niti_int8_resnet8-s0
        for r in a.rows:
            st = niti_stats(OUT / "train" / r)
            (OUT / f"niti_stats_{r}.json").write_text(json.dumps(st, indent=1))
            for when, v in st.items():
                print(r, when, {k: v[k] for k in ("acc", "predicted_class_histogram", "error_zero",
                                                 "logit_distinct_values_per_image")})
                for a_ in v["activations"]:
                    print("   ", a_)
                print("    weights at qmax:", {k: round(w["at_qmax"], 3) for k, w in v["weights"].items()})
    elif a.part == "table":
        t = table()
        (OUT / "accuracy.md").write_text(t + "\n")
        print(t)
    else:
        run_rows(a.part, a.seeds, a.rows, a.set, a.tag)


if __name__ == "__main__":
    main()
