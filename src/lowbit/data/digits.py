"""The 8x8 handwritten digits that ship with scikit-learn (``sklearn.datasets.load_digits``).

1797 grey images with values 0..16, scaled to uint8 0..255 by ``round(v * 255 / 16)``. There is
no official test split, so a fixed one is made: a permutation from a generator seeded with
:data:`TEST_SEED` (independent of the ``seed`` of :func:`lowbit.data.load_dataset`) puts the
first :data:`TEST_FRACTION` (rounded half up) in the test split. Nothing is read from disk beyond
the scikit-learn package, so no ``root`` is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import RawDataset, num_val

TEST_SEED = 0
TEST_FRACTION = 0.2


def fixed_test_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the fixed train and test parts of ``n`` digits."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SEED))
    k = num_val(n, TEST_FRACTION)
    return perm[k:].sort().values, perm[:k].sort().values


def load_digits_dataset(root: str | None = None) -> RawDataset:
    """The scikit-learn digits with the fixed 80/20 train/test split; ``root`` is ignored."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = fixed_test_split(len(labels))
    return RawDataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])
