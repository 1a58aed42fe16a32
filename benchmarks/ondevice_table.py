"""On-device training results (docs/ondevice.md): NITI vs FP32 backprop, local loss vs backprop at W3A3,
and the training-memory table.

    python benchmarks/ondevice_table.py niti  --seeds 0 1 2     # FP32 backprop / NITI int8 / NITI 4-bit weights
    python benchmarks/ondevice_table.py local --seeds 0 1 2     # backprop W3A3 / local loss W3A3 (all blocks, greedy)
    python benchmarks/ondevice_table.py niti_resnet8 --seeds 0 1 2 --set data.limit=3000 train.epochs=4
                                                                # FP32 backprop / NITI int8, BN-free ResNet-8
    python benchmarks/ondevice_table.py memory                  # measured peak memory of one step vs the cost model
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
            lines.append(f"| {part} | {row} | {_mean_std(err)} | {_mean_std(ierr)} | {len(rs)}"
                         f"{' (PARTIAL)' if 0 < len(rs) < 3 else ''} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "memory", "table"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="*", default=None)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value for every run")
    ap.add_argument("--tag", default="", help="suffix of the row names for runs with other settings (e.g. long)")
    a = ap.parse_args()
    if a.part == "memory":
        from lowbit.ondevice.memory import memory_table, table_002

        (OUT / "table_002.json").write_text(json.dumps(table_002(), indent=1))
        memory_table(OUT)
    elif a.part == "table":
        t = table()
        (OUT / "accuracy.md").write_text(t + "\n")
        print(t)
    else:
        run_rows(a.part, a.seeds, a.rows, a.set, a.tag)


if __name__ == "__main__":
    main()
