"""Reader for the cropped-digits format of SVHN (``train_32x32.mat``, ``test_32x32.mat``).

Each MATLAB file holds ``X``, uint8 of shape ``(32, 32, 3, N)`` (height, width, channel, sample),
and ``y``, of shape ``(N, 1)`` with labels 1..10 where 10 stands for the digit 0. The images are
transposed to ``(N, 3, 32, 32)`` and label 10 is mapped to 0. ``extra_32x32.mat`` is not used.
There is no default location.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError
import torch

from lowbit.errors import DataError

from .base import RawDataset, check_labels

URL = "http://ufldl.stanford.edu/housenumbers/"
HINT = f"pass data.root=DIR containing train_32x32.mat and test_32x32.mat (from {URL})"


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one SVHN ``.mat`` file as ``(uint8 (N, 3, 32, 32), int64 (N,))`` tensors."""
    if not path.is_file():
        raise DataError(f"svhn: expected {path.name} in {path.parent}; {HINT}")
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError as exc:  # scipy's "use HDF reader for matlab v7.3 files, e.g. h5py": lowbit has none
        raise DataError(f"svhn: {path} is a MATLAB v7.3 (HDF5) file; lowbit reads the v5 .mat files SVHN is "
                        f"distributed as: use the original files ({URL}) or re-save with MATLAB's save -v7") from exc
    except (MatReadError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"svhn: cannot read {path} as a MATLAB file: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"svhn: {path} lacks the variables X and y of the 32x32 SVHN format")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(
            f"svhn: {path} has X of dtype {x.dtype} and shape {x.shape}, "
            f"expected uint8 (32, 32, 3, N)"
        )
    n = x.shape[3]
    if y.size != n or (y.ndim == 2 and y.shape[1] != 1):
        raise DataError(f"svhn: {path} has {n} images but y of shape {y.shape}, expected ({n}, 1)")
    y = y.reshape(n)
    if not np.all(np.mod(y, 1) == 0):
        raise DataError(f"svhn: {path} has non-integer labels in y")
    labels = torch.from_numpy(y.astype(np.int64))
    labels[labels == 10] = 0
    check_labels("svhn", labels, 10, str(path))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return images, labels


def load_svhn(root: str | None) -> RawDataset:
    """SVHN (cropped 32x32 digits, train and test) from the directory ``root``."""
    if root is None:
        raise DataError(f"svhn: no default location; {HINT}")
    directory = Path(root).expanduser()
    train_x, train_y = read_mat(directory / "train_32x32.mat")
    test_x, test_y = read_mat(directory / "test_32x32.mat")
    return RawDataset(train_x, train_y, test_x, test_y)
