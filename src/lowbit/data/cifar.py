"""Reader for the "python version" of CIFAR-10 and CIFAR-100.

CIFAR-10 (``cifar-10-python.tar.gz``) extracts to ``cifar-10-batches-py/`` with pickled batches
``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; CIFAR-100 (``cifar-100-python.tar.gz``)
extracts to ``cifar-100-python/`` with ``train`` and ``test``. Each pickle is a dict with
``b"data"``, a uint8 array ``(N, 3072)`` (1024 red, then 1024 green, then 1024 blue values of a
32x32 image in row-major order), and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).

``root`` may be the extracted folder itself or the folder containing it. There is no default
location. The files are unpickled, so only point ``root`` at data you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import DataError

from .base import RawDataset, check_labels

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

CIFAR10 = {
    "folder": "cifar-10-batches-py",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "label_key": "labels",
    "num_classes": 10,
    "archive": "cifar-10-python.tar.gz",
}
CIFAR100 = {
    "folder": "cifar-100-python",
    "train": ["train"],
    "test": ["test"],
    "label_key": "fine_labels",
    "num_classes": 100,
    "archive": "cifar-100-python.tar.gz",
}


def _hint(layout: dict) -> str:
    return (
        f"pass data.root=DIR containing {layout['folder']} "
        f"(extract {layout['archive']} from {URL})"
    )


def resolve_dir(name: str, root: str | None, layout: dict) -> Path:
    """The directory holding the batch files: ``root`` itself or ``root/<folder>``."""
    if root is None:
        raise DataError(f"{name}: no default location; {_hint(layout)}")
    base = Path(root).expanduser()
    first = layout["train"][0]
    for directory in (base, base / layout["folder"]):
        if (directory / first).is_file():
            return directory
    raise DataError(
        f"{name}: expected {layout['folder']}/{first} in {base} (or {first} directly in it); "
        f"{_hint(layout)}"
    )


def _get(batch: dict, key: str):
    """Look up ``key`` as bytes (as the official pickles store it) or as str."""
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:
        return batch[key]
    raise KeyError(key)


#: the globals a CIFAR python batch refers to (numpy arrays, pickled by Python 2's cPickle or Python 3)
_CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                  ("__builtin__", "object"), ("builtins", "object")}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts and strings only. A pickle can name any importable
    callable, so a plain ``pickle.load`` of a CIFAR folder from an untrusted source would run its code (session
    25); the official batches need nothing else (:data:`_CIFAR_GLOBALS`)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does (refused: "
                                         "unpickling it could run code)")
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
        return super().find_class({"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module), name)


def read_batch(path: Path, name: str, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one pickled batch as ``(uint8 (N, 3, 32, 32), int64 (N,))`` tensors."""
    if not path.is_file():
        raise DataError(f"{name}: expected batch file {path}; the extracted folder is incomplete")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(_get(batch, "data"))
        labels = np.asarray(_get(batch, label_key))
    except PermissionError as exc:  # not readable by this user: before session 29 "is not a CIFAR python batch"
        raise DataError(f"{name}: {path} could not be read ({exc.strerror or exc})") from exc
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError,
            KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{name}: {path} is not a CIFAR python batch (need keys b'data' and "
            f"b'{label_key}'): {exc!r}"
        ) from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{name}: {path} has data of dtype {data.dtype} and shape {data.shape}, "
            f"expected uint8 (N, 3072)"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{name}: {path} has {data.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise DataError(f"{name}: {path} has labels of dtype {labels.dtype} that are not whole numbers; the file is "
                        f"corrupt or not a {name} file")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _read_files(directory: Path, files: list[str], name: str, layout: dict):
    parts = [read_batch(directory / f, name, layout["label_key"]) for f in files]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    check_labels(name, labels, layout["num_classes"], str(directory))
    return images, labels


def load_cifar(name: str, root: str | None, layout: dict) -> RawDataset:
    """Load a CIFAR dataset described by ``layout`` (:data:`CIFAR10` or :data:`CIFAR100`)."""
    directory = resolve_dir(name, root, layout)
    train_x, train_y = _read_files(directory, layout["train"], name, layout)
    test_x, test_y = _read_files(directory, layout["test"], name, layout)
    return RawDataset(train_x, train_y, test_x, test_y)


def load_cifar10(root: str | None) -> RawDataset:
    """CIFAR-10 from ``root`` (``cifar-10-batches-py`` or its parent)."""
    return load_cifar("cifar10", root, CIFAR10)


def load_cifar100(root: str | None) -> RawDataset:
    """CIFAR-100 (fine labels) from ``root`` (``cifar-100-python`` or its parent)."""
    return load_cifar("cifar100", root, CIFAR100)
