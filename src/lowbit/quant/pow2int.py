"""Integer codes with one shared power-of-two exponent: the number format of NITI.

``pow2int`` (weights, 2-8 bits): ``w_q = k · 2^e``, ``k`` an integer in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
(symmetric: 255 levels at 8 bits, 15 at 4 bits) and ``e = ceil(log2 max|w|) - (b - 1)`` one integer per
tensor, so the largest weight has a code in ``(2^(b-2), 2^(b-1)]`` (clipped to ``2^(b-1) - 1``).
Dividing by ``2^e`` is exact in float32, so the code rule is LSQ's ``mul_clip``
(``k = rint(clamp(w · 2^-e, -qmax, qmax))``) and export stores the levels as a lattice ``k · 2^e``.

NITI (Wang et al., TPDS 2022; wangmaolin/niti ``weight_quant``) initialises its int8 weights this way
and keeps them as ``(int8 codes, exponent)`` while training (:mod:`lowbit.methods.niti`); as a plain
QAT quantizer (straight-through, clipped) it is a symmetric uniform grid whose step is a power of two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Quantizer, register_quantizer
from .functional import clipped_ste


def pow2_exponent(max_abs: float, bits: int) -> int:
    """``ceil(log2 max_abs) - (bits - 1)``: the exponent that puts ``max_abs`` on a code of at most
    ``2^(bits-1)`` (0 for an all-zero tensor)."""
    if not max_abs > 0 or not math.isfinite(max_abs):
        return 0
    return math.ceil(math.log2(max_abs)) - (bits - 1)


@register_quantizer("pow2int")
class Pow2IntQuantizer(Quantizer):
    """``k · 2^e`` with ``|k| <= 2^(b-1) - 1`` and one integer exponent ``e`` per tensor (NITI's format).

    Forward: ``e`` from ``max|w|`` (:func:`pow2_exponent`), ``k = rint(clamp(w · 2^-e, -qmax, qmax))``;
    backward: straight-through inside ``[-qmax·2^e, qmax·2^e]``. :meth:`set_exponent` fixes ``e``
    (NITI's weights keep the exponent they were initialised with)."""

    roles = ("weight",)
    min_bits = 2
    max_bits = 8
    scales_per_row = 1  # the exponent

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False):
        super().__init__(bits, role, per_channel)
        self.fixed_exp: int | None = None
        self.exp = 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def set_exponent(self, e: int | None) -> None:
        self.fixed_exp = None if e is None else int(e)

    def _record(self, e: int, dtype=torch.float32, device=None) -> None:
        self.exp = int(e)
        k = torch.arange(-self.qmax, self.qmax + 1, dtype=dtype, device=device)
        self.record_levels(torch.ldexp(k, torch.tensor(self.exp, dtype=dtype, device=device)))

    def quantize(self, x: Tensor) -> Tensor:
        e = self.fixed_exp if self.fixed_exp is not None else pow2_exponent(x.detach().abs().max().item(), self.bits)
        self._record(e, x.dtype, x.device)
        step, inv = 2.0**e, 2.0**-e
        q = torch.clamp(x.detach() * inv, -self.qmax, self.qmax).round_().mul_(step)
        return clipped_ste(x, q, -self.qmax * step, self.qmax * step)

    def grid(self):
        step = torch.tensor([2.0**self.exp], dtype=torch.float32)
        return torch.zeros_like(step), step, -self.qmax, self.qmax, "mul_clip"
