"""Scale-Adjusted Training (002 ref. [13]): DoReFa weights rescaled to a fixed variance, and PACT
activations with the calibrated gradient of the clipping level."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Quantizer, build_quantizer, register_quantizer
from .functional import lsq_quantize

_EPS = 1e-8


def fan_out(w: Tensor) -> int:
    """n_out of a weight: out_channels·kh·kw for a conv (C_out, C_in, kh, kw), out_features for a
    linear layer (He et al.'s fan-out; torch.nn.init's ``fan_out``)."""
    return w.shape[0] * (math.prod(w.shape[2:]) if w.dim() > 2 else 1)


@register_quantizer("sat")
class SATQuantizer(Quantizer):
    """Scale-Adjusted Training (Jin, Yang, Liao 2019, "Towards Efficient Training for Neural
    Network Quantization"; 002 ref. [13], the "Scale Adjusted Training" row of 002's W3A3 table).

    * weights (SAT's constant rescaling): ``q = DoReFa_k(w)`` (the ``dorefa`` quantizer, built and
      called as is), then ``q* = q / sqrt(n_out·Var(q))`` with n_out = out_channels·kh·kw (fan-out)
      and Var the population variance over the whole tensor, so ``n_out·Var(q*) = 1``: the
      quantized layer has the variance of a He-initialised one whatever the bit width, which is
      what keeps the effective learning rate of the layer in range. The levels are DoReFa's
      levels times that per-layer constant. Gradient choice: by default the constant is treated as
      a constant (``scale_grad=False``), as in the first author's public code (AdaBits, which
      divides by ``std(weight.detach())``); ``scale_grad=True`` differentiates through Var(q) as
      the paper's formula reads. Either way the round inside DoReFa is straight-through.
    * activations (SAT's "calibrated gradient PACT"): ``y = clip(x, 0, α)`` quantized on
      α/(2^k - 1) exactly as ``pact``, with the clip α learned (``init``). PACT drops the part of
      ∂y_q/∂α that comes from the grid moving with α; SAT keeps it:
      ``∂y_q/∂α = (y_q - x)/α`` for 0 < x < α and 1 for x >= α (PACT: 0 and 1), and
      ``∂y_q/∂x = 1[0 < x < α]``. (This equals LSQ's step gradient with step α/(2^k - 1) and no
      gradient scaling, and is computed by the same fused function.) ``calibrated=False`` gives
      PACT's gradient.

    Options: ``scale_grad`` (weights only); ``init`` and ``calibrated`` (activations only).
    """

    roles = ("weight", "act")
    scales_per_row = 1  # the rescaling constant (weights) or the clip α (activations)

    def __init__(self, bits: int, role: str = "weight", scale_grad: bool | None = None,
                 init: float | None = None, calibrated: bool | None = None):
        super().__init__(bits, role)
        wrong = [n for n, v in (("scale_grad", scale_grad),) if v is not None and role == "act"]
        wrong += [n for n, v in (("init", init), ("calibrated", calibrated)) if v is not None and role == "weight"]
        if wrong:
            raise ConfigError(f"quantizer 'sat' option {', '.join(wrong)} does not apply to role '{role}'")
        if role == "weight":
            self.scale_grad = bool(scale_grad)
            self.dorefa = build_quantizer("dorefa", bits, role="weight")
        else:
            init = 6.0 if init is None else float(init)
            if not 0 < init < float("inf"):  # NaN and inf too: every output was NaN
                raise ConfigError(f"sat option init must be > 0 and finite, got {init}")
            self.calibrated = True if calibrated is None else bool(calibrated)
            self.alpha = nn.Parameter(torch.tensor(init))

    def scale(self, q: Tensor) -> Tensor:
        """1/sqrt(n_out·Var(q)) for the DoReFa output q (a 0-dim tensor)."""
        v = q if self.scale_grad else q.detach()
        var = v.var(unbiased=False)
        # a constant q (an all-zero or pruned layer, a 1x1 weight) has no variance to rescale: scale 1. Before
        # session 25 the floor 1e-8 made it 1e4 (an all-0.7 weight came out as 10000)
        return torch.where(var > 0, torch.rsqrt((fan_out(q) * var).clamp_min(_EPS)), torch.ones_like(var))

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            q = self.dorefa(x)
            c = self.scale(q)
            self.record_levels(self.dorefa.levels() * c.detach())  # same product as below: exact levels
            return q * c
        n = 2**self.bits - 1
        a = self.alpha.abs() + _EPS
        if not self.calibrated:
            return self.clip_round(x, torch.zeros((), dtype=x.dtype, device=x.device), a)
        s = a / n
        self.record_levels(torch.arange(n + 1, dtype=x.dtype, device=x.device) * s.detach().to(x.dtype))
        return lsq_quantize(x, s, 0, n, 1.0)

    def _bits_changed(self) -> None:
        if self.role == "weight":
            self.dorefa.set_bits(self.bits)

    def grid(self):
        if self.role == "act" and self.calibrated:  # LSQ's rule with step alpha/n (level 1 is s)
            s = self._last_levels[1:2].float().cpu()
            return torch.zeros(1), s, 0, 2**self.bits - 1, "mul_clip"
        return super().grid()

    def rule(self) -> str | None:
        return None  # weights: DoReFa times a constant; codes are found on the output

    def extra_repr(self) -> str:
        opt = f"scale_grad={self.scale_grad}" if self.role == "weight" else f"calibrated={self.calibrated}"
        return f"{super().extra_repr()}, {opt}"
