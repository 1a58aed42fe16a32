"""Binary and ternary weight quantizers: BWN and TWN (003 appendix A.1 eq. 14-15)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import QuantDescription, Quantizer, channel_view, reduce_abs_mean, register_quantizer, ste


@register_quantizer("bwn")
class BWNQuantizer(Quantizer):
    """Binary Weight Network (003 eq. 14; Rastegari et al. 2016).

    ``Q(w) = β·sign(w)`` with ``β = E|w|`` and sign(0) = +1, so the levels are exactly {-β, β}.
    ``per_channel=True`` uses one β per output filter, as XNOR-Net does. Straight-through
    gradient (β is treated as a constant).
    """

    min_bits = max_bits = 1
    supports_per_channel = True
    scales_per_row = 1

    def __init__(self, bits: int = 1, role: str = "weight", per_channel: bool = False):
        super().__init__(bits, role, per_channel)

    def quantize(self, x: Tensor) -> Tensor:
        beta = reduce_abs_mean(x, self.per_channel)
        b = beta.reshape(-1)
        lv = torch.stack([-b, b], 1)  # (C, 2) per channel
        self.record_levels(lv if self.per_channel else lv[0])
        return ste(x, torch.where(x.detach() >= 0, beta, -beta))


@register_quantizer("twn")
class TWNQuantizer(Quantizer):
    """Ternary Weight Network (003 eq. 15; Li et al. 2016).

    ``δ = 0.7·E|w|``; ``β = E[|w| : |w| > δ]`` (the mean over the *kept* entries only);
    ``Q(w) = β`` if w > δ, ``-β`` if w < -δ, else 0, so the levels are exactly {-β, 0, β}.
    (003's eq. 15 writes ``x <= -δ`` for the negative side; the boundary has measure zero and we use
    the symmetric ``|w| > δ`` rule of the TWN paper.) Straight-through gradient.
    """

    min_bits = max_bits = 2
    supports_per_channel = True
    scales_per_row = 1

    def __init__(self, bits: int = 2, role: str = "weight", per_channel: bool = False):
        super().__init__(bits, role, per_channel)

    def thresholds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(δ, β) for x, per tensor or per output channel (shaped to broadcast)."""
        d = x.detach()
        delta = 0.7 * reduce_abs_mean(d, self.per_channel)
        a = d.abs()
        keep = a > delta
        if self.per_channel:
            s = (a * keep).flatten(1).sum(1)
            c = keep.flatten(1).sum(1).clamp_min(1)
            beta = channel_view(s / c, d)
        else:
            beta = (a * keep).sum() / keep.sum().clamp_min(1)
        return delta, beta

    def quantize(self, x: Tensor) -> Tensor:
        delta, beta = self.thresholds(x)
        b = beta.reshape(-1)
        lv = torch.stack([-b, torch.zeros_like(b), b], 1)  # (C, 3) per channel
        self.record_levels(lv if self.per_channel else lv[0])
        d = x.detach()
        q = torch.where(d > delta, beta, torch.where(d < -delta, -beta, torch.zeros_like(beta)))
        return ste(x, q)

    def rule(self) -> str | None:
        return None  # the threshold 0.7·E|w| is not the midpoint β/2


@register_quantizer("fp")
class FullPrecision(Quantizer):
    """The identity (32-bit float). Used inside mixtures (BinaryRelax, DQA: 'BWN, TWN, FP')."""

    roles = ("weight", "act")
    min_bits = max_bits = 32

    def __init__(self, bits: int = 32, role: str = "weight"):
        super().__init__(bits, role)

    def quantize(self, x: Tensor) -> Tensor:
        return x

    def levels(self) -> Tensor:
        raise ValueError("a full-precision quantizer has no finite level set")

    def describe(self) -> QuantDescription:
        return QuantDescription(self.bits, self.role, None, False, None, None, 0, 0, True, None, 0)

    @property
    def n_scales(self) -> int:
        return 0
