"""C99 for the integer-only network: generated network code on the kernels of ``runtime/``."""

from __future__ import annotations

from pathlib import Path

#: the integer runtime's kernels (package data): lowbit_rt.h, lowbit_rt.c, README.md
RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
