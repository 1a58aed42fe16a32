"""Seed 002's width-vs-precision trade-off under a fixed memory budget.

For a model family with a width knob k and a weight precision b_p, seed 002 counts inference memory
as ``Mem(k, b_p) = N_p(k)·b_p + N_a(k)·max(b_p, 4)`` (N_p parameters, N_a the largest activation;
activations at b_a = b_p if b_p > 3 else 4), and for a budget M picks

    k(b_p, M) = argmax_k Mem(k, b_p)  subject to  Mem(k, b_p) <= M

("take as many parameters as the memory budget allows for with precision b_p"). The budget is
absolute or ``M = M0 / C`` for the FP32 width-1 model's memory M0 and a compression ratio C.
N_p and N_a are measured on the built model (:func:`lowbit.cost.profile`), not estimated. Widths are
searched on a grid of 1/16 (one stem channel of a CIFAR ResNet) by bisection: Mem grows with k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..cost import mem_002, profile
from ..errors import ConfigError
from ..models import create_model

WIDTH_STEP = 1 / 16
MAX_WIDTH = 16.0  # the widest width searched


@dataclass
class BudgetChoice:
    bits: int
    act_bits: int
    width: float
    params: int
    max_act: int
    mem_bits: int
    budget_bits: float

    def to_dict(self) -> dict:
        return asdict(self)


def act_bits_for(bits: int) -> int:
    """002: b_a = b_p if b_p > 3 else 4 (32 stays 32)."""
    return bits if bits > 3 else 4


def measure(model_name: str, width: float, in_channels: int, num_classes: int, image_size) -> tuple[int, int]:
    """(N_p, N_a) of the model at this width, from one forward pass."""
    m = create_model(model_name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    s = profile(m, torch.zeros(1, in_channels, h, w))
    return s.params, s.max_act_elems


def widest_for_budget(model_name: str, bits: int, budget_bits: float, in_channels: int, num_classes: int,
                      image_size, max_width: float = MAX_WIDTH) -> BudgetChoice:
    """The widest width (multiple of 1/16, <= max_width) whose Mem(k, bits) fits the budget."""
    if not 1 <= bits <= 32:
        raise ConfigError(f"bits must be in 1..32, got {bits}")
    cache: dict[int, tuple[int, int, int]] = {}

    def mem_at(j: int) -> int:
        if j not in cache:
            n_p, n_a = measure(model_name, j * WIDTH_STEP, in_channels, num_classes, image_size)
            cache[j] = (mem_002(n_p, n_a, bits), n_p, n_a)
        return cache[j][0]

    lo, hi = 1, int(round(max_width / WIDTH_STEP))
    if mem_at(lo) > budget_bits:
        raise ConfigError(
            f"budget {budget_bits / 8 / 1024:.1f} KiB is too small for {model_name} at {bits} bits even at width "
            f"{WIDTH_STEP:g} ({mem_at(lo) / 8 / 1024:.1f} KiB)"
        )
    if mem_at(hi) <= budget_bits:
        lo = hi
    while hi - lo > 1:  # invariant: mem(lo) fits, mem(hi) does not
        mid = (lo + hi) // 2
        if mem_at(mid) <= budget_bits:
            lo = mid
        else:
            hi = mid
    mem, n_p, n_a = cache[lo]
    return BudgetChoice(bits, act_bits_for(bits), lo * WIDTH_STEP, n_p, n_a, mem, budget_bits)


def budget_table(model_name: str, bits_list: list[int], in_channels: int, num_classes: int, image_size,
                 ratio: float | None = None, budget_kib: float | None = None) -> tuple[float, list[BudgetChoice]]:
    """(M in bits, one choice per bit width) for M = M0/ratio or an absolute budget in KiB."""
    if (ratio is None) == (budget_kib is None):
        raise ConfigError("give exactly one of ratio (M = M0 / C) or budget_kib")
    if ratio is not None:
        if ratio <= 0:
            raise ConfigError(f"ratio must be > 0, got {ratio}")
        n_p, n_a = measure(model_name, 1.0, in_channels, num_classes, image_size)
        budget = mem_002(n_p, n_a, 32) / ratio
    else:
        if budget_kib <= 0:
            raise ConfigError(f"budget_kib must be > 0, got {budget_kib}")
        budget = budget_kib * 1024 * 8
    return budget, [widest_for_budget(model_name, b, budget, in_channels, num_classes, image_size) for b in bits_list]


def format_table(model_name: str, budget_bits: float, choices: list[BudgetChoice]) -> str:
    lines = [f"memory budget M = {budget_bits / 8 / 1024:.1f} KiB  ({model_name}; Mem = N_p*b_p + N_a*max(b_p, 4))",
             f"{'W bits':>6} {'A bits':>6} {'width':>8} {'params':>10} {'N_a':>8} {'Mem KiB':>9} {'Mem/M':>6}"]
    for c in choices:
        lines.append(f"{c.bits:>6} {c.act_bits:>6} {c.width:>8.4f} {c.params:>10,} {c.max_act:>8,} "
                     f"{c.mem_bits / 8 / 1024:>9.1f} {c.mem_bits / budget_bits:>6.3f}")
    capped = [str(c.bits) for c in choices if c.width >= MAX_WIDTH]
    if capped:
        lines.append(f"note: at {', '.join(capped)} bits the width stopped at the search's cap {MAX_WIDTH:g}; "
                     "the budget may allow a wider network")
    return "\n".join(lines)


def make_suite(choices: list[BudgetChoice], base: dict, seeds: list[int], name: str,
               weight: str = "lsq", act: str = "lsq") -> dict:
    """A ``lowbit bench`` suite training every choice (1-bit weights use BWN: LSQ needs >= 2)."""
    methods = {}
    for c in choices:
        label = f"W{c.bits}A{c.act_bits}" if c.bits < 32 else "FP32"
        patch: dict = {"model": {"width": c.width}}
        if c.bits < 32:
            wq = {"name": weight, "bits": c.bits} if not (weight == "lsq" and c.bits == 1) else {"name": "bwn", "bits": 1}
            patch["plan"] = {"weight": wq, "act": {"name": act, "bits": c.act_bits}}
        methods[label] = patch
    return {"name": name, "base": base, "methods": methods, "seeds": seeds,
            "reference": "FP32" if "FP32" in methods else None}
