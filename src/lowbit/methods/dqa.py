"""DQA: DNN quantization with attention (seed 003, Algorithm 1).

Each quantized layer mixes K quantizers sorted by bits, Q_1 (the plan's final quantizer) first::

    q = Σ_k a_k Q_k(w)                          003 eq. 2-3
    a = softmax(α / T(b))                       003 eq. 4
    T(b) = T(0)·ψ^b,  ψ = exp(log(T(B)/T(0))/B) 003 eq. 5 and Algorithm 1, b = 1..B over all batches
    α_k(init) = Σ_{j≠k} n_j / Σ_j n_j           003 eq. 7
    loss += Σ_layers λ·gᵀa / S                  003 eq. 6, S = number of weights of the network

and before every batch α ← α/std(α) (Algorithm 1). T falls from 100 to 0.03 over the whole
training, so the attention moves from a near-uniform mixture to one quantizer; eq. 7 and the
penalty g = [1, 4, 16] make that quantizer Q_1. ``finalize`` hardens every layer into Q_1 and the
run summary checks the result (<= 2^n_1 distinct weight values per layer).

Config (the plan's ``weight``/``act`` spec is Q_1; ``mixture`` / ``act_mixture`` the higher members)::

    plan:
      weight: {name: minmax, bits: 2}
      act: {name: minmax, bits: 2}
      method: {name: dqa, mixture: [{name: minmax, bits: 4}, {name: minmax, bits: 8}],
               act_mixture: [{name: minmax, bits: 4}, {name: minmax, bits: 8}],
               lam: 5, g: [1, 4, 16], t0: 100, t_end: 0.03}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..plan import QUANTIZABLE
from .base import register_method
from .mixture import AttentionMixture, MixtureMethod, mixture_layers


def _number(name: str, v: Any, low: float, strict: bool = True) -> float:
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or (v <= low if strict else v < low):
        raise ConfigError(f"option {name} must be a number {'>' if strict else '>='} {low:g}, got {v!r}")
    return float(v)


def temperature(b: int, t0: float, t_end: float, total: int) -> float:
    """T(b) = T(0)·ψ^b with ψ = exp(log(T(B)/T(0))/B) (003 eq. 5, Algorithm 1): T(0) at b = 0,
    T(B) at b = B."""
    psi = math.exp(math.log(t_end / t0) / total)
    return t0 * psi**b


def network_weights(model: nn.Module) -> int:
    """S of 003 eq. 6: the number of weights of the whole network (every conv/linear weight, the
    full-precision first and last layers included; biases and BatchNorm are not weights)."""
    n = 0
    for m in model.modules():
        if isinstance(m, QUANTIZABLE):
            p = getattr(m, "parametrizations", None)
            n += (p.weight.original if p is not None and "weight" in p else m.weight).numel()
    return n


@register_method("dqa")
class DQA(MixtureMethod):
    """DNN Quantization with Attention (003 Algorithm 1). Options:

    * ``mixture``: the quantizers beside the plan's weight quantizer (Q_1), e.g.
      ``[{name: minmax, bits: 4}, {name: minmax, bits: 8}]`` or ``[{name: twn}, {name: fp}]``;
    * ``act_mixture``: the same for the plan's activation quantizer (omit: plain STE activations);
    * ``lam`` (λ, 003 Tables 1-4 use 0.5-30), ``g`` (penalty vector, default [1, 4, 16]: 4^(k-1)),
      ``t0`` = T(0) = 100, ``t_end`` = T(B) = 0.03;
    * ``eval_mode``: ``final`` (evaluate Q_1 alone, default) or ``mixture``;
    * ``record_points``: points of the quantization function recorded per layer and epoch (Fig. 3).
    """

    def __init__(self, mixture: Any = None, act_mixture: Any = None, lam: float = 5.0, g: Any = None,
                 t0: float = 100.0, t_end: float = 0.03, eval_mode: str = "final", record_points: int = 33):
        super().__init__(mixture, act_mixture, eval_mode, record_points)
        if self.mixture is None:
            raise ConfigError("method 'dqa' needs option mixture: the quantizers beside plan.weight, "
                              "e.g. [{name: minmax, bits: 4}, {name: minmax, bits: 8}]")
        self.lam = _number("lam", lam, 0.0, strict=False)
        self.t0 = _number("t0", t0, 0.0)
        self.t_end = _number("t_end", t_end, 0.0)
        if self.t_end >= self.t0:
            raise ConfigError(f"option t_end must be below t0 (the temperature cools down), got t0={t0}, t_end={t_end}")
        k_max = 1 + max(len(self.mixture), len(self.act_mixture or []))
        if g is None:
            g = [4.0**k for k in range(k_max)]
        if (not isinstance(g, (list, tuple)) or len(g) < k_max
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in g)):
            raise ConfigError(f"option g must be a list of {k_max} numbers (one per quantizer, Q_1 first), got {g!r}")
        self.g = [float(v) for v in g]
        self.temperature = self.t0
        self.S = 0
        self._att: list[AttentionMixture] = []

    def make_mixture(self, members):
        return AttentionMixture(members, self.eval_mode, self.t0)

    # -- schedule --------------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self.S = network_weights(getattr(model, "whole_network", model))  # a DCQ section: the whole student's
        self._att = [m for _, _, m in mixture_layers(model)]
        self._set_temperature(self.t0)

    def _set_temperature(self, t: float) -> None:
        self.temperature = t
        for m in self._att:
            m.temperature = t

    def on_step(self, model: nn.Module, step: int) -> None:
        """Algorithm 1 for batch b = step + 1: T(b) ← T(0)ψ^b, then α ← α/std(α) in every layer."""
        self._check_setup()
        self.step = step
        self._set_temperature(temperature(step + 1, self.t0, self.t_end, self.total_steps))
        for m in self._att:
            m.normalize_()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.step >= 0 and self.total_steps:
            self._set_temperature(temperature(self.step + 1, self.t0, self.t_end, self.total_steps))

    # -- penalty ---------------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """Σ_layers λ·gᵀa/S (003 eq. 6), over every attention vector (weights and activations)."""
        if self.lam == 0 or not self._att:
            return None
        total = None
        for m in self._att:
            a = m.attention()
            g = torch.tensor(self.g[: len(a)], dtype=a.dtype, device=a.device)
            r = torch.dot(g, a)
            total = r if total is None else total + r
        return total * (self.lam / self.S)

    # -- reporting -------------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        return {"temperature": self.temperature}

    def summary(self, model: nn.Module) -> dict:
        out = super().summary(model)
        over = f"{self.total_steps} batches" if self.total_steps else "the whole training"
        out["schedule"] = (f"T {self.t0:g} -> {self.t_end:g} over {over}, lam {self.lam:g}, "
                           f"g {[round(v, 6) for v in self.g]}, eval {self.eval_mode}")
        return out
