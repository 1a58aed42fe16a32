"""An optional on-disk cache of the teacher's section features, with a size limit (DCQ, seed 001).

DCQ's student section i trains on ``(h_i, h_{i+1})``: the teacher's features entering and leaving
section i, computed batch by batch from the seeded training stream. Without a cache every section
re-runs the teacher's prefix on every batch of every epoch (section i costs the teacher's sections
0..i), and the validation features are recomputed every epoch although they never change. With
``dcq.feature_cache_mb: N`` the features at each cut are written once per (cut, stream, epoch, batch)
and read back by every other section that needs them: section i's output features are section
i+1's inputs, and the sections draw the same batches (same seed, same epoch), so the teacher runs each
of its sections once per batch in total. A training stream that is neither shuffled nor augmented,
and the validation stream, are keyed without the epoch (the same batches every epoch).

Nothing is silently wrong or unbounded:

* The limit is a hard cap on the bytes the cache writes (checked and reserved under a file lock,
  so parallel section workers share one budget); once full, features are computed as without a cache.
* Every entry stores its batch's labels, compared on every read: an entry that does not belong to the
  batch being served (another data order, a stale folder) raises a one-line error instead of
  training on the wrong features.
* The folder holds a fingerprint (data, seed, batch sizes, cut, teacher file); a folder written for
  another setting is refused.

Reads return exactly the tensors computed (``torch.save``/``load`` round-trip the bits), so a run with
the cache trains the same weights as one without (tests/test_dcq.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError

_INFO = "cache_info.json"
_LOCK = ".lock"
_USED = ".bytes_used"


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _without_root(fp) -> str | None:
    """A fingerprint written before session 26's review, which held data.root (now VOLATILE), without it."""
    try:
        d = json.loads(fp)
        d["data"].pop("root", None)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return json.dumps(d, sort_keys=True, default=str)


class FeatureCache:
    """Features per ``(cut, stream, epoch key, batch index)`` in ``root``, at most ``max_bytes`` written."""

    def __init__(self, root: str | Path, max_bytes: int, fingerprint: dict):
        if max_bytes <= 0:
            raise ConfigError(f"feature cache: the size limit must be positive, got {max_bytes} bytes")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        fp = json.dumps(fingerprint, sort_keys=True, default=str)
        with self._locked():
            info = self.root / _INFO
            if info.is_file():
                try:
                    old = json.loads(info.read_text())
                except (OSError, ValueError):
                    raise ConfigError(f"feature cache {self.root}: {_INFO} is unreadable; delete the folder") from None
                if old.get("fingerprint") != fp and _without_root(old.get("fingerprint")) != fp:
                    raise ConfigError(f"feature cache {self.root} was written for another data/teacher setting; "
                                      "delete it or point dcq.feature_cache_dir elsewhere")
            else:
                info.write_text(json.dumps({"fingerprint": fp, "max_bytes": self.max_bytes}, indent=2) + "\n")
        self.hits = self.misses = self.written = self.refused = 0

    @staticmethod
    def fingerprint(cfg_dict: dict, cut_names: list[str], teacher_file: str | Path) -> dict:
        """What decides the cached features: the data, the streams' seed and batch sizes, the cut, the teacher."""
        h = hashlib.sha256(Path(teacher_file).read_bytes()).hexdigest()[:16] if Path(teacher_file).is_file() else None
        t = cfg_dict["train"]
        data = {k: v for k, v in cfg_dict["data"].items() if k != "root"}  # where this machine keeps it (VOLATILE)
        return {"data": data, "seed": t["seed"], "batch_size": t["batch_size"],
                "eval_batch_size": t["eval_batch_size"], "cuts": cut_names, "teacher_sha256": h}

    @contextmanager
    def _locked(self):
        with open(self.root / _LOCK, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _path(self, cut: int, stream: str, epoch_key: str, batch: int) -> Path:
        return self.root / f"cut{cut}" / f"{stream}_{epoch_key}_b{batch}.pt"

    def get(self, cut: int, stream: str, epoch_key: str, batch: int, labels: Tensor) -> Tensor | None:
        """The cached features, or None; raises if the entry belongs to another batch."""
        p = self._path(cut, stream, epoch_key, batch)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(p, weights_only=True)
            feats, y = entry["features"], entry["labels"]
        except Exception as e:  # a truncated or foreign file: one line, never a silent recompute of garbage
            raise ConfigError(f"feature cache entry {p} is unreadable ({type(e).__name__}); delete {self.root}") from None
        if not torch.equal(y, labels.cpu()):
            raise ConfigError(f"feature cache entry {p} holds another batch (labels differ); the data order "
                              f"changed since it was written: delete {self.root}")
        self.hits += 1
        return feats

    def put(self, cut: int, stream: str, epoch_key: str, batch: int, labels: Tensor, feats: Tensor) -> bool:
        """Write an entry if it fits the limit (True) or leave it out (False). Atomic (tmp + rename)."""
        p = self._path(cut, stream, epoch_key, batch)
        size = _nbytes(feats, labels)
        with self._locked():
            if p.is_file():
                return True  # another worker wrote it first
            used_file = self.root / _USED
            used = int(used_file.read_text() or 0) if used_file.is_file() else 0
            if used + size > self.max_bytes:
                self.refused += 1
                return False
            used_file.write_text(str(used + size))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        torch.save({"features": feats.detach().cpu(), "labels": labels.detach().cpu()}, tmp)
        os.replace(tmp, p)
        self.written += size
        return True

    def bytes_used(self) -> int:
        f = self.root / _USED
        return int(f.read_text() or 0) if f.is_file() else 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "bytes_written": self.written,
                "entries_refused_by_limit": self.refused, "bytes_used": self.bytes_used(),
                "max_bytes": self.max_bytes}
