"""Tests of lowbit.data: the format readers, the splits and the batch loader.

Each format is tested on tiny files written here in the real on-disk layout; the real
Fashion-MNIST (Debian package ``dataset-fashion-mnist``) is used for the split checks.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from lowbit.data import (
    BatchLoader,
    DatasetInfo,
    DataSplits,
    Split,
    list_datasets,
    load_dataset,
)
from lowbit.data.base import channel_stats, num_val, split_indices
from lowbit.data.idx import read_idx
from lowbit.errors import ConfigError, DataError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# IDX (mnist / fashion-mnist)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, 0x08, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dir(root: Path, n_train: int = 20, n_test: int = 6, seed: int = 0):
    """Write train files gzipped and test files plain; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(root / stem, array, gz=stem.startswith("train"))
    return arrays


def test_idx_header_layout_matches_spec():
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    assert data[:16] == bytes.fromhex("00000803" "00000003" "0000001c" "0000001c")
    assert idx_bytes(np.zeros(5, dtype=np.uint8))[:8] == bytes.fromhex("00000801" "00000005")


def test_read_idx_plain_and_gz(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = write_idx(tmp_path / "a-idx3-ubyte", array, gz=False)
    packed = write_idx(tmp_path / "b-idx3-ubyte", array, gz=True)
    for path in (plain, packed):
        out = read_idx(path, ndim=3)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, array)


def test_load_mnist_from_idx_files(tmp_path):
    arrays = make_idx_dir(tmp_path)
    splits = load_dataset("mnist", root=str(tmp_path), val_fraction=0.0)
    assert isinstance(splits, DataSplits)
    info = splits.info
    assert (info.name, info.in_channels, info.num_classes) == ("mnist", 1, 10)
    assert info.image_size == (28, 28)
    assert info.flip is False and info.crop_padding == 2
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.images.shape == (20, 1, 28, 28)
    assert splits.test.images.shape == (6, 1, 28, 28)
    # val_fraction 0: empty validation split, training split in file order
    assert len(splits.val) == 0 and splits.val.images.shape == (0, 1, 28, 28)
    for split, prefix in ((splits.train, "train"), (splits.test, "t10k")):
        expected_images = arrays[f"{prefix}-images-idx3-ubyte"]
        np.testing.assert_array_equal(split.images[:, 0].numpy(), expected_images)
        np.testing.assert_array_equal(split.labels.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])
    # mean/std of the training split on [0, 1] pixels
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert info.mean[0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert info.std[0] == pytest.approx(pixels.std(), abs=1e-9)


def test_mnist_limit_caps_train_and_test(tmp_path):
    arrays = make_idx_dir(tmp_path, n_train=40, n_test=10)
    splits = load_dataset("mnist", root=tmp_path, val_fraction=0.25, seed=3, limit=8)
    assert len(splits.train) + len(splits.val) == 8
    assert len(splits.val) == num_val(8, 0.25) == 2
    assert len(splits.test) == 8
    expected_test = arrays["t10k-images-idx3-ubyte"][:8]
    np.testing.assert_array_equal(splits.test.images[:, 0].numpy(), expected_test)


def test_idx_truncated_file_names_the_file(tmp_path):
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError) as exc_info:
        load_dataset("mnist", root=tmp_path)
    message = assert_one_line(exc_info)
    assert "t10k-images-idx3-ubyte" in message and "truncated" in message


def test_idx_truncated_gzip_names_the_file(tmp_path):
    make_idx_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError) as exc_info:
        load_dataset("mnist", root=tmp_path)
    assert "train-labels-idx1-ubyte.gz" in assert_one_line(exc_info)


