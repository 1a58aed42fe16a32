"""Shared fixtures: a small slice of the real Fashion-MNIST, loaded once per session."""

import pytest
import torch

from lowbit.data import load_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_small():
    """1,200 training images (60 held out for validation) and 1,200 test images."""
    return load_dataset("fashion-mnist", limit=1200, val_fraction=0.05, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many small ops: one thread avoids OpenMP spinning on a shared machine
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
