"""Seed 004 on Fashion-MNIST: NCE vs the original widths vs WRPN uniform widening vs random widths.

Per bit width (W2A2, W3A3: SAWB weights, PACT activations, first conv / last linear FP32) and seed:

* NCE: ``search_nce`` (warm-up + search epochs on the two halves of the training split, FLOPs target =
  the original network's MACs, or ``--target-ratio`` times them), then the derived widths trained from scratch;
* original: the zoo widths (width 1);
* WRPN uniform: the widest ``model.width`` (1/16 grid) whose MACs do not exceed the NCE network's;
* random: per-layer widths drawn from NCE's full candidate set (0.3 .. cap) within 5 % under the NCE
  network's MACs (``--random`` draws per seed).

Every training is ``lowbit.run`` on the same data slice (002 protocol: test accuracy at the
best-validation epoch). Rows with ``--thresholds`` other than the main one are the T sweep (NCE
only). Search time is reported as a multiple of the NCE network's training run, both measured in
the same process.

    python benchmarks/nce_table.py --bits 2 --seeds 0 1 2 --out benchmarks/results/nce
    python benchmarks/nce_table.py --bits 2 --seeds 0 --thresholds 0.15 0.2 0.25 --nce-only --out benchmarks/results/nce
    python benchmarks/nce_table.py --bits 2 --seeds 0 1 2 --target-ratio 0.75 --out benchmarks/results/nce/target075
    python benchmarks/nce_table.py --table --out benchmarks/results/nce      # tables only

Finished runs are skipped (their summary.json / search.json are read back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lowbit.config import load_config
from lowbit.data import load_dataset
from lowbit.search.nce import (NCEOptions, derived_config, original_cost, random_channels, search_nce,
                               uniform_width_for)
from lowbit.train import run


def base_config(args, bits: int, seed: int):
    return load_config(None, [
        f"model.name={args.model}", "data.name=fashion-mnist", f"data.limit={args.limit}",
        f"plan.weight={{name: sawb, bits: {bits}}}", f"plan.act={{name: pact, bits: {bits}, init: 6.0}}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.lr=0.1", "train.progress=false",
        f"train.seed={seed}", f"name=W{bits}A{bits}-s{seed}",
    ])


def train(cfg, run_dir: Path, data) -> tuple[dict, float]:
    if (run_dir / "summary.json").is_file():
        from lowbit.runfolder import check_same_config

        # a finished run of other arguments (--epochs, --limit, ...) is refused: it was read back as this call's
        check_same_config(run_dir, cfg.to_dict())
        s = json.loads((run_dir / "summary.json").read_text())
        return s, s.get("_train_seconds", float("nan"))
    if run_dir.exists():  # a killed run: start it again
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    r = run(cfg, run_dir, data=data)
    sec = time.perf_counter() - t0
    s = dict(r.summary, _train_seconds=sec)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    return s, sec


def record(out: Path, row: dict) -> None:
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("row", "bits", "seed", "test_acc", "macs", "params")}), flush=True)


def done_rows(out: Path) -> set[tuple]:
    p = out / "results.jsonl"
    if not p.is_file():
        return set()
    return {(r["row"], r["bits"], r["seed"], r.get("draw", 0)) for r in map(json.loads, p.read_text().splitlines()) if r}


def row_of(name: str, bits: int, seed: int, s: dict, **extra) -> dict:
    return {"row": name, "bits": bits, "seed": seed, "test_acc": s["test_acc"], "best_epoch": s["best_epoch"],
            "macs": s["macs"], "params": s["params"], "mem_bits": s["mem_002_bits"], **extra}


def run_seed(args, bits: int, seed: int, data, out: Path) -> None:
    cfg = base_config(args, bits, seed)
    have = done_rows(out)
    tag = f"W{bits}A{bits}"
    main_t = args.thresholds[0]
    nce_macs = None
    target = args.target_ratio * original_cost(cfg, data)["macs"] if args.target_ratio else None
    for T in args.thresholds:
        name = f"NCE T={T:g}"
        sdir = out / "searches" / f"{tag}-T{T:g}-s{seed}"
        opts = NCEOptions(warmup_epochs=args.warmup, epochs=args.search_epochs, threshold=T, target="macs",
                          target_value=target, cap=args.cap, arch_lr=args.arch_lr)
        if (sdir / "search.json").is_file():
            sj = json.loads((sdir / "search.json").read_text())
            channels, search_s = sj["channels"], sj["search_seconds"]
            extra = {"expansions": len(sj["expansions"]), "fit_steps": sj["fit_steps"], "widths": sj["widths"],
                     "base": sj["base"]}
        else:
            torch.manual_seed(seed)
            res = search_nce(cfg, opts, sdir, data=data, progress=False)
            channels, search_s = res.channels, res.search_seconds
            extra = {"expansions": len(res.expansions), "fit_steps": res.fit_steps, "widths": res.widths,
                     "base": res.base}
        s, sec = train(derived_config(cfg, channels=channels, name=f"{tag}-nce-T{T:g}-s{seed}"),
                       out / "runs" / f"{tag}-nce-T{T:g}-s{seed}", data)
        if T == main_t:
            nce_macs = s["macs"]
        if (name, bits, seed, 0) not in have:
            record(out, row_of(name, bits, seed, s, search_seconds=search_s, train_seconds=sec,
                               search_over_train=search_s / sec, channels=channels, **extra))
    if args.nce_only:
        return
    s, sec = train(cfg, out / "runs" / f"{tag}-orig-s{seed}", data)
    if ("original", bits, seed, 0) not in have:
        record(out, row_of("original", bits, seed, s, train_seconds=sec))
    width, _ = uniform_width_for(cfg, data, "macs", nce_macs)
    s, sec = train(derived_config(cfg, width=width, name=f"{tag}-uniform-s{seed}"),
                   out / "runs" / f"{tag}-uniform-s{seed}", data)
    if ("WRPN uniform", bits, seed, 0) not in have:
        record(out, row_of("WRPN uniform", bits, seed, s, width=width, train_seconds=sec))
    opts = NCEOptions(cap=args.cap)
    for r in range(args.random):
        channels, _ = random_channels(cfg, data, opts, "macs", nce_macs, seed=1000 * seed + r)
        s, sec = train(derived_config(cfg, channels=channels, name=f"{tag}-random{r}-s{seed}"),
                       out / "runs" / f"{tag}-random{r}-s{seed}", data)
        if ("random", bits, seed, r) not in have:
            record(out, row_of("random", bits, seed, s, draw=r, channels=channels, train_seconds=sec))


def table(out: Path) -> str:
    p = out / "results.jsonl"
    rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bits"], r["row"]), []).append(r)
    orig = {(r["bits"], r["seed"]): 100 * r["test_acc"] for r in rows if r["row"] == "original"}
    order = {"original": 0, "WRPN uniform": 2, "random": 3}  # NCE rows: 1
    lines = ["| bits | row | n | test acc % (mean ± std) | per seed | − original, same seed (points) | MACs (M) "
             "| params (k) | Mem 002 (KiB) | search / train | expansions | step-downs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (bits, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 1), kv[0][1])):
        rs = sorted(rs, key=lambda r: (r["seed"], r.get("draw", 0)))
        accs = [100 * r["test_acc"] for r in rs]
        acc = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
        per_seed = " / ".join(f"{a:.2f}" for a in accs)
        diffs = [a - orig[(bits, r["seed"])] for a, r in zip(accs, rs) if (bits, r["seed"]) in orig]
        delta = (f"{statistics.mean(diffs):+.2f} ({' / '.join(f'{d:+.2f}' for d in diffs)})"
                 if diffs and name != "original" else "")
        ratio = [r["search_over_train"] for r in rs if "search_over_train" in r]
        nce = lambda k: "/".join(str(r[k]) for r in rs) if k in rs[0] else ""  # noqa: E731  per seed
        lines.append(f"| W{bits}A{bits} | {name} | {len(rs)} | {acc} | {per_seed} | {delta} | "
                     f"{statistics.mean(r['macs'] for r in rs) / 1e6:.3f} | "
                     f"{statistics.mean(r['params'] for r in rs) / 1e3:.1f} | "
                     f"{statistics.mean(r['mem_bits'] for r in rs) / 8 / 1024:.1f} | "
                     f"{f'{statistics.mean(ratio):.2f}x' if ratio else ''} | {nce('expansions')} | {nce('fit_steps')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of every network")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--search-epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cap", type=float, default=1.5)
    ap.add_argument("--arch-lr", type=float, default=0.1)
    ap.add_argument("--bits", type=int, nargs="+", default=[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3], help="the first is the main one")
    ap.add_argument("--random", type=int, default=1, help="random-width draws per seed")
    ap.add_argument("--target-ratio", type=float, help="FLOPs target = RATIO x the original's (default 1)")
    ap.add_argument("--nce-only", action="store_true", help="only NCE rows (the T sweep)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only rewrite the table from results.jsonl")
    ap.add_argument("--out", default="benchmarks/results/nce")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for seed in args.seeds:
            data = load_dataset("fashion-mnist", limit=args.limit, seed=seed)
            for bits in args.bits:
                run_seed(args, bits, seed, data, out)
                (out / "table.md").write_text(table(out) + "\n")
    t = table(out)
    (out / "table.md").write_text(t + "\n")
    print(t)


if __name__ == "__main__":
    main()
