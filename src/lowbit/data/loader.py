"""In-memory mini-batch iterator with deterministic, resumable shuffling and augmentation.

All randomness of one epoch comes from a single ``torch.Generator`` seeded from
``(seed, epoch)``, so iterating the same epoch twice, or in a resumed process, yields identical
batches. Call :meth:`BatchLoader.set_epoch` before each epoch to get a new order/augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from lowbit.errors import ConfigError

from .base import DatasetInfo, Split
from .transforms import crop_flip, normalize


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed derived from ``(seed, epoch)``."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def _check_nonneg_int(value, what: str, positive: bool = False) -> None:
    low = 1 if positive else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{what} must be a {kind} integer, got {value!r}")


class BatchLoader:
    """Iterate over ``(x, y)`` batches of a :class:`Split`.

    ``x`` is float32 ``(B, C, H, W)`` normalised with ``info.mean``/``info.std``; ``y`` is int64
    ``(B,)``. The last batch may be smaller than ``batch_size``. With ``shuffle`` the order is a
    fresh permutation each epoch; with ``augment`` each image gets a random crop with
    ``info.crop_padding`` zero padding and, if ``info.flip``, a random horizontal flip.
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        _check_nonneg_int(batch_size, "batch_size", positive=True)
        _check_nonneg_int(seed, "seed")
        if split.images.shape[1] != info.in_channels:
            raise ConfigError(
                f"BatchLoader: split has {split.images.shape[1]} channels but info "
                f"'{info.name}' says {info.in_channels}"
            )
        self.split = split
        self.info = info
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._mean = torch.tensor(info.mean, dtype=torch.float32)
        self._std = torch.tensor(info.std, dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        _check_nonneg_int(epoch, "epoch")
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.split)
        order = torch.randperm(n, generator=generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                images = self.split.images[start : start + self.batch_size]
                labels = self.split.labels[start : start + self.batch_size].clone()
            else:
                idx = order[start : start + self.batch_size]
                images, labels = self.split.images[idx], self.split.labels[idx]
            if self.augment:
                images = crop_flip(images, self.info.crop_padding, self.info.flip, generator)
            yield normalize(images, self._mean, self._std), labels