@pytest.mark.parametrize("byte, value", [(3, 3), (2, 0x0D), (0, 1)])
def test_idx_wrong_magic_names_the_file(tmp_path, byte, value):
    """3 dimensions where labels are expected, float dtype code, non-zero leading byte."""
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[byte] = value
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc_info:
        load_dataset("mnist", root=tmp_path)
    message = assert_one_line(exc_info)
    assert "t10k-labels-idx1-ubyte" in message and "magic" in message


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), gz=False)
    with pytest.raises(DataError) as exc_info:
        load_dataset("mnist", root=tmp_path)
    message = assert_one_line(exc_info)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message


def test_idx_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as exc_info:
        load_dataset("fashion-mnist", root=tmp_path)
    message = assert_one_line(exc_info)
    assert "train-images-idx3-ubyte(.gz)" in message and str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert isinstance(exc_info.value, FileNotFoundError)


# ----------------------------------------------------------------------------------------------
# Real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_full():
    """The whole Fashion-MNIST training set in file order (val_fraction 0, no limit)."""
    return load_dataset("fashion-mnist", val_fraction=0.0)


def test_fashion_mnist_real(fashion_full):
    n = 2000
    splits = load_dataset("fashion-mnist", limit=n)  # default root, val_fraction 0.05, seed 0
    info = splits.info
    assert (info.in_channels, info.num_classes, info.image_size) == (1, 10, (28, 28))
    assert info.flip is True and info.crop_padding == 2
    assert splits.train.images.shape[1:] == (1, 28, 28)
    # validation size: 0.05 * n rounded half up
    assert len(splits.val) == num_val(n, 0.05) == 100
    assert len(splits.train) == n - 100 and len(splits.test) == n
    assert set(splits.train.labels.unique().tolist()) == set(range(10))
    assert 0.2 < info.mean[0] < 0.4 and 0.25 < info.std[0] < 0.45

    # index bookkeeping: the splits are disjoint rows of the official training set
    train_idx, val_idx = split_indices(len(fashion_full.train), 0.05, seed=0, limit=n)
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == n
    assert torch.equal(splits.train.images, fashion_full.train.images[train_idx])
    assert torch.equal(splits.train.labels, fashion_full.train.labels[train_idx])
    assert torch.equal(splits.val.images, fashion_full.train.images[val_idx])
    # and no validation image appears among the training images of this split
    train_hashes = {bytes(img.numpy()) for img in splits.train.images}
    assert not any(bytes(img.numpy()) in train_hashes for img in splits.val.images)
    # test split: first n official test examples
    assert torch.equal(splits.test.images, fashion_full.test.images[:n])

    again = load_dataset("fashion-mnist", limit=n, seed=0)
    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.val.labels, splits.val.labels)
    other = load_dataset("fashion-mnist", limit=n, seed=1)
    assert len(other.val) == 100
    assert not torch.equal(other.val.images, splits.val.images)
    assert torch.equal(other.test.images, splits.test.images)


# ----------------------------------------------------------------------------------------------
# CIFAR


def cifar_batch(n: int, num_classes: int, label_key: bytes, rng) -> dict:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).tolist()
    batch = {b"batch_label": b"testing", b"data": data, label_key: labels}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return batch


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(parent: Path) -> tuple[list[dict], dict]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = [cifar_batch(3, 10, b"labels", rng) for _ in range(5)]
    for i, batch in enumerate(train, start=1):
        write_pickle(folder / f"data_batch_{i}", batch)
    test = cifar_batch(4, 10, b"labels", rng)
    write_pickle(folder / "test_batch", test)
    return train, test


def test_cifar10_root_is_folder_or_parent(tmp_path):
    train, test = make_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        splits = load_dataset("cifar10", root=str(root), val_fraction=0.0)
        info = splits.info
        assert (info.in_channels, info.num_classes, info.image_size) == (3, 10, (32, 32))
        assert info.flip is True and info.crop_padding == 4 and len(info.mean) == 3
        assert splits.train.images.shape == (15, 3, 32, 32)
        assert splits.test.images.shape == (4, 3, 32, 32)
        expected = np.concatenate([b[b"data"] for b in train]).reshape(15, 3, 32, 32)
        np.testing.assert_array_equal(splits.train.images.numpy(), expected)
        assert splits.train.labels.tolist() == sum((b[b"labels"] for b in train), [])
        assert splits.test.labels.tolist() == test[b"labels"]


