"""Run a grid of configs x seeds with the core training loop, resumably, and tabulate it.

A *row* is a label and a dict of config overrides (nested, merged into a base config dict).
Each (row, seed) is one run folder ``OUT/<row-slug>/seed<k>``; a run with ``summary.json`` is
done and is skipped when the grid is run again, a run with only ``last.pt`` is resumed. So a
killed benchmark continues where it stopped, and every number in a table comes from a run folder
holding its config.

Tables follow seed 002's protocol: the test accuracy of each run is taken at its best-validation
epoch, and rows report mean ± std over seeds. Epoch time is the median over a run's epochs; the
time ratio is taken against a reference row *with the same seed*. It is wall-clock time: comparable
only for runs trained one at a time on an otherwise idle machine (not with ``--workers`` > 1, Ray, or
runs resumed or reused from another day), which the table's note says.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable

from ..config import Config, validate_names
from ..errors import ConfigError
from ..plan import one_line


def deep_merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def make_config(base: dict, overrides: dict, seed: int, label: str) -> Config:
    from pydantic import ValidationError

    data = deep_merge(base, overrides)
    data = deep_merge(data, {"name": label, "train": {"seed": seed}})
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e, f"row '{label}'")) from None
    try:
        validate_names(cfg)
    except ConfigError as e:  # name the row (before session 25: only the config field)
        raise ConfigError(f"row '{label}': {e}") from None
    return cfg


def read_run(run_dir: Path) -> dict:
    """One finished run as a flat record: summary, config, median epoch time, per-epoch metrics."""
    import yaml

    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {**summary, "run_dir": str(run_dir), "config": config, "epochs": len(epochs),
            "epoch_time": statistics.median(e["epoch_time"] for e in epochs), "history": epochs}


def claim_and_train(cfg_dict: dict, run_dir: str, blocking: bool = False, reuse: bool = False) -> str:
    """Train one (row, seed) unless it is finished, holding its run folder's lock throughout, so
    that no two processes (workers, two ``lowbit bench`` on one suite, Ray tasks) ever train the
    same run. Returns ``"done"`` (trained or already finished) or ``"busy"`` (another process holds
    the folder; only when not ``blocking``). Module level: picklable for spawn and Ray."""
    from ..runfolder import RunFolderBusy, check_same_config, lock_run

    run_dir = Path(run_dir)
    try:
        with lock_run(run_dir, blocking=blocking):
            if (run_dir / "summary.json").is_file():  # finished, maybe by another process meanwhile
                if not reuse:
                    check_same_config(run_dir, cfg_dict)
                return "done"
            from ..train import run  # late: keeps `import lowbit.bench` light

            resume = (run_dir / "last.pt").is_file()
            if resume:
                check_same_config(run_dir, cfg_dict)  # never continue a checkpoint of another config
            run(Config.model_validate(cfg_dict), run_dir, resume=resume)
            return "done"
    except RunFolderBusy:
        if blocking:
            raise
        return "busy"


def check_labels(labels: list[str]) -> None:
    """Two row labels that map to one folder (differing only in punctuation) would share results."""
    seen: dict[str, str] = {}
    for label in labels:
        s = slug(label)
        if not s:
            raise ConfigError(f"row label '{label}' has no letter or digit to name its folder")
        if s in seen and seen[s] != label:
            raise ConfigError(f"row labels '{seen[s]}' and '{label}' both map to folder '{s}'; "
                              "rename one (labels must differ in more than punctuation)")
        seen[s] = label


def select_rows(names, rows: list[str] | None = None, part: str | None = None) -> list[str]:
    """The rows a benchmark script trains: ``rows`` (default: every name, in order), then with ``part`` "K/N" every
    N-th of them from the K-th (1-based), so N processes can share one grid. Unknown rows or a malformed part are a
    one-line :class:`ConfigError` naming the rows there are."""
    names = list(names)
    labels = list(rows) if rows else names
    unknown = [lb for lb in labels if lb not in names]
    if unknown:
        raise ConfigError(f"unknown rows {unknown}; rows: {'; '.join(names)}")
    if part:
        try:
            k, n = (int(v) for v in part.split("/"))
        except ValueError:
            k = n = 0
        if not 1 <= k <= n:
            raise ConfigError(f"--part must look like K/N with 1 <= K <= N, got {part!r}")
        labels = labels[k - 1::n]
    return labels


def run_grid(rows: dict[str, dict], base: dict, seeds: list[int], out: str | Path, workers: int = 1,
             dry_run: bool = False, log: Callable[[str], None] = print, reuse: bool = False,
             backend: str = "local", address: str | None = None) -> list[dict]:
    """Train every (row, seed) not yet finished under ``out``; return one record per run.

    With ``workers > 1`` the runs go to that many separate processes, each with its ``train.threads``
    (``cpu_count // workers`` where the config leaves it unset); ``backend="ray"`` sends each run to a Ray cluster as a
    task (:mod:`lowbit.bench.ray_backend`). ``dry_run`` validates every config and trains nothing.
    A finished run is only reported if its config equals the requested one (``reuse`` skips the
    check); a run folder another process is training is left to it and waited for at the end.
    """
    out = Path(out)
    check_labels(list(rows))
    if address is not None and backend != "ray":  # was ignored: every run trained locally (session 24)
        raise ConfigError(f"--address {address} needs --backend ray")
    if not seeds:
        raise ConfigError("the suite's seeds are empty: give at least one seed")
    configs = {(label, s): make_config(base, ov, s, label) for label, ov in rows.items() for s in seeds}
    jobs = [(k, cfg, out / slug(k[0]) / f"seed{k[1]}") for k, cfg in configs.items()]
    if not reuse:  # before training anything: a changed suite into an old folder is an error at once
        from ..runfolder import check_same_config

        for _, cfg, run_dir in jobs:
            if (run_dir / "summary.json").is_file() or (run_dir / "last.pt").is_file():
                check_same_config(run_dir, cfg.to_dict())
    differs = {}
    if reuse:  # reported anyway, but said: before session 25 a row silently pooled runs of other configs
        from ..runfolder import config_change

        for (label, seed), cfg, run_dir in jobs:
            if (run_dir / "summary.json").is_file():
                try:
                    change = config_change(run_dir, cfg.to_dict())  # without "pass --reuse": it was passed
                except ConfigError as e:
                    change = str(e)
                if change:
                    differs[(label, seed)] = change
                    log(f"warning: --reuse: {change}")
    todo = [j for j in jobs if not (j[2] / "summary.json").is_file()]
    if dry_run:
        return []
    if backend == "ray":
        from .ray_backend import run_ray

        run_ray(todo, address=address, workers=workers, reuse=reuse, log=log)
    elif workers <= 1:
        busy = []
        for (label, seed), cfg, run_dir in todo:
            log(f"== {label} (seed {seed})")
            if claim_and_train(cfg.to_dict(), str(run_dir), reuse=reuse) == "busy":
                log(f"   {run_dir} is being trained by another process; coming back to it")
                busy.append(run_dir)
        for (label, seed), cfg, run_dir in todo:
            if run_dir in busy:
                claim_and_train(cfg.to_dict(), str(run_dir), blocking=True, reuse=reuse)
    elif todo:
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            pending = todo
            for blocking in (False, True):
                futures = {}
                for (label, seed), cfg, run_dir in pending:
                    # the run's own train.threads where the suite sets it (as Ray does): other threads, other numbers
                    d = deep_merge(cfg.to_dict(), {"train": {"threads": cfg.train.threads or threads,
                                                             "progress": False}})
                    futures[pool.submit(claim_and_train, d, str(run_dir), blocking, reuse)] = (label, seed)
                    log(f"== {label} (seed {seed}) queued")
                busy = {k for f, k in futures.items() if f.result() == "busy"}  # re-raises a worker's error
                pending = [j for j in pending if j[0] in busy]
    recs = [{"row": label, "seed": seed, **read_run(run_dir)} for (label, seed), _, run_dir in jobs]
    for r in recs:
        if (r["row"], r["seed"]) in differs:
            r["reused_other_config"] = differs[(r["row"], r["seed"])]
    return recs


def _references(rows: list[str], reference: str | dict[str, str] | None) -> dict[str, str]:
    """Each row's reference row: one label for every row, or a mapping (a suite's rows against the reference
    method's row of their own model and width, :func:`lowbit.bench.suite.references`)."""
    if reference is None:
        return {}
    return dict(reference) if isinstance(reference, dict) else {r: reference for r in rows}


def aggregate(records: list[dict], reference: str | dict[str, str] | None = None) -> list[dict]:
    """Mean ± std per row (in row order) of test accuracy and epoch-time ratio to its ``reference`` row (the
    same seed)."""
    refs = _references([r["row"] for r in records], reference)
    ref_time = {(r["row"], r["seed"]): r["epoch_time"] for r in records if r["row"] in set(refs.values())}
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        a = out.setdefault(r["row"], {"row": r["row"], "acc": [], "ratio": [], "rec": r})
        a["acc"].append(r["test_acc"])
        key = (refs.get(r["row"]), r["seed"])
        if key in ref_time:
            a["ratio"].append(r["epoch_time"] / ref_time[key])
    rows = []
    for a in out.values():
        r = a["rec"]
        rows.append({
            "row": a["row"], "n": len(a["acc"]),
            "acc_mean": statistics.fmean(a["acc"]), "acc_std": statistics.stdev(a["acc"]) if len(a["acc"]) > 1 else 0.0,
            "time_ratio": statistics.fmean(a["ratio"]) if a["ratio"] else float("nan"),
            "method": r.get("method"), "weight": r["weight"], "act": r["act"], "size_kib": r["size_bytes"] / 1024,
            "bitops_g": r["bitops"] / 1e9, "epochs": r["epochs"], "test_images": r.get("test_images"),
            "reused_other_config": sum(1 for x in records if x["row"] == a["row"] and x.get("reused_other_config")),
        })
    return rows


def markdown(rows: list[dict], reference: str | dict[str, str] | None = None, workers: int | None = None) -> str:
    """The table, then notes: what the epoch-time column is (wall clock; ``workers`` > 1 makes it load), the
    test-set size, and rows that pooled ``--reuse``d runs of another config."""
    by_label = {r["row"]: r for r in rows}
    refs = {k: by_label[v] for k, v in _references(list(by_label), reference).items() if v in by_label}
    head = ["row", "method", "weight", "act", "test acc % (mean ± std)", "n", "size KiB", "GBitOPs"]
    if refs:
        head += ["Δ vs ref", "epoch time / ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = f"{100 * r['acc_std']:.2f}" if r["n"] > 1 else "–"  # one seed has no spread (was "± 0.00")
        cells = [r["row"], str(r.get("method") or ""), r["weight"], r["act"], f"{100 * r['acc_mean']:.2f} ± {spread}",
                 str(r["n"]), f"{r['size_kib']:.1f}", f"{r['bitops_g']:.3f}"]
        if refs:
            ref = refs.get(r["row"])
            cells.append(f"{100 * (r['acc_mean'] - ref['acc_mean']):+.2f}" if ref else "")
            cells.append("–" if r["time_ratio"] != r["time_ratio"] else f"{r['time_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    sizes = sorted({r.get("test_images") for r in rows if r.get("test_images")})
    if sizes:
        notes.append(f"Test accuracy on {' / '.join(f'{n:,}' for n in sizes)} test images (data.limit also cuts "
                     "the test set).")
    if refs:
        notes.append("Epoch time / ref: median epoch wall time over the reference row's, same seed; comparable only "
                     "for runs trained one at a time on an otherwise idle machine"
                     + (f" (these ran {workers} at a time: not comparable)." if workers and workers > 1 else "."))
    mixed = [f"{r['row']} ({r['reused_other_config']} of {r['n']} runs)" for r in rows if r.get("reused_other_config")]
    if mixed:
        notes.append("**Reused runs of another config** (`--reuse`): " + ", ".join(mixed) + ".")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def write_results(out: str | Path, records: list[dict], rows: list[dict],
                  reference: str | dict[str, str] | None = None, meta: dict | None = None,
                  workers: int | None = None) -> str:
    """results.jsonl (one line per run), summary.csv, summary.md; returns the markdown table."""
    import io

    from ..runfolder import atomic_write, locked
    from ..train import json_safe

    out = Path(out)
    lines = "".join(json.dumps(json_safe({k: v for k, v in r.items() if k != "history"}), allow_nan=False) + "\n"
                    for r in records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    table = markdown(rows, reference, workers)
    note = f"\n\n{json.dumps(meta)}\n" if meta else "\n"
    # one writer at a time, each file whole: two bench processes never interleave or duplicate lines
    with locked(out, what="results folder"):
        atomic_write(out / "results.jsonl", lines)
        atomic_write(out / "summary.csv", buf.getvalue())
        atomic_write(out / "summary.md", table + note)
    return table
