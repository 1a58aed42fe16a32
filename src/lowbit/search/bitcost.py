"""Cost of a per-layer weight-bit assignment (model size, 002 memory, BitOPs) and HAQ's budget wall.

The costs come from :func:`lowbit.cost.profile`. With the activation bits fixed by the plan, every
metric is linear in the searched layers' weight bits (size and 002 memory: weight elements x bits;
BitOPs: MACs x activation bits x weight bits), so :class:`BitCost` profiles the model L + 1 times
(all searched layers at 1 bit, then each layer alone at 2 bits) and evaluates any assignment as
``base + sum_l coef_l * bits_l`` exactly (tests/test_releq.py checks it against ``profile``). The size also
counts each layer's stored scales at its bits (LQ-Net stores b basis numbers per row, power-of-two sets 2^b
values), which are not linear in the bits: they are read from a copy of the layer's weight quantizer set to
those bits.

:func:`budget_wall` is HAQ's enforcement (mit-han-lab/haq, ``_final_action_wall``): while the
assignment costs more than the budget, lower the bits one step in the allowed set, from the last
layer back to the first, checking after every change, sweeping again if needed. It always returns
an assignment within a feasible budget; an infeasible budget (above even the all-minimum cost) is a
one-line error when the budget is made (:meth:`BitCost.budget`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..cost import FP_BITS, LayerBits, profile
from ..errors import ConfigError

METRICS = {"size": "size_bits", "memory": "mem_bits", "bitops": "bitops"}


@dataclass
class Budget:
    metric: str  # size | memory | bitops
    limit: float  # in bits (size, memory) or BitOPs per image

    def to_dict(self) -> dict:
        return {"metric": self.metric, "limit": self.limit}


class BitCost:
    """Linear cost model of the searched layers' weight bits, measured with ``lowbit.cost.profile``."""

    def __init__(self, model: nn.Module, layers: Sequence[str], example_input: torch.Tensor):
        from ..quantize import layer_bits, weight_param

        self.layers = list(layers)
        base_bits = layer_bits(model)
        missing = [n for n in self.layers if n not in base_bits or base_bits[n].weight is None]
        if missing:
            raise ConfigError(f"bit cost: layers {missing} have no quantized weight")
        modules = dict(model.named_modules())
        self._base_scales = {n: base_bits[n].n_scales for n in self.layers}
        # each layer's stored scales at each weight width its quantizer takes (a copy of it set to those bits, run on
        # the latent weight); a width it does not take keeps the model's count
        self._scales: dict[tuple[str, int], int] = {}
        for n in self.layers:
            m, wp = modules[n], weight_param(modules[n])
            for b in range(1, 9) if callable(getattr(wp, "set_bits", None)) else ():
                q = copy.deepcopy(wp)
                try:
                    q.set_bits(b)
                except ConfigError:
                    continue
                with torch.no_grad():
                    q(m.parametrizations.weight.original)
                self._scales[(n, b)] = q.n_scales + self._base_scales[n] - wp.n_scales  # + the input quantizer's

        def linear(assign: dict[str, int]) -> dict[str, float]:  # the scales kept at the model's bits
            bits = dict(base_bits)
            for n, b in assign.items():
                lb = base_bits[n]
                bits[n] = LayerBits(weight=b, act=lb.act, n_scales=lb.n_scales)
            s = profile(model, example_input, bits)
            return {m: float(getattr(s, attr)) for m, attr in METRICS.items()}

        def measure(assign: dict[str, int]) -> dict[str, float]:
            out = linear(assign)
            out["size"] += self._scale_bits(list(assign), list(assign.values()))
            return out

        ones = {n: 1 for n in self.layers}
        at1 = linear(ones)
        self.base = {m: at1[m] - 0.0 for m in METRICS}
        self.coef = {m: [] for m in METRICS}
        for n in self.layers:
            at2 = linear({**ones, n: 2})
            for m in METRICS:
                self.coef[m].append(at2[m] - at1[m])
        for m in METRICS:  # base = cost with every searched layer at 0 bits
            self.base[m] = at1[m] - sum(self.coef[m])
        self._measure = measure

    def _scale_bits(self, layers: Sequence[str], bits: Sequence[int]) -> float:
        """Bits of the searched layers' stored scales at ``bits`` beyond those at the model's current bits."""
        return float(FP_BITS * sum(self._scales.get((n, int(b)), self._base_scales[n]) - self._base_scales[n]
                                   for n, b in zip(layers, bits)))

    def cost(self, bits: Sequence[int], metric: str) -> float:
        if metric not in METRICS:
            raise ConfigError(f"budget metric must be one of {', '.join(METRICS)}, got '{metric}'")
        out = self.base[metric] + sum(c * b for c, b in zip(self.coef[metric], bits))
        return out + self._scale_bits(self.layers, bits) if metric == "size" else out

    def costs(self, bits: Sequence[int]) -> dict[str, float]:
        return {m: self.cost(bits, m) for m in METRICS}

    def measured(self, bits: Sequence[int]) -> dict[str, float]:
        """The same costs from a fresh ``profile`` (for checks)."""
        return self._measure({n: int(b) for n, b in zip(self.layers, bits)})

    def budget(self, metric: str, choices: Sequence[int], fraction: float | None = None,
               value: float | None = None) -> Budget:
        """A budget as a ``fraction`` of the cost at the largest bits, or an absolute ``value``
        (bits for size/memory, BitOPs per image); it must be reachable at the smallest bits."""
        if metric not in METRICS:
            raise ConfigError(f"budget.metric must be one of {', '.join(METRICS)}, got '{metric}'")
        if (fraction is None) == (value is None):
            raise ConfigError("budget: give exactly one of fraction or value")
        top = self.cost([max(choices)] * len(self.layers), metric)
        limit = fraction * top if fraction is not None else float(value)
        floor = self.cost([min(choices)] * len(self.layers), metric)
        if limit < floor:
            raise ConfigError(f"budget {metric} {limit:.4g} is below the cost at {min(choices)} bits everywhere "
                              f"({floor:.4g}); no assignment fits")
        return Budget(metric, limit)


def budget_wall(bits: Sequence[int], choices: Sequence[int], cost, budget: Budget | None) -> tuple[int, ...]:
    """HAQ's wall: lower bits (one step in ``choices``) from the last layer back until
    ``cost(bits, metric) <= budget.limit``. ``cost`` is a :class:`BitCost` (or anything with
    ``cost(bits, metric)``). Returns the assignment unchanged when it fits or there is no budget."""
    out = [int(b) for b in bits]
    if budget is None:
        return tuple(out)
    levels = sorted(set(int(c) for c in choices))
    bad = [b for b in out if b not in levels]
    if bad:
        raise ConfigError(f"bits {bad} are not in the allowed set {levels}")
    while cost.cost(out, budget.metric) > budget.limit:
        changed = False
        for i in reversed(range(len(out))):
            k = levels.index(out[i])
            if k > 0:
                out[i] = levels[k - 1]
                changed = True
                if cost.cost(out, budget.metric) <= budget.limit:
                    return tuple(out)
        if not changed:
            raise ConfigError(f"budget {budget.metric} {budget.limit:.4g} cannot be met even at the smallest bits")
    return tuple(out)
