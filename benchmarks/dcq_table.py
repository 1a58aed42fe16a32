"""DCQ (seed 001) vs plain STE at binary and ternary weights; FP32-start and KD for W2A2 LSQ.

Fashion-MNIST, ResNet-8, ``--limit`` training images (5% held out for validation), seed 002's
protocol (test accuracy at the best validation epoch; a DCQ run's candidates are the stitched
network and each fine-tune epoch), ``--seeds`` seeds, mean ± std and paired differences (same seed).
Every seed first trains its own FP32 teacher (row ``fp32``, ``--teacher-epochs``).

Rows (E = ``--epochs``, F = ``--finetune``; first conv and last linear FP32 everywhere):

* ``w1_ste``, ``w2_ste``: plain STE from scratch, DoReFa 1-bit weights (E|w|·sign w) / TWN ternary, E epochs;
* ``w1_ste_fp32start``, ``w2_ste_fp32start``: the same from the FP32 teacher's weights (lr ``--start-lr``);
* ``wN_dcq_sK``: DCQ with K = 2, 3 sections, E epochs per section, no fine-tune;
* ``wN_dcq_sK_ft``: DCQ with E - F epochs per section, then F end-to-end fine-tune epochs;
* ``w2a2_lsq_scratch``, ``w2a2_lsq_fp32start``, ``w2a2_lsq_fp32start_kd`` (Hinton KD, T 4, alpha 0.9): E epochs.

**Budget** (equal for every quantized row: E·N sample-passes, N training images). One sample-pass is
one training image through one training step (forward + backward) of the whole student network. A
DCQ section trains on every image for its epochs, but through its own layers only, so an epoch of
section i costs N·s_i sample-passes with s_i its share of the network's multiply-accumulates; the
sections together cost (epochs per section)·N, and the fine-tune F·N. The teacher's forward passes
that produce the section features (no backward; cacheable) are not counted in the budget but are
reported (``teacher_forward_sample_passes``), and so is every row's wall time; the teacher's own
training is shared by all teacher-started rows and not counted.

**Timing** (``--timing``): the same 2-section DCQ run (W1, seed 0) with its sections one after the
other (``dcq.workers: 1``, ``--threads`` threads), in parallel (``workers: 2``, half the threads
each), and one after the other with the on-disk feature cache (``dcq.feature_cache_mb: --cache-mb``);
wall time of the section phase. Run it alone on a quiet machine.

Splitting the work: start the script twice (same arguments); the two processes share the runs
through claim files (``RUN_DIR.claim``, with the owner's pid: a dead owner's claim is taken over),
a run whose teacher is not trained yet waits. Finished runs are skipped and killed ones resume, so a
rerun continues. Writes ``results.json`` and ``results.md`` into ``--out`` (each process writes them
when nothing is left to do).

    python benchmarks/dcq_table.py --limit 5000 --epochs 8 --seeds 0 1 2 --threads 1 &
    python benchmarks/dcq_table.py --limit 5000 --epochs 8 --seeds 0 1 2 --threads 1 &
    python benchmarks/dcq_table.py --limit 5000 --epochs 8 --timing --threads 2      # alone, at the end
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

W1 = {"weight": {"name": "dorefa", "bits": 1}}
W2 = {"weight": {"name": "twn", "bits": 2}}
W2A2_LSQ = {"weight": {"name": "lsq", "bits": 2, "per_channel": True}, "act": {"name": "lsq", "bits": 2}}
#: paired differences: row -> the row it is compared with (same seed)
PAIRS = {}


def rows(a) -> dict[str, dict]:
    """Every row: its config patch (over the base) and the rows it needs first (the teacher)."""
    E, F = a.epochs, a.finetune
    out: dict[str, dict] = {"fp32": {"patch": {"plan": {"weight": None}, "train": {"epochs": a.teacher_epochs}}}}
    for tag, plan, label in (("w1", W1, "DoReFa W1"), ("w2", W2, "TWN W2")):
        out[f"{tag}_ste"] = {"patch": {"plan": plan}, "label": f"{label} STE (scratch)"}
        out[f"{tag}_ste_fp32start"] = {"patch": {"plan": plan, "model": {"init_from": "TEACHER"},
                                                 "train": {"lr": a.start_lr}}, "label": f"{label} STE (FP32 start)"}
        PAIRS[f"{tag}_ste_fp32start"] = f"{tag}_ste"
        for k in (2, 3):
            for ft in (0, F):
                if ft and E - ft < 1:
                    continue
                name = f"{tag}_dcq_s{k}{'_ft' if ft else ''}"
                out[name] = {"patch": {"plan": plan, "train": {"lr": a.start_lr},
                                       "dcq": {"teacher": "TEACHER", "sections": k, "epochs": E - ft,
                                               "finetune_epochs": ft}},
                             "label": f"{label} DCQ {k} sections" + (f", {E - ft}+{ft} fine-tune" if ft else "")}
                PAIRS[name] = f"{tag}_ste"
    out["w2a2_lsq_scratch"] = {"patch": {"plan": W2A2_LSQ}, "label": "W2A2 LSQ (scratch)"}
    out["w2a2_lsq_fp32start"] = {"patch": {"plan": W2A2_LSQ, "model": {"init_from": "TEACHER"},
                                           "train": {"lr": a.start_lr}}, "label": "W2A2 LSQ (FP32 start)"}
    out["w2a2_lsq_fp32start_kd"] = {"patch": {"plan": W2A2_LSQ, "model": {"init_from": "TEACHER"},
                                              "train": {"lr": a.start_lr, "distill": {"teacher": "TEACHER",
                                                                                       "temperature": 4, "alpha": 0.9}}},
                                    "label": "W2A2 LSQ (FP32 start + KD)"}
    PAIRS["w2a2_lsq_fp32start"] = PAIRS["w2a2_lsq_fp32start_kd"] = "w2a2_lsq_scratch"
    return out


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def replace_teacher(obj, teacher: str):
    if isinstance(obj, dict):
        return {k: replace_teacher(v, teacher) for k, v in obj.items()}
    return teacher if obj == "TEACHER" else obj


def config(a, row: str, spec: dict, seed: int, out: Path) -> dict:
    base = {"name": f"{row}-seed{seed}", "model": {"name": "resnet8"},
            "data": {"name": "fashion-mnist", "limit": a.limit, "val_fraction": 0.05},
            "train": {"epochs": a.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "seed": seed,
                      "threads": a.threads, "progress": False}}
    return replace_teacher(merge(base, spec["patch"]), str(out / "runs" / "fp32" / f"seed{seed}"))


# ---------------------------------------------------------------------------------------------
# claims: two processes share the runs
# ---------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run_dir: Path) -> bool:
    path = run_dir.with_name(run_dir.name + ".claim")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                owner = int(path.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid():
                return True
            if owner and _alive(owner):
                return False
            path.unlink(missing_ok=True)  # a dead owner's claim
    return False


def release(run_dir: Path) -> None:
    run_dir.with_name(run_dir.name + ".claim").unlink(missing_ok=True)


def train_one(cfg_dict: dict, run_dir: Path) -> None:
    from lowbit.config import Config
    from lowbit.train import run

    cfg = Config.model_validate(cfg_dict)
    resume = (run_dir / ("sections.json" if cfg.dcq else "last.pt")).is_file()
    t = time.perf_counter()
    run(cfg, run_dir, resume=resume)
    (run_dir / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - t, "resumed": resume}) + "\n")


def work(a, specs: dict[str, dict], out: Path) -> None:
    jobs = [(row, s) for s in a.seeds for row in specs]
    while True:
        pending = [(r, s) for r, s in jobs if not (out / "runs" / r / f"seed{s}" / "summary.json").is_file()]
        if not pending:
            return
        started = False
        for r, s in pending:
            run_dir = out / "runs" / r / f"seed{s}"
            teacher = out / "runs" / "fp32" / f"seed{s}" / "summary.json"
            if r != "fp32" and not teacher.is_file():
                continue
            if not claim(run_dir):
                continue
            try:
                if (run_dir / "summary.json").is_file():
                    continue
                print(f"== {r} seed {s}", flush=True)
                train_one(config(a, r, specs[r], s, out), run_dir)
                started = True
            finally:
                release(run_dir)
            break
        if not started:
            time.sleep(5)  # the other process holds what is left (or trains a teacher)


def timing(a, specs: dict[str, dict], out: Path) -> dict:
    """The section phase of one 2-section DCQ run, sequential vs 2 workers (fresh folders each time)."""
    import shutil

    res = {}
    teacher = out / "runs" / "fp32" / "seed0"
    if not (teacher / "summary.json").is_file():
        train_one(config(a, "fp32", specs["fp32"], 0, out), teacher)
    # sequential, 2 workers, and sequential with the on-disk feature cache (section 1 reads section 0's
    # target features instead of running the teacher's section 0 again)
    for key, patch in (("workers1", {"workers": 1}), ("workers2", {"workers": 2}),
                       ("workers1_cache", {"workers": 1, "feature_cache_mb": a.cache_mb})):
        run_dir = out / "timing" / f"w1_dcq_s2_{key}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = merge(config(a, "w1_dcq_s2", specs["w1_dcq_s2"], 0, out), {"dcq": patch})
        train_one(cfg, run_dir)
        s = json.loads((run_dir / "summary.json").read_text())
        res[key] = {"sections_wall_s": s["dcq"]["sections_wall_s"],
                    "section_time_s": [x["time_s"] for x in s["dcq"]["section_info"]],
                    "stitched_test_acc": s["dcq"]["stitched_test_acc"], "threads": a.threads,
                    "feature_cache": [x.get("feature_cache") for x in s["dcq"]["section_info"]]}
        shutil.rmtree(run_dir / "feature_cache", ignore_errors=True)
    res["speedup"] = res["workers1"]["sections_wall_s"] / res["workers2"]["sections_wall_s"]
    res["cache_speedup"] = res["workers1"]["sections_wall_s"] / res["workers1_cache"]["sections_wall_s"]
    (out / "timing.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = f"{100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "–"  # one seed has no spread (was "± 0.00")
    return f"{100 * statistics.fmean(xs):.2f} ± {sd}"


def other_configs(a, specs: dict[str, dict], out: Path) -> list[str]:
    """The finished runs under ``out`` that were trained with another config than these arguments give (another
    --epochs, --limit, ...): one line each. Before, they were skipped as done and tabled under this call's header."""
    from lowbit.runfolder import config_change

    return [change for r, spec in specs.items() for s in a.seeds
            if ((d := out / "runs" / r / f"seed{s}") / "summary.json").is_file()
            and (change := config_change(d, config(a, r, spec, s, out)))]