def test_cifar10_pixel_layout(tmp_path):
    train, _ = make_cifar10(tmp_path)
    # row of 3072 = 1024 red, 1024 green, 1024 blue, each 32x32 row-major
    value = int(train[0][b"data"][1, 1024 + 32 * 5 + 7])
    splits = load_dataset("cifar10", root=tmp_path, val_fraction=0.0)
    assert int(splits.train.images[1, 1, 5, 7]) == value


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    train = cifar_batch(6, 100, b"fine_labels", rng)
    train[b"fine_labels"][0] = 99
    test = cifar_batch(2, 100, b"fine_labels", rng)
    write_pickle(folder / "train", train)
    write_pickle(folder / "test", test)
    splits = load_dataset("cifar100", root=tmp_path, val_fraction=0.0)
    assert splits.info.num_classes == 100 and splits.info.in_channels == 3
    assert splits.train.labels.tolist() == train[b"fine_labels"]
    assert splits.test.images.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(splits.test.images.reshape(2, -1).numpy(), test[b"data"])


def test_cifar_missing_dir_and_no_root(tmp_path):
    with pytest.raises(DataError) as exc_info:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    message = assert_one_line(exc_info)
    assert "cifar-10-batches-py" in message and "data.root" in message
    with pytest.raises(DataError) as exc_info:
        load_dataset("cifar100")
    message = assert_one_line(exc_info)
    assert "cifar-100-python" in message and "data.root=DIR" in message


def test_cifar_incomplete_folder(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError) as exc_info:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_4" in assert_one_line(exc_info)


def test_cifar_labels_that_are_not_whole_numbers(tmp_path):
    """Before session 23, labels such as 4.7 were truncated to 4 silently; whole floats (4.0) still load."""
    train, test = make_cifar10(tmp_path)
    test[b"labels"] = [float(v) for v in test[b"labels"]]
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", test)
    assert load_dataset("cifar10", root=tmp_path).test.labels.tolist() == [int(v) for v in test[b"labels"]]
    test[b"labels"][1] += 0.7
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", test)
    with pytest.raises(DataError) as exc_info:
        load_dataset("cifar10", root=tmp_path)
    assert "test_batch has labels of dtype float64 that are not whole numbers" in assert_one_line(exc_info)


# ----------------------------------------------------------------------------------------------
# SVHN


def write_svhn(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    scipy.io.savemat(str(path), {"X": x, "y": y})


def test_svhn_layout_and_label_ten(tmp_path):
    rng = np.random.default_rng(3)
    x = np.zeros((32, 32, 3, 4), dtype=np.uint8)
    x[3, 5, 2, 1] = 255  # height 3, width 5, channel 2 of sample 1
    x[0, 31, 0, 2] = 77
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    write_svhn(tmp_path / "train_32x32.mat", x, y)
    x_test = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    write_svhn(tmp_path / "test_32x32.mat", x_test, np.array([[10], [4]], dtype=np.uint8))

    splits = load_dataset("svhn", root=tmp_path, val_fraction=0.0)
    info = splits.info
    assert (info.in_channels, info.num_classes, info.image_size) == (3, 10, (32, 32))
    assert info.flip is False
    images = splits.train.images
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert int(images[1, 2, 3, 5]) == 255 and int(images[2, 0, 0, 31]) == 77
    assert int(images.sum()) == 255 + 77
    assert splits.train.labels.tolist() == [0, 1, 9, 0]
    assert splits.test.labels.tolist() == [0, 4]
    np.testing.assert_array_equal(splits.test.images.numpy(), x_test.transpose(3, 2, 0, 1))


def test_svhn_missing(tmp_path):
    with pytest.raises(DataError) as exc_info:
        load_dataset("svhn", root=tmp_path)
    message = assert_one_line(exc_info)
    assert "train_32x32.mat" in message and str(tmp_path) in message
    with pytest.raises(DataError) as exc_info:
        load_dataset("svhn")
    assert "data.root=DIR" in assert_one_line(exc_info)


# ----------------------------------------------------------------------------------------------
# digits


def test_digits():
    splits = load_dataset("digits", val_fraction=0.1, seed=0)
    info = splits.info
    assert (info.in_channels, info.num_classes, info.image_size) == (1, 10, (8, 8))
    assert info.flip is False and info.crop_padding == 1
    assert len(splits.test) == num_val(1797, 0.2) == 359
    assert len(splits.train) + len(splits.val) == 1797 - 359
    assert splits.train.images.shape[1:] == (1, 8, 8)
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0
    assert set(splits.train.labels.tolist()) == set(range(10))
    # the test split does not depend on `seed`, the validation split does
    other = load_dataset("digits", val_fraction=0.1, seed=5)
    assert torch.equal(other.test.images, splits.test.images)
    assert torch.equal(other.test.labels, splits.test.labels)
    assert not torch.equal(other.val.images, splits.val.images)


# ----------------------------------------------------------------------------------------------
# argument errors


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "svhn"]


