"""Reader for the IDX format of MNIST and Fashion-MNIST.

An IDX file is a big-endian header followed by raw data::

    bytes 0-1  zero
    byte  2    dtype code (0x08 = unsigned byte, the only one these datasets use)
    byte  3    number of dimensions d
    4*d bytes  the size of each dimension, uint32 big-endian
    then       prod(sizes) data bytes

Images are ``(N, 28, 28)`` (magic ``0x00000803``), labels ``(N,)`` (magic ``0x00000801``). Each of
the four files may be stored plain or gzipped (``.gz``), as the Debian package
``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import DataError

from .base import RawDataset, check_labels

UBYTE = 0x08
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


def find_file(directory: Path, stem: str, name: str, hint: str) -> Path:
    """Return ``directory/stem`` or ``directory/stem.gz``; :class:`DataError` if neither exists."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{name}: expected {stem}(.gz) in {directory}; {hint}")


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file with ``ndim`` dimensions into a uint8 array.

    Raises :class:`DataError` naming the file when the magic number, the dtype code, the number
    of dimensions or the data length does not match the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, shorter than its header")
    zero, code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or code != UBYTE or dims != ndim:
        expected = 0x0800 | ndim
        raise DataError(
            f"IDX file {path} has magic number 0x{int.from_bytes(data[:4], 'big'):08x}, "
            f"expected 0x{expected:08x} (unsigned bytes, {ndim} dimension(s)); "
            f"it is not an IDX file of this kind"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_len:
        state = "truncated" if len(data) < expected_len else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {state}: {len(data)} bytes, header {shape} needs {expected_len}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def _read_pair(directory: Path, images_stem: str, labels_stem: str, name: str, hint: str):
    """Read one images/labels pair as ``(uint8 (N,1,H,W), int64 (N,))`` tensors."""
    images_path = find_file(directory, images_stem, name, hint)
    labels_path = find_file(directory, labels_stem, name, hint)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name}: {images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; one of the files is corrupt"
        )
    labels_t = torch.from_numpy(labels).to(torch.int64)
    check_labels(name, labels_t, 10, str(labels_path))
    return torch.from_numpy(images).unsqueeze(1), labels_t


def load_idx_dataset(name: str, root: str | None, default_root: str, hint: str) -> RawDataset:
    """Load the four IDX files of an MNIST-like dataset from ``root`` (or ``default_root``).

    ``hint`` ends the error message for a missing file and says how to get the data.
    """
    directory = Path(root if root is not None else default_root).expanduser()
    train_x, train_y = _read_pair(directory, TRAIN_IMAGES, TRAIN_LABELS, name, hint)
    test_x, test_y = _read_pair(directory, TEST_IMAGES, TEST_LABELS, name, hint)
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DataError(
            f"{name}: train images are {tuple(train_x.shape[2:])} but test images are "
            f"{tuple(test_x.shape[2:])} in {directory}; the files come from different datasets"
        )
    return RawDataset(train_x, train_y, test_x, test_y)
