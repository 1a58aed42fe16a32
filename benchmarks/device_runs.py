"""Run a list of lowbit configs on a lent GPU machine: worker processes, a time budget, results as a tarball.

A device machine is lent for minutes (15 in all here), starts bare and comes back as the files of one folder;
this script makes one call of it count:

- ``--smoke A,B,..``: first these configs (one of each kind) train on 300 images (into a scratch folder),
  all at once; if any fails, the script prints why and stops at once, so that most of the lease is left for a fixed rerun.
- then the configs train in the order given (put the longest first), ``--jobs`` at a time, each in its own
  process (spawned: CUDA does not survive a fork) with one CPU thread (``OMP/OPENBLAS/MKL_NUM_THREADS=1``,
  and the configs' own ``train.threads``). TF32 is off, so the GPU's float32 convolutions and matmuls
  round as float32 does (PyTorch turns TF32 on for cuDNN convolutions by default).
- no run starts after ``--start-by`` seconds; at ``--deadline`` the script writes what finished and exits.
- each finished run folder gets ``device_run.json``: the GPU, torch's version and the run's wall time.
  An integer-mode network's accuracy is always the NumPy integer network's, on the CPU; a float network's
  is the GPU's. ``--cpu-eval A,B``: these configs' float networks are evaluated again on the CPU as well
  (``test_acc_cpu``), to see what the GPU's float rounding changes (a minute each on one core).
- after every finished run the small files of every finished folder (config.yaml, metrics.jsonl, plan.txt,
  summary.json, device_run.json; not the checkpoints) are written again into ``--tar``, so a run cut
  short still returns what finished.

    python benchmarks/device_runs.py --runs benchmarks/results/integer_export/mbv2_ft/runs --jobs 15 \\
        --start-by 300 --deadline 520 --smoke A.yaml,B.yaml --tar $OUT/runs.tar.gz CONFIG.yaml ...

The configs are not changed: a run folder's config.yaml is the committed config (``train.device: auto``
picks the GPU).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

SMALL_FILES = ("config.yaml", "metrics.jsonl", "plan.txt", "summary.json", "device_run.json")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def train_one(config: str, run_dir: str, smoke: bool, cpu_eval: bool = False) -> dict:
    """Train one config into ``run_dir`` (worker process); returns what happened, never raises."""
    t0 = time.time()
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        from lowbit.config import load_config
        from lowbit.data import BatchLoader
        from lowbit.fit import evaluate
        from lowbit.train import load_data, run

        over = ["data.limit=300"] if smoke else []
        cfg = load_config(config, overrides=over)
        data = load_data(cfg)
        res = run(cfg, run_dir, data=data)
        info = {"config": config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "tf32": False, "wall_s": round(time.time() - t0, 1),
                "test_acc": res.summary["test_acc"]}
        if cpu_eval and not cfg.plan.integer:  # the float network again on the CPU, as the CPU runs were evaluated
            # res.model is the network the run evaluated (its best.pt, finalized)
            info["test_acc_cpu"] = evaluate(res.model.cpu(), BatchLoader(data.test, data.info, cfg.train.eval_batch_size),
                                            device="cpu")["acc"]
        info["total_s"] = round(time.time() - t0, 1)
        Path(run_dir, "device_run.json").write_text(json.dumps(info, indent=1) + "\n")
        return {"ok": True, **info}
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        return {"ok": False, "config": config, "error": traceback.format_exc(), "wall_s": round(time.time() - t0, 1)}


def write_tar(path: Path, done: list[Path], log: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for d in done:
            for f in SMALL_FILES:
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"{d.name}/{f}")
        data = log.encode()
        ti = tarfile.TarInfo("device_runs.log")
        ti.size, ti.mtime = len(data), int(time.time())
        tar.addfile(ti, io.BytesIO(data))
    tmp.replace(path)


def pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="config files, run in this order")
    ap.add_argument("--runs", required=True, help="folder that gets one run folder per config (named as the config)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--start-by", type=float, default=300.0, help="seconds after which no run starts")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after which the script writes and exits")
    ap.add_argument("--tar", required=True, help="tarball of the finished run folders' small files")
    ap.add_argument("--cpu-eval", default="", help="comma-separated configs whose float network is also "
                    "evaluated on the CPU")
    ap.add_argument("--smoke", default="", help="comma-separated configs that first train on 300 images; "
                    "the script stops if one fails")
    a = ap.parse_args()
    for v in THREAD_VARS:  # inherited by the spawned workers before they import numpy or torch
        os.environ[v] = "1"
    t0 = time.time()
    lines: list[str] = []

    def say(msg: str) -> None:
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        lines.append(line)
        print(line, flush=True)

    configs = [str(Path(c)) for c in a.configs]
    smoke = [str(Path(c)) for c in a.smoke.split(",") if c]
    cpu_eval = {str(Path(c)) for c in a.cpu_eval.split(",") if c}
    missing = [c for c in configs + smoke if not Path(c).is_file()]
    if missing:
        print(f"device_runs: config not found: {missing[0]}", file=sys.stderr)
        return 2
    runs, tar = Path(a.runs), Path(a.tar)
    if smoke:
        scratch = Path("/tmp/device_runs_smoke")
        with pool(a.jobs) as ex:
            futs = [ex.submit(train_one, c, str(scratch / f"{Path(c).stem}_{time.time_ns()}"), True, True)
                    for c in smoke]
            res = [f.result() for f in futs]
        bad = [r for r in res if not r["ok"]]
        for r in res:
            if r["ok"]:
                cpu = f", cpu {100 * r['test_acc_cpu']:.2f}" if "test_acc_cpu" in r else ""
                say(f"smoke {Path(r['config']).stem}: test {100 * r['test_acc']:.2f}{cpu} ({r['total_s']} s)")
        say(f"smoke: {len(smoke) - len(bad)}/{len(smoke)} configs trained on 300 images")
        if bad:
            say(f"smoke failed ({len(bad)}): {bad[0]['config']}\n{bad[0]['error']}")
            write_tar(tar, [], "\n".join(lines))
            return 3
    done: list[Path] = []
    queue = list(configs)
    ex = pool(a.jobs)
    inflight: dict = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < a.jobs and time.time() - t0 < a.start_by:
                c = queue.pop(0)
                inflight[ex.submit(train_one, c, str(runs / Path(c).stem), False, c in cpu_eval)] = c
            if not inflight:
                break
            left = a.deadline - (time.time() - t0)
            if left <= 0:
                break
            fin, _ = wait(inflight, timeout=left, return_when=FIRST_COMPLETED)
            for f in fin:
                c = inflight.pop(f)
                r = f.result()
                if r["ok"]:
                    done.append(runs / Path(c).stem)
                    cpu = f", cpu {100 * r['test_acc_cpu']:.2f}" if "test_acc_cpu" in r else ""
                    say(f"done {Path(c).stem}: test {100 * r['test_acc']:.2f}{cpu} ({r['total_s']} s)")
                else:
                    say(f"FAILED {Path(c).stem} ({r['wall_s']} s)\n{r['error']}")
                write_tar(tar, done, "\n".join(lines))
    finally:
        say(f"finished {len(done)} of {len(configs)}; not started {len(queue)}; cut off {len(inflight)}: "
            + " ".join(Path(c).stem for c in inflight.values()))
        write_tar(tar, done, "\n".join(lines))
        ex.shutdown(wait=False, cancel_futures=True)
    if inflight:  # the deadline: stop the workers still training (they hold this process's stdout open)
        for child in mp.active_children():
            child.kill()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
