"""Core data containers and the split/statistics helpers shared by every dataset.

Every dataset is held in memory as ``uint8`` image tensors of shape ``(N, C, H, W)`` and ``int64``
label tensors of shape ``(N,)``. The format readers (:mod:`.idx`, :mod:`.cifar`, :mod:`.svhn`,
:mod:`.digits`) return a :class:`RawDataset` (the official train and test sets);
:func:`make_splits` turns that into a :class:`DataSplits` with a held-out validation split and the
per-channel normalisation statistics of the training split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lowbit.errors import ConfigError, DataError


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset, as the models and the batch loader need it.

    ``mean`` and ``std`` are per channel, on pixels scaled to ``[0, 1]``, computed on the training
    split (after the validation split was held out). ``flip`` says whether a horizontal flip is a
    sensible augmentation; ``crop_padding`` is the zero padding of the random-crop augmentation.
    """

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"Split.images must be a uint8 tensor of shape (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"Split.labels must be an int64 tensor of shape (N,), "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataSplits:
    """The train, validation and test splits of a dataset and its :class:`DatasetInfo`."""

    train: Split
    val: Split
    test: Split
    info: DatasetInfo


class RawDataset(NamedTuple):
    """What a format reader returns: the official train and test sets, uint8 NCHW / int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def check_labels(name: str, labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise :class:`DataError` unless every label lies in ``[0, num_classes)``."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{name}: labels in {where} range over [{lo}, {hi}], expected 0..{num_classes - 1}; "
            f"the file is corrupt or not a {name} file"
        )


def num_val(n: int, val_fraction: float) -> int:
    """Size of the validation split: ``val_fraction * n`` rounded half up."""
    return int(math.floor(val_fraction * n + 0.5))


def split_indices(
    n: int, val_fraction: float, seed: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the official training set of the train and validation splits.

    One permutation of ``range(n)`` is drawn from a ``torch.Generator`` seeded with ``seed``;
    ``limit`` keeps its first ``limit`` entries, the first :func:`num_val` of those form the
    validation split and the rest the training split. Both index tensors are returned sorted, so
    the splits keep the dataset's original order.
    """
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    if limit is not None:
        perm = perm[:limit]
    k = num_val(len(perm), val_fraction)
    return perm[k:].sort().values, perm[:k].sort().values


def channel_stats(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` images scaled to [0, 1].

    Sums are accumulated exactly in int64 over chunks of images, so this is cheap in memory even
    for CIFAR-sized sets. A channel with zero variance gets std 1 so normalising never divides by 0.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    total_sq = torch.zeros(c, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.int64)
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        return (0.0,) * c, (1.0,) * c
    mean = total.double() / (count * 255.0)
    var = (total_sq.double() / (count * 255.0**2) - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def validate_split_args(val_fraction: float, seed: int, limit: int | None) -> None:
    """Raise :class:`ConfigError` for an out-of-range ``val_fraction``, ``seed`` or ``limit``."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 <= val_fraction < 0.5
    ):
        raise ConfigError(f"data.val_fraction must be a number in [0, 0.5), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"data.seed must be a non-negative integer, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"data.limit must be a positive integer or None, got {limit!r}")


def make_splits(
    raw: RawDataset,
    *,
    name: str,
    num_classes: int,
    flip: bool,
    crop_padding: int,
    val_fraction: float,
    seed: int,
    limit: int | None,
) -> DataSplits:
    """Hold out the validation split, apply ``limit`` and compute the :class:`DatasetInfo`."""
    train_idx, val_idx = split_indices(raw.train_images.shape[0], val_fraction, seed, limit)
    test_images, test_labels = raw.test_images, raw.test_labels
    if limit is not None:
        # clone so the split does not keep the whole official test set alive
        test_images, test_labels = test_images[:limit].clone(), test_labels[:limit].clone()
    train = Split(raw.train_images[train_idx], raw.train_labels[train_idx])
    val = Split(raw.train_images[val_idx], raw.train_labels[val_idx])
    test = Split(test_images, test_labels)
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name=name,
        in_channels=int(raw.train_images.shape[1]),
        num_classes=num_classes,
        image_size=(int(raw.train_images.shape[2]), int(raw.train_images.shape[3])),
        mean=mean,
        std=std,
        flip=flip,
        crop_padding=crop_padding,
    )
    return DataSplits(train=train, val=val, test=test, info=info)
