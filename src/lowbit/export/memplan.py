"""Static memory plans: the offset of every buffer in one arena, from the ops that write and last read it
(the RAM of both C exports: :func:`lowbit.export.c_export.plan_memory`, float32 activations, and
:func:`lowbit.export.int_c.plan_arena`, packed integer codes).

    offsets, size = place({"a": (0, 2), "b": (1, 3), "c": (3, 4)}, {"a": 64, "b": 32, "c": 64})

A buffer lives from the op that writes it to its last reader, both included (so an op's output never shares a byte
with its inputs); two buffers whose lives overlap never share a byte. No arena can be smaller than the most bytes
live at once (:func:`peak`). Each buffer goes to the lowest offset free of the buffers already placed that it
overlaps (first fit), in the order they are written, largest first (TensorFlow Lite Micro's greedy memory planner)
and longest-lived first; while the best of these is above the peak, in up to :data:`SHUFFLES` seeded random
orders, stopping at the peak. Write order suits MobileNetV2's chains of growing and shrinking tensors, largest
first a ResNet's long residual streams (the W2A2 ResNet-8's integer arena: 16464 bytes in write order, 10976 =
its peak largest first); a small MobileNetV2 reaches its peak only in a shuffled order. Deterministic: the same
lives and sizes give the same plan.
"""

from __future__ import annotations

import random
from typing import Hashable, TypeVar

K = TypeVar("K", bound=Hashable)

#: random orders :func:`place` tries while its three orders leave the arena above the peak
SHUFFLES = 256


def peak(lives: dict[K, tuple[int, int]], sizes: dict[K, int]) -> int:
    """The most bytes (or elements) live at once: a lower bound of every arena."""
    steps = sorted({b for b, _ in lives.values()})
    return max((sum(sizes[k] for k, (b, e) in lives.items() if b <= i <= e) for i in steps), default=0)


def first_fit(order: list[K], lives: dict[K, tuple[int, int]], sizes: dict[K, int]) -> tuple[dict[K, int], int]:
    """Every buffer of ``order`` in turn at the lowest offset free of the buffers already placed whose lives
    overlap its own."""
    offsets: dict[K, int] = {}
    size = 0
    for k in order:
        (b, e), need = lives[k], sizes[k]
        taken = sorted((offsets[u], offsets[u] + sizes[u]) for u in offsets if lives[u][0] <= e and b <= lives[u][1])
        off = 0
        for lo, hi in taken:
            if off + need <= lo:
                break
            off = max(off, hi)
        offsets[k] = off
        size = max(size, off + need)
    return offsets, size


def place(lives: dict[K, tuple[int, int]], sizes: dict[K, int]) -> tuple[dict[K, int], int]:
    """``(offsets, arena size)`` (module docstring). ``lives``: buffer -> (first op, last op), in write order."""
    written = list(lives)
    orders = [written, sorted(written, key=lambda k: -sizes[k]),
              sorted(written, key=lambda k: lives[k][0] - lives[k][1])]  # sorted() is stable: ties stay written
    offsets, size = min((first_fit(o, lives, sizes) for o in orders), key=lambda r: r[1])  # ties: the first
    bound = peak(lives, sizes)
    rng = random.Random(0)
    for _ in range(SHUFFLES if size > bound else 0):
        o, sz = first_fit(rng.sample(written, len(written)), lives, sizes)
        if sz < size:
            offsets, size = o, sz
            if size == bound:
                break
    return offsets, size