def test_unknown_dataset_lists_names():
    with pytest.raises(ConfigError) as exc_info:
        load_dataset("imagenet")
    message = assert_one_line(exc_info)
    assert "imagenet" in message and all(name in message for name in list_datasets())


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1, float("nan"), "0.1"])
def test_bad_val_fraction(fraction):
    with pytest.raises(ConfigError) as exc_info:
        load_dataset("digits", val_fraction=fraction)
    assert "val_fraction" in assert_one_line(exc_info)


def test_bad_limit():
    with pytest.raises(ConfigError):
        load_dataset("digits", limit=0)


# ----------------------------------------------------------------------------------------------
# BatchLoader


def synthetic(n: int = 50, channels: int = 3, size: int = 8, seed: int = 0, flip=True, padding=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n, dtype=torch.int64)  # label = row index, to track the order
    mean, std = channel_stats(images)
    info = DatasetInfo("synthetic", channels, n, (size, size), mean, std, flip, padding)
    return Split(images, labels), info


def denormalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.int64)


def test_loader_len_shapes_and_order():
    split, info = synthetic(n=10)
    loader = BatchLoader(split, info, batch_size=4)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert len(BatchLoader(split, info, batch_size=5)) == 2
    assert len(BatchLoader(split, info, batch_size=64)) == 1


def test_loader_normalisation():
    split, info = synthetic(n=64)
    x = torch.cat([x for x, _ in BatchLoader(split, info, batch_size=10)])
    per_channel_mean = x.mean(dim=(0, 2, 3))
    per_channel_std = x.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(per_channel_mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel_std, torch.ones(3), atol=1e-4)
    assert torch.equal(denormalize(x, info), split.images.to(torch.int64))


