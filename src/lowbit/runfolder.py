"""Run folders that never lose or mix results: one owner at a time, unique names, no foreign files.

Every rule here answers a way results were lost or mixed (issue 19):

* **a lock per run folder** (:func:`lock_run`, ``fcntl.flock`` on ``RUN/.lock``): a second process
  that wants to train into a folder another process is training gets a one-line error (or, for
  ``lowbit bench``, skips the row and comes back to it once the first process is done). The kernel
  drops the lock when its process dies, so a killed run never leaves a stale lock behind.
* **unique folder names** (:func:`new_run_dir`): ``NAME-YYYYmmdd-HHMMSS`` is created with an atomic
  ``mkdir``; a second process in the same second gets ``...-2``, a third ``...-3``.
* **never overwrite what lowbit did not write** (:func:`check_fresh`): training into a folder that
  holds other files, or any earlier run (finished or not, with or without ``last.pt``), is refused.
* **a finished run's config equals the requested one** (:func:`check_same_config`): the fields that
  change results are compared; :data:`VOLATILE` (threads, the progress bar, the device, data.root) are not.
* **one writer for suite results** (:func:`locked`, :func:`atomic_write`): ``results.jsonl`` and the
  tables are rewritten whole under ``OUT/.lock`` and replaced atomically, so two ``lowbit bench``
  processes never interleave or duplicate lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

LOCK = ".lock"
#: files and folders a run folder may hold, all written by lowbit
RUN_FILES = {"config.yaml", "plan.txt", "metrics.jsonl", "last.pt", "best.pt", "summary.json", LOCK,
             "last.tmp", "best.tmp", "export", "report",
             "teacher.pt", "sections.json", "sections",  # DCQ (schedules/dcq.py)
             "warmup"}  # train.float_warmup_epochs (schedules/warmup.py)
#: config fields that do not change a run's numbers (set by the process pool, the CLI, the machine; data.root: where
#: this machine keeps the data set, since session 26, so that a run folder moved to another machine is read there)
VOLATILE = {("train", "threads"), ("train", "progress"), ("train", "device"), ("data", "root")}


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


_HELD: dict[str, int] = {}  # locks this process holds (re-entrant: bench holds it, then run() takes it)


@contextlib.contextmanager
def locked(folder: str | Path, blocking: bool = True, what: str = "run folder") -> Iterator[Path]:
    """Hold ``FOLDER/.lock`` (created with the folder) for the block. Non-blocking: a held lock is
    :class:`RunFolderBusy`. The lock file records the holder's pid (for the message only).
    Re-entrant within one process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFolderBusy(f"{folder}: {what} in use by another lowbit process (pid {pid}); "
                                "wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = 1
        try:
            yield folder
        finally:
            _HELD.pop(key, None)
    finally:
        os.close(fd)  # closing drops the lock


def lock_run(run_dir: str | Path, blocking: bool = False):
    """The lock ``run()`` holds for the whole training of ``run_dir``."""
    return locked(run_dir, blocking=blocking)


def new_run_dir(out_dir: str | Path, name: str, stamp: str | None = None) -> Path:
    """A new, empty folder ``OUT/NAME-STAMP`` (``-2``, ``-3``, ... when taken), created atomically so
    that two processes started in the same second never share one."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    if not name or any(c in name for c in "/\\\0"):  # before session 27: "No such file or directory"
        raise ConfigError(f"name {name!r}: the run folder is out_dir/NAME-TIME, so name must be a folder name without "
                          "'/' (put folders in out_dir, or give --out)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        p = out / (f"{name}-{stamp}" if k == 1 else f"{name}-{stamp}-{k}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise ConfigError(f"{out}: no free run folder name for {name}-{stamp}")


def discard_if_unused(run_dir: str | Path) -> bool:
    """Remove ``run_dir``, which this process created, if it holds nothing but its lock: a start that
    failed before writing anything (a missing dataset, a bad ``model.init_from``) leaves no empty folder."""
    run_dir = Path(run_dir)
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK}:
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()
            return True
    except OSError:
        pass
    return False


def _holder(run_dir: Path) -> str | None:
    """The pid of another process holding ``run_dir``'s lock, or None (no lock file, nobody, or this process)."""
    if _HELD.get(str(run_dir.resolve())):
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def foreign_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)