def collect(a, specs: dict[str, dict], out: Path) -> dict:
    runs: dict[str, dict[int, dict]] = {}
    for r in specs:
        for s in a.seeds:
            d = out / "runs" / r / f"seed{s}"
            if (d / "summary.json").is_file():
                summ = json.loads((d / "summary.json").read_text())
                metrics = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
                wall = json.loads((d / "wall.json").read_text()) if (d / "wall.json").is_file() else {}
                dcq = summ.get("dcq") or {}
                n_train = round(a.limit * 0.95) if a.limit else None
                runs.setdefault(r, {})[s] = {
                    "test_acc": summ["test_acc"], "best_epoch": summ["best_epoch"], "best_val_acc": summ["best_val_acc"],
                    "stitched_test_acc": dcq.get("stitched_test_acc"),
                    "sample_passes": dcq.get("sample_passes", (n_train or 0) * len([m for m in metrics if m["epoch"] > 0])),
                    "teacher_forward_sample_passes": dcq.get("teacher_forward_sample_passes", 0),
                    "wall_s": wall.get("wall_s"), "weight": summ["weight"], "act": summ["act"],
                }
    table = []
    for r, spec in specs.items():
        got = runs.get(r, {})
        accs = [x["test_acc"] for x in got.values()]
        row = {"row": r, "label": spec.get("label", "FP32 teacher"), "n": len(accs), "test_acc": _ms(accs),
               "accs": accs}
        stitched = [x["stitched_test_acc"] for x in got.values() if x["stitched_test_acc"] is not None]
        row["stitched"] = _ms(stitched) if stitched else "-"
        ref = PAIRS.get(r)
        diffs = [got[s]["test_acc"] - runs[ref][s]["test_acc"] for s in got if ref and s in runs.get(ref, {})]
        row["vs"] = ref or "-"
        row["paired_diff"] = (f"{100 * statistics.fmean(diffs):+.2f} ± "
                              + (f"{100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "–")
                              + (f" (n={len(diffs)})" if len(diffs) != len(accs) else "")) if diffs else "-"
        row["diffs"] = diffs
        row["sample_passes"] = next((x["sample_passes"] for x in got.values()), None)
        walls = [x["wall_s"] for x in got.values() if x["wall_s"]]
        row["wall_s"] = statistics.fmean(walls) if walls else None
        table.append(row)
    return {"args": vars(a), "rows": table, "runs": runs}


def markdown(res: dict, timing_res: dict | None) -> str:
    a = res["args"]
    lines = [f"ResNet-8, Fashion-MNIST (limit {a['limit']}), {a['epochs']} epochs budget "
             f"(DCQ fine-tune {a['finetune']}), teacher {a['teacher_epochs']} epochs, seeds {a['seeds']}; "
             "test accuracy % at the best validation epoch, mean ± std; paired difference vs the row named."
             + (" PARTIAL: rows with n below the number of seeds have not finished every seed."
                if any(r["n"] < len(a["seeds"]) for r in res["rows"]) else ""), "",
             "| row | | test acc % | stitched (before fine-tune) | Δ paired | vs | n | sample-passes | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        sp = f"{r['sample_passes']:,}" if r["sample_passes"] else "-"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "-"
        lines.append(f"| {r['row']} | {r['label']} | {r['test_acc']} | {r['stitched']} | {r['paired_diff']} | "
                     f"{r['vs']} | {r['n']} | {sp} | {wall} |")
    if timing_res:
        w1, w2 = timing_res["workers1"], timing_res["workers2"]
        lines += ["", f"2 sections, section phase wall time: one after the other {w1['sections_wall_s']:.1f} s, "
                      f"2 workers in parallel {w2['sections_wall_s']:.1f} s (speed-up {timing_res['speedup']:.2f}x)."]
        if "workers1_cache" in timing_res:
            wc = timing_res["workers1_cache"]
            lines += [f"One after the other with the on-disk feature cache: {wc['sections_wall_s']:.1f} s "
                      f"({timing_res['cache_speedup']:.2f}x vs without); stitched test acc "
                      f"{w1['stitched_test_acc']:.4f} / {wc['stitched_test_acc']:.4f} (without / with)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=8, help="the budget E (epochs of every quantized row)")
    ap.add_argument("--finetune", type=int, default=None, help="F: DCQ fine-tune epochs of the _ft rows "
                    "(default max(1, E // 4); rows with E - F < 1 are left out)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="FP32 teacher epochs (default E)")
    ap.add_argument("--start-lr", type=float, default=0.02, help="lr of the rows that start from the teacher")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="+", help="only these rows (fp32 is added: every row needs its teacher)")
    ap.add_argument("--timing", action="store_true", help="measure 2 sections sequential vs parallel, then exit")
    ap.add_argument("--cache-mb", type=float, default=2048,
                    help="--timing: the feature cache's size limit for the cached sequential run (MiB)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: tables from the finished runs only (rows with fewer seeds are partial)")
    ap.add_argument("--out", default="benchmarks/results/dcq")
    a = ap.parse_args(argv)
    a.finetune = max(1, a.epochs // 4) if a.finetune is None else a.finetune
    a.teacher_epochs = a.teacher_epochs or a.epochs
    specs = rows(a)
    if a.rows:
        from lowbit.bench import select_rows
        from lowbit.errors import ConfigError

        try:
            select_rows(specs, a.rows)
        except ConfigError as e:
            sys.exit(f"dcq_table: {e}")
        specs = {r: specs[r] for r in specs if r in a.rows or r == "fp32"}
    if a.list:
        print("\n".join(f"{r:24s} {s.get('label', 'FP32 teacher')}" for r, s in specs.items()))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.timing:
        print(json.dumps(timing(a, rows(a), out), indent=2))
        return
    stale = other_configs(a, specs, out)
    if stale:
        sys.exit(f"dcq_table: {stale[0]}" + (f" (and {len(stale) - 1} more runs)" if len(stale) > 1 else "")
                 + "; give the arguments these runs were trained with, or another --out")
    if not a.collect:
        work(a, specs, out)
    res = collect(a, specs, out)
    t = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else None
    (out / "results.json").write_text(json.dumps({**res, "timing": t}, indent=2) + "\n")
    md = markdown(res, t)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