def test_loader_shuffle_deterministic_per_seed_and_epoch():
    split, info = synthetic(n=37)

    def epoch_batches(loader, epoch):
        loader.set_epoch(epoch)
        return list(loader)

    a = BatchLoader(split, info, 8, shuffle=True, augment=True, seed=7)
    b = BatchLoader(split, info, 8, shuffle=True, augment=True, seed=7)
    first = [epoch_batches(a, e) for e in range(3)]
    # a fresh loader jumping straight to epoch 2 reproduces it exactly (resume)
    resumed = epoch_batches(b, 2)
    for (x1, y1), (x2, y2) in zip(first[2], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    order = [torch.cat([y for _, y in batches]) for batches in first]
    assert sorted(order[0].tolist()) == list(range(37))
    assert not torch.equal(order[0], order[1])
    assert not torch.equal(order[0], torch.arange(37))
    other_seed = torch.cat([y for _, y in BatchLoader(split, info, 8, shuffle=True, seed=8)])
    assert not torch.equal(other_seed, order[0])


def test_augment_keeps_shape_and_crops():
    split, info = synthetic(n=40, flip=False, padding=2)
    loader = BatchLoader(split, info, 16, augment=True, seed=1)
    out = torch.cat([x for x, _ in loader])
    assert out.shape == (40, 3, 8, 8)
    pixels = denormalize(out, info)
    assert not torch.equal(pixels, split.images.to(torch.int64))
    # each output is a window of the zero-padded input at some offset in [0, 2 * padding]
    padded = torch.nn.functional.pad(split.images.to(torch.int64), (2, 2, 2, 2))
    shifted = 0
    for i in range(40):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], pixels[i])]
        assert windows, f"image {i} is not a crop of its padded input"
        shifted += (2, 2) not in windows
    assert shifted > 20


def test_augment_flip_flips():
    split, info = synthetic(n=64, flip=True, padding=0)
    out = denormalize(torch.cat([x for x, _ in BatchLoader(split, info, 64, augment=True)]), info)
    original = split.images.to(torch.int64)
    same = [torch.equal(out[i], original[i]) for i in range(64)]
    flipped = [torch.equal(out[i], original[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54 and 10 < sum(same) < 54


def test_augment_digits_real_batch():
    splits = load_dataset("digits")
    loader = BatchLoader(splits.train, splits.info, 128, shuffle=True, augment=True)
    x, y = next(iter(loader))
    assert x.shape == (128, 1, 8, 8) and y.shape == (128,)
    assert torch.isfinite(x).all()
    # padding pixels are pixel value 0, i.e. -mean/std after normalisation
    assert x.min().item() == pytest.approx(-splits.info.mean[0] / splits.info.std[0], rel=1e-5)


def test_loader_bad_arguments():
    split, info = synthetic(n=5)
    with pytest.raises(ConfigError):
        BatchLoader(split, info, batch_size=0)
    loader = BatchLoader(split, info, batch_size=2)
    with pytest.raises(ConfigError):
        loader.set_epoch(-1)


def test_budget_and_svhn_session25(tmp_path, capsys):
    """Session 25 (a data engineer): `lowbit budget --dataset cifar10` said "pass data.root=DIR" but had no way to
    pass it (now --root, also written into the emitted suite); an SVHN .mat saved as MATLAB v7.3 passed on scipy's
    advice to use h5py, which lowbit does not read."""
    import yaml

    from lowbit.cli import main

    make_cifar10(tmp_path)
    suite = tmp_path / "s.yaml"
    assert main(["budget", "--dataset", "cifar10", "--root", str(tmp_path), "--model", "resnet8", "--bits", "2", "32",
                 "--ratio", "8", "--emit", str(suite)]) == 0
    assert yaml.safe_load(suite.read_text())["base"]["data"]["root"] == str(tmp_path)
    capsys.readouterr()
    (tmp_path / "svhn").mkdir()
    header = b"MATLAB 7.3 MAT-file".ljust(116, b" ") + bytes(8) + b"\x00\x02IM"  # version 0x0200: v7.3
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(header.ljust(512, b"\x00") + b"\x89HDF\r\n\x1a\n")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"x")
    with pytest.raises(DataError, match=r"is a MATLAB v7.3 \(HDF5\) file; lowbit reads the v5 .mat files"):
        load_dataset("svhn", root=str(tmp_path / "svhn"))


def test_a_cifar_pickle_cannot_run_code(tmp_path):
    """Session 25: CIFAR batches were read with pickle.load, so a batch from an untrusted source could name any
    callable and run it; the reader now builds numpy arrays, lists, dicts and strings only."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_pickle(folder / f, {b"data": Evil(), b"labels": [0]})
    with pytest.raises(DataError, match=r"refers to (posix|nt)\.system, which a CIFAR batch never does"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()