def check_fresh(run_dir: str | Path, cfg_yaml: str | None = None) -> None:
    """Refuse to start a run in ``run_dir`` unless it is new or empty. A folder holding only an
    aborted start of the *same* config (config.yaml, plan.txt, an empty metrics.jsonl: the run died
    before its first checkpoint; or a best.pt without last.pt: it died writing the first) may be started again."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        blocked = next((a for a in run_dir.absolute().parents if a.exists() and not a.is_dir()), None)
        if blocked is not None:  # before session 28: 'run folder: X' printed, then "Not a directory"
            raise ConfigError(f"{run_dir}: {blocked} is a file, so no run folder can be made below it")
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder")
    other = foreign_files(run_dir)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise ConfigError(f"{run_dir} holds files lowbit did not write ({shown}); "
                          "train into a new or empty folder")
    present = {p.name for p in run_dir.iterdir()} - {LOCK, "last.tmp", "best.tmp"}
    if not present:
        return
    # an aborted start: no epoch checkpointed (a best.pt without last.pt: the disk filled between the two; no checkpoint
    # and the first epoch's metrics line at most: its last.pt, written after that line, could not be written, e.g. a
    # full disk; before session 29 a new start and --resume both refused that folder, and `lowbit bench` stuck on it)
    # (a float warm-up's warmup/ beside them, schedules/warmup.py: the same config continues it)
    metrics = run_dir / "metrics.jsonl"
    aborted = present - {"warmup"} <= {"config.yaml", "plan.txt", "metrics.jsonl", "best.pt"} and (
        "best.pt" in present or not metrics.is_file()
        or sum(1 for ln in metrics.read_text().splitlines() if ln.strip()) <= 1)
    if aborted and cfg_yaml is not None and (run_dir / "config.yaml").is_file() and \
            same_config_text((run_dir / "config.yaml").read_text(), cfg_yaml):
        return
    busy = _holder(run_dir)
    if busy is not None:  # a run training there now (said before session 24: "use --resume", which then failed)
        raise RunFolderBusy(f"{run_dir}: a run is training there now (lowbit process {busy}); wait for it to finish "
                            "or choose another --out")
    if "sections.json" in present and "summary.json" not in present:
        state, hint = "a DCQ run", f"resume it (--resume {run_dir}) or choose another --out"
        raise ConfigError(f"{run_dir} already holds a DCQ run ({', '.join(sorted(present))}); {hint}")
    if "summary.json" in present:
        state, hint = "finished", "choose another --out"
    elif "last.pt" in present:
        state, hint = "unfinished", f"use --resume {run_dir} or another --out"
    else:
        state, hint = "without a checkpoint", "choose another --out (or delete the folder)"
    raise ConfigError(f"{run_dir} already holds a run ({state}: {', '.join(sorted(present))}); {hint}")


def _strip(d: dict) -> dict:
    import copy

    d = copy.deepcopy(d)
    for section, key in VOLATILE:
        if isinstance(d.get(section), dict):
            d[section].pop(key, None)
    return d


def _normal(d, saved: bool = False) -> dict:
    """A config dict with every default filled in (so a field added to lowbit later is no change).
    ``saved``: ``d`` was recorded by a run (config.yaml, checkpoint): read with the meaning it had
    then (:func:`lowbit.config.saved_config`)."""
    from pydantic import ValidationError

    from .config import Config, saved_config

    if not isinstance(d, dict):
        return {}
    if saved:
        d = saved_config(d)
    try:
        return Config.model_validate(d).to_dict()
    except ValidationError:
        return d


def run_config(run_dir: str | Path, overrides: list[str] | None = None):
    """A run folder's config.yaml as a Config. When an edit made it invalid (say ``integer: false`` beside
    integer-mode settings), the error leads with what the edit changed against the config its checkpoint recorded,
    as for an edit that still validates (:func:`lowbit.train.load_checkpoint`)."""
    from .config import load_config

    path = Path(run_dir) / "config.yaml"
    try:
        return load_config(path, overrides, saved=True)
    except ConfigError as e:
        for ck in (path.parent / "best.pt", path.parent / "last.pt"):
            edited = _edited_after_training(path, ck) if ck.is_file() else ""
            if edited:
                raise ConfigError(f"{ck} does not fit {path} (the config was edited after training: {edited}; "
                                  f"as edited: {e})") from None
        raise


def _edited_after_training(config_path: Path, ck_path: Path) -> str:
    """The first two differences between ``config_path`` and the config ``ck_path`` recorded ('' when none or
    unreadable)."""
    import torch

    from .config import read_yaml_mapping

    try:
        recorded = torch.load(ck_path, weights_only=False, map_location="cpu").get("config")
        now = read_yaml_mapping(config_path)
    except Exception:  # noqa: BLE001 - only a better message is at stake; the caller raises its own
        return ""
    return edits_since(recorded, now, saved=True) if isinstance(recorded, dict) else ""


def edits_since(recorded: dict, now: dict, saved: bool = False) -> str:
    """The first two differences between the config a checkpoint recorded and ``now`` (``saved``: as a run folder's
    config.yaml reads), the name aside; '' when none."""
    diff = [d for d in config_diff(_strip(_normal(recorded, saved=True)), _strip(_normal(now, saved=saved)))
            if not d.startswith("name:")]
    return "; ".join(diff[:2])


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (volatile fields excluded by the caller)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def same_config_text(old_yaml: str, new_yaml: str) -> bool:
    """``old_yaml`` (a run folder's config.yaml) and ``new_yaml`` describe the same run."""
    import yaml

    try:
        return not config_diff(_strip(_normal(yaml.safe_load(old_yaml), saved=True)),
                               _strip(_normal(yaml.safe_load(new_yaml))))
    except yaml.YAMLError:
        return False


def check_same_config(run_dir: str | Path, cfg_dict: dict) -> None:
    """A finished (or resumable) run in ``run_dir`` must have been trained with ``cfg_dict``; else a
    one-line error naming the first differing fields."""
    change = config_change(run_dir, cfg_dict)
    if change:
        raise ConfigError(f"{change}; pass --reuse to report it anyway, or use another --out")


def config_change(run_dir: str | Path, cfg_dict: dict) -> str | None:
    """None if the run in ``run_dir`` was trained with ``cfg_dict``, else what differs (one line); a folder
    without a readable config.yaml is a ConfigError."""
    import yaml

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds results but no config.yaml; move it away or choose another --out")
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{path}: not valid YAML; move the folder away or choose another --out") from None
    diff = config_diff(_strip(_normal(old, saved=True)), _strip(_normal(cfg_dict)))
    if diff:
        more = f" (+{len(diff) - 2} more)" if len(diff) > 2 else ""
        return f"{run_dir} was trained with another config ({'; '.join(diff[:2])}{more})"
    return None


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the form atomic_tmp_target reads
    try:
        tmp.write_text(text, encoding="utf-8")  # not the locale's: summary.md's '±' failed under LC_ALL=C
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C: no half-written temp file left behind (it blocked a bench rerun)
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # say which file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def atomic_tmp_target(name: str) -> str | None:
    """The file whose :func:`atomic_write` left the temporary file ``name`` (``.NAME.PID.tmp``, a write killed
    halfway), or None where ``name`` is no such file."""
    parts = name.split(".")
    if name.startswith(".") and name.endswith(".tmp") and len(parts) >= 4 and parts[-2].isdigit():
        return ".".join(parts[1:-2])
    return None

