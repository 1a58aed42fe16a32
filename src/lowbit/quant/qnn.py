"""Quantized Neural Networks: fixed-range linear quantization (002 ref. [11])."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, register_quantizer
from .bnn import binary_sign
from .functional import clip_round, clip_round_grid, clip_round_levels


@register_quantizer("qnn")
class QNNQuantizer(Quantizer):
    """Quantized Neural Networks (Hubara et al. 2016, "Quantized Neural Networks: Training Neural
    Networks with Low Precision Weights and Activations"; 002 ref. [11], the "Quantized NN" row of
    002's W3A3 table): linear quantization on a *fixed* range, with no data-dependent or learned scale.

    * weights: ``q = -1 + round((clip(w, -1, 1) + 1)/Δ)·Δ``, Δ = 2/(2^k - 1): 2^k evenly spaced
      levels in [-1, 1] (no 0 level: {-1, -1/3, 1/3, 1} at k = 2). At k = 1 this is BinaryNet's
      sign(w) (sign(0) = +1), the ``bnn`` rule (:func:`lowbit.quant.bnn.binary_sign`).
    * activations: ``q = round(clip(x, 0, 1)·(2^k - 1))/(2^k - 1)``: 2^k levels in [0, 1].
    * backward: clipped straight-through, ``dq/dx = 1[lo <= x <= hi]`` with [lo, hi] = [-1, 1]
      (weights) or [0, 1] (activations).

    Difference from DoReFa (``dorefa``): DoReFa first normalises the weights,
    ``tanh(w)/(2·max|tanh(w)|) + 1/2``, so the largest weight always reaches ±1 and every level is
    used whatever the weight magnitude; QNN clips the raw weight, so a layer whose weights are
    small (e.g. He-initialised, |w| << 1) uses only the levels nearest 0 and the following
    BatchNorm must absorb the scale. The activation side is the same as DoReFa's.
    """

    roles = ("weight", "act")
    scales_per_row = 0  # the range is fixed by the bit width

    def __init__(self, bits: int, role: str = "weight"):
        super().__init__(bits, role)
        lo = -1.0 if role == "weight" else 0.0
        self.register_buffer("low", torch.tensor(lo), persistent=False)
        self.register_buffer("high", torch.tensor(1.0), persistent=False)

    def quantize(self, x: Tensor) -> Tensor:
        if self._is_sign():  # 1-bit weights: round-half-to-even would send 0 to -1
            q, levels = binary_sign(x)
            self.record_levels(levels)
            return q
        lo, hi = self.low.to(x.dtype), self.high.to(x.dtype)
        self.record_levels(clip_round_levels(lo, hi, self.bits))
        return clip_round(x, lo, hi, self.bits)

    def _is_sign(self) -> bool:
        return self.role == "weight" and self.bits == 1

    def grid(self):
        if self._is_sign():
            one = torch.ones(1)
            return -one, 2 * one, 0, 1, "nearest"
        low, step = clip_round_grid(self.low, self.high, self.bits)
        return low, step, 0, 2**self.bits - 1, "clip_div"
