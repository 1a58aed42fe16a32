"""Binarized Neural Networks: sign(x) for weights and activations (002 ref. [4], BinaryNet)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, register_quantizer
from .functional import clipped_ste


@register_quantizer("bnn")
class BNNQuantizer(Quantizer):
    """BinaryNet (Courbariaux, Hubara et al. 2016; 002 ref. [4], the "Binarized NN (1 bit)" row of
    002's W3A3 table): ``Q(x) = sign(x) ∈ {-1, +1}`` with sign(0) = +1, and no scale.

    Backward: the straight-through estimator with the hardtanh clip of the paper (their eq. 4),
    ``dQ/dx = 1[|x| <= 1]`` (inclusive at ±1), for weights and activations alike.

    The levels are the constant set {-1, +1}: a following BatchNorm absorbs the magnitude, so
    nothing besides the sign bit is stored (``n_scales = 0``).

    As an *activation* quantizer it needs signed inputs: after a ReLU every input is >= 0 and maps
    to +1. Use a network whose activation in front of the quantizer is hardtanh (or the identity),
    e.g. ``model: {name: resnet20, activation: hardtanh}``.
    """

    roles = ("weight", "act")
    min_bits = max_bits = 1
    scales_per_row = 0

    def __init__(self, bits: int = 1, role: str = "weight"):
        super().__init__(bits, role)

    def quantize(self, x: Tensor) -> Tensor:
        q, levels = binary_sign(x)
        self.record_levels(levels)
        return q

    def grid(self):
        one = torch.ones(1)
        return -one, 2 * one, 0, 1, "nearest"  # levels -1 + 2k, k = 1[x >= 0]


def binary_sign(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sign(x) in {-1, +1} with sign(0) = +1 and the clipped STE 1[|x| <= 1], the levels [-1, 1]);
    constants on x's device and dtype. Shared by ``bnn`` and 1-bit ``qnn`` weights."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    d = x.detach()
    q = torch.where(d >= 0, one, torch.where(d < 0, -one, d))  # NaN stays NaN (it was -1: a finite loss on NaN data)
    return clipped_ste(x, q, -1.0, 1.0), torch.stack([-one, one])
