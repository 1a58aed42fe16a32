"""Datasets for lowbit: in-memory uint8 splits and a fast, deterministic batch loader.

>>> splits = load_dataset("fashion-mnist", limit=2000)
>>> loader = BatchLoader(splits.train, splits.info, batch_size=128, shuffle=True, augment=True)
>>> loader.set_epoch(0)
>>> x, y = next(iter(loader))

Supported datasets (see :func:`list_datasets`), their format (reader module) and default root:

- ``cifar10``, ``cifar100``: pickled "python version" batches (:mod:`.cifar`); no default root.
- ``digits``: scikit-learn's bundled 8x8 digits (:mod:`.digits`); no files needed.
- ``fashion-mnist``: IDX, plain or gzipped (:mod:`.idx`); ``/usr/share/datasets/fashion-mnist``.
- ``mnist``: IDX, plain or gzipped (:mod:`.idx`); ``/usr/share/datasets/mnist``.
- ``svhn``: MATLAB ``train_32x32.mat``/``test_32x32.mat`` (:mod:`.svhn`); no default root.

Nothing is ever downloaded; a missing or malformed file raises :class:`lowbit.errors.DataError`
with a one-line message saying what was expected where and how to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from lowbit.errors import ConfigError

from .base import DatasetInfo, DataSplits, RawDataset, Split, make_splits, validate_split_args
from .cifar import load_cifar10, load_cifar100
from .digits import load_digits_dataset
from .idx import load_idx_dataset
from .loader import BatchLoader
from .svhn import load_svhn

__all__ = [
    "BatchLoader",
    "DataSplits",
    "DatasetInfo",
    "Split",
    "list_datasets",
    "load_dataset",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MNIST_ROOT = "/usr/share/datasets/mnist"


@dataclass(frozen=True)
class _Spec:
    """How to read a dataset and its fixed properties (channels and size come from the data)."""

    read: Callable[[str | None], RawDataset]
    num_classes: int
    flip: bool
    crop_padding: int


_REGISTRY: dict[str, _Spec] = {
    "cifar10": _Spec(load_cifar10, num_classes=10, flip=True, crop_padding=4),
    "cifar100": _Spec(load_cifar100, num_classes=100, flip=True, crop_padding=4),
    "digits": _Spec(load_digits_dataset, num_classes=10, flip=False, crop_padding=1),
    "fashion-mnist": _Spec(
        partial(
            load_idx_dataset,
            "fashion-mnist",
            default_root=FASHION_MNIST_ROOT,
            hint="install it with `apt-get install dataset-fashion-mnist` or pass data.root=DIR",
        ),
        num_classes=10,
        flip=True,
        crop_padding=2,
    ),
    "mnist": _Spec(
        partial(
            load_idx_dataset,
            "mnist",
            default_root=MNIST_ROOT,
            hint=f"put the 4 MNIST IDX files in {MNIST_ROOT} or pass data.root=DIR containing them",
        ),
        num_classes=10,
        flip=False,
        crop_padding=2,
    ),
    "svhn": _Spec(load_svhn, num_classes=10, flip=False, crop_padding=4),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_REGISTRY)


def load_dataset(
    name: str,
    root: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` into memory as train/val/test :class:`Split` s.

    ``root`` is the directory holding the files (``None``: the dataset's default location, if it
    has one). The validation split is ``val_fraction`` (rounded half up) of the training set,
    held out with a permutation from a generator seeded with ``seed``. ``limit`` keeps only the
    first ``limit`` training examples of that same permutation (before the validation split) and
    the first ``limit`` test examples. ``info.mean``/``info.std`` are computed on the resulting
    training split.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"unknown dataset {name!r}; expected one of {', '.join(list_datasets())}"
        )
    validate_split_args(val_fraction, seed, limit)
    spec = _REGISTRY[name]
    raw = spec.read(str(root) if root is not None else None)
    return make_splits(
        raw,
        name=name,
        num_classes=spec.num_classes,
        flip=spec.flip,
        crop_padding=spec.crop_padding,
        val_fraction=val_fraction,
        seed=seed,
        limit=limit,
    )
