"""WRPN: Wide Reduced-Precision Networks (Mishra et al. 2018; ../shared/METHODS.md "WRPN").

WRPN quantizes on *fixed* ranges and buys the accuracy back with wider layers (``model.width: 2``),
not with a cleverer quantizer::

    weights, k >= 2:  w_q = round(m·clip(w, -1, 1)) / m,   m = 2^(k-1) - 1
    activations:      x_q = round(n·clip(x, 0, 1)) / n,    n = 2^k - 1

One weight bit is the sign, so the weight grid is symmetric and holds 0: 2^k - 1 levels
{-1, ..., -1/m, 0, 1/m, ..., 1} (k = 2: ternary {-1, 0, 1}). The activation grid is DoReFa's.
Backward: clipped straight-through, ``dq/dx = 1[lo <= x <= hi]`` with [lo, hi] = [-1, 1] or [0, 1].

Difference from ``qnn``: QNN puts 2^k levels on [-1, 1] (no 0 level, Δ = 2/(2^k - 1)); WRPN spends
one code on 0: 2^k - 1 levels with the step 1/m = 2/(2^k - 2), a little coarser than QNN's Δ (2 bits:
{-1, 0, 1} against QNN's {-1, -1/3, 1/3, 1}), but 0 is a level where QNN's nearest are ±Δ/2.
Difference from ``dorefa``: no tanh normalisation; small weights use only the levels near 0, and the
following BatchNorm absorbs the scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, register_quantizer
from .functional import clipped_ste


@register_quantizer("wrpn")
class WRPNQuantizer(Quantizer):
    """WRPN's fixed-range quantizer (module docstring). ``n_scales`` is 0: the ranges are fixed by
    the bit width, nothing is stored beside the codes."""

    roles = ("weight", "act")
    min_bits = 2
    scales_per_row = 0

    def _m(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "act":
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            return self.clip_round(x, zero, zero + 1)
        m = self._m()
        # the paper's formula as written (multiply by m, round, divide by m): levels() below are
        # computed with the same ops, so every output is one of them bit for bit
        k = torch.round(x.detach().clamp(-1.0, 1.0) * m)
        self.record_levels(torch.arange(-m, m + 1, dtype=x.dtype, device=x.device) / m)
        return clipped_ste(x, k / m, -1.0, 1.0)

    def domain(self, x: Tensor) -> Tensor:
        """The real value this quantizer rounds, in the units of its levels: the weight itself
        (clipped to [-1, 1] by the forward); SinReQ's regulariser reads it."""
        return x

    def grid(self):
        if self.role == "weight":  # level k = k/m, k = -m..m (0 and ±1 exact)
            m = self._m()
            return torch.zeros(1), torch.full((1,), 1.0 / m), -m, m, None
        return super().grid()

    def rule(self) -> str | None:
        # weights: k/m by division (the formula), codes are found on the output; activations: clip_div
        return None if self.role == "weight" else "nearest"
