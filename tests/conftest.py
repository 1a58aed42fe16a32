"""Shared fixtures: a small slice of the real Fashion-MNIST, loaded once per session."""

import pytest
import torch

from lowbit.data import load_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_small():
    """1,200 training images (60 held out for validation) and 1,200 test images."""
    return load_dataset("fashion-mnist", limit=1200, val_fraction=0.05, seed=0)
