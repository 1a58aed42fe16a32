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


@pytest.fixture
def c_locale():
    """The C locale's encoding (ASCII) for files opened without an encoding, as under LC_ALL=C PYTHONUTF8=0 (a
    latin-1 locale writes '±' as byte 0xB1 the same way); skipped in Python's UTF-8 mode, which ignores the locale."""
    import locale
    import sys

    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode: files are UTF-8 whatever the locale")
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        if locale.getpreferredencoding(False).replace("-", "").lower() == "utf8":
            pytest.skip("this system's C locale is UTF-8")
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
