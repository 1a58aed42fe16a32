"""ReLeQ vs sensitivity vs random vs uniform (seed 001), at equal evaluations and equal budget.

For each seed and each budget setting it runs ``lowbit search releq`` (the search and the three
baselines through one cached evaluator), then fine-tunes every method's pick with ``lowbit.run``
(``plans/METHOD.yaml``: train.epochs = releq.final_epochs from the FP32 start) and reads its test
accuracy at the best validation epoch. FP32 reference: the search's FP32 start on the test split.
Writes ``OUT/results.jsonl`` (one row per seed x setting x method) and ``OUT/README.md`` (mean ± std
over seeds). Resumable: settings already in ``OUT/results.jsonl`` and finished searches and runs are skipped.

    PYTHONPATH=src python benchmarks/releq_table.py configs/search/releq_digits.yaml --seeds 0 1 2 \\
        --budgets none memory:0.6 --out benchmarks/results/releq/digits
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lowbit import load_config
from lowbit.data import BatchLoader
from lowbit.fit import evaluate
from lowbit.plan import Plan
from lowbit.search.releq import format_result, load_search_config, search
from lowbit.train import build_model, load_data, run


def fp32_test(cfg_path: Path) -> float:
    cfg = load_config(cfg_path)
    cfg = cfg.model_copy(update={"plan": Plan()}, deep=True)
    data = load_data(cfg)
    model = build_model(cfg, data)
    return evaluate(model, BatchLoader(data.test, data.info, cfg.train.eval_batch_size))["acc"]


def one(config: str, seed: int, budget: str, out: Path, overrides: list[str]) -> list[dict]:
    ov = [f"train.seed={seed}", f"releq.seed={seed}", *overrides]
    if budget != "none":
        metric, frac = budget.split(":")
        ov += [f"releq.budget={{metric: {metric}, fraction: {frac}}}"]
    folder = out / budget.replace(":", "_") / f"seed{seed}"
    same = out / "none" / f"seed{seed}"  # same FP32 start and evaluations: reuse them (a cache hit is free;
    folder.mkdir(parents=True, exist_ok=True)  # the evaluation counts and eval seconds are per method anyway)
    for f in ("fp32.pt", "cache.jsonl"):
        if budget != "none" and (same / f).is_file() and not (folder / f).is_file():
            shutil.copy(same / f, folder / f)
    if (folder / "result.json").is_file():
        res = json.loads((folder / "result.json").read_text())
    else:
        cfg, opts = load_search_config(config, ov)
        opts = opts.model_copy(update={"progress": False})
        res = search(cfg, opts, folder, resume=(folder / "state.json").is_file())
    print(format_result(res), flush=True)
    fp_test = None
    rows = []
    for name, m in res["methods"].items():
        run_dir = folder / "runs" / name
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            cfg = load_config(m["plan"], ["train.progress=false"])
            if (run_dir / "last.pt").is_file():
                run(cfg, run_dir, resume=True)
            else:
                run(cfg, run_dir)
        s = json.loads(summary_path.read_text())
        if fp_test is None:
            fp_test = fp32_test(Path(m["plan"]))
        rows.append({"seed": seed, "budget": budget, "method": name, "bits": m["bits"], "avg_bits": m["avg_bits"],
                     "weighted_bits": m["weighted_bits"], "evaluations": m["evaluations"],
                     "eval_seconds": m["eval_seconds"], "search_val_acc": m["val_acc"], "reward": m["reward"],
                     "final_test_acc": s["test_acc"], "final_val_acc": s["best_val_acc"], "fp32_test_acc": fp_test,
                     "loss_pt": 100 * (fp_test - s["test_acc"]), "mem_bits": m["costs"]["memory"],
                     "size_bits": m["costs"]["size"], "releq_seconds": res["releq_seconds"],
                     "episodes": res["episodes"], "fp32_val_acc": res["acc_fp32_val"]})
    return rows


def table(rows: list[dict]) -> str:
    def ms(v, fmt="{:.2f}"):
        v = np.asarray(v, dtype=float)
        return (fmt.format(v.mean()) + (" ± " + fmt.format(v.std(ddof=1)) if len(v) > 1 else "")) if len(v) else "-"

    lines = ["| budget | method | seeds | evals | eval s | avg bits | weighted bits | reward | search val acc % | "
             "final test acc % | loss vs FP32 (pt) | runs with loss <= 0.5 pt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["budget"] == budget):
            rs = [r for r in rows if r["budget"] == budget and r["method"] == method]
            ok = sum(r["loss_pt"] <= 0.5 for r in rs)
            lines.append(f"| {budget} | {method} | {len(rs)} | {ms([r['evaluations'] for r in rs], '{:.0f}')} | "
                         f"{ms([r['eval_seconds'] for r in rs], '{:.0f}')} | {ms([r['avg_bits'] for r in rs])} | "
                         f"{ms([r['weighted_bits'] for r in rs])} | {ms([r['reward'] for r in rs], '{:.3f}')} | "
                         f"{ms([100 * r['search_val_acc'] for r in rs])} | "
                         f"{ms([100 * r['final_test_acc'] for r in rs])} | {ms([r['loss_pt'] for r in rs])} | "
                         f"{ok}/{len(rs)} |")
    fp = {r["seed"]: r["fp32_test_acc"] for r in rows}
    lines.append("")
    lines.append(f"FP32 test accuracy (the start of every search): {ms([100 * v for v in fp.values()])} % over seeds "
                 f"{sorted(fp)}; ReLeQ search wall time {ms([r['releq_seconds'] for r in rows if r['method'] == 'releq'], '{:.0f}')} s.")
    return "\n".join(lines)


def wall(rows: list[dict], done: list[dict], seconds: float) -> str:
    new = len([r for r in rows if r not in done])
    if not new:
        return "Every setting read back from results.jsonl (the wall time of the runs is in docs/releq.md)."
    return (f"Wall time of this call so far: {seconds:.0f} s (one CPU thread); settings finished by an earlier "
            "call are read back from results.jsonl.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budgets", nargs="+", default=["none"], help="none or METRIC:FRACTION (e.g. memory:0.6)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = []  # rows of settings finished by an earlier call (their FP32 checkpoints need not exist any more)
    if (out / "results.jsonl").is_file():
        done = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    asked = {(seed, budget) for seed in args.seeds for budget in args.budgets}
    # the rows of settings this call does not run stay in results.jsonl (before, a call with --seeds 1 deleted seed 0's)
    kept = [r for r in done if (r["seed"], r["budget"]) not in asked]
    rows = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for budget in args.budgets:
            earlier = [r for r in done if r["seed"] == seed and r["budget"] == budget]
            rows += earlier or one(args.config, seed, budget, out, args.overrides)
            with open(out / "results.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept + rows)
            cmd = "PYTHONPATH=src python " + " ".join(["benchmarks/releq_table.py", *sys.argv[1:]] if argv is None else argv)
            (out / "README.md").write_text(
                f"# ReLeQ vs baselines ({args.config})\n\nCommand: `{cmd}`\n\n" + table(rows) +
                f"\n\n{wall(rows, done, time.perf_counter() - t0)}\n")
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
