"""BinaryRelax (Yin et al. 2018) and 003's mixture form of it (003 eq. 8).

Both relax the final quantizer Q_1 (the plan's weight/act spec) with higher-precision members on a
fixed schedule::

    original (K = 2, Q_2 = FP):  q = (η·Q(w) + w) / (1 + η)
    mixture  (003 eq. 8, K = 3): q = (ω·Q_1(w) + Q_2(w) + Q_3(w)) / (ω + 2)

i.e. c = [ω, 1, ..., 1]/(ω + K - 1) with ω growing geometrically; 003 remarks that this is DQA with
a fixed attention schedule. The original form ends with a purely quantized phase (Yin et al.'s
phase II); every form is hardened into Q_1 at the end of training.

Schedule. The papers quote a growth per epoch for their own training length: Yin et al. multiply
η by 1.04 per epoch for 150 relaxed epochs and train 50 more purely quantized (their public
VGG/CIFAR-10 code: 200 epochs, phase II from epoch 150); 003 multiplies ω by 1.02 per epoch over
300 epochs. Both reach about the same end point (1.04^150 ≈ 359, 1.02^300 ≈ 380). With
``growth_epochs: paper`` (the default) that same path is spread over the relaxed part of *this*
run, per batch::

    ω(b) = ω_0 · growth^(E_ref · b / B_relax),   b = 0 .. B_relax - 1,   B_relax = (1 - hard_fraction)·B

so a 10-epoch run goes from 1 to ≈360 as a 300-epoch one does (as DQA's temperature schedule spans
the whole training whatever its length). ``growth_epochs: run`` applies the growth literally per
epoch of this run (ω = growth^epoch at each epoch start; with few epochs ω stays near 1 and the
final hardening becomes a large jump); a number sets E_ref.

Config::

    method: {name: binaryrelax, form: original}                   # η×1.04/epoch, last 25% purely Q
    method: {name: binaryrelax, form: mixture,
             mixture: [{name: minmax, bits: 4}, {name: minmax, bits: 8}]}   # 003 eq. 8, ω×1.02/epoch
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import register_method
from .mixture import MixtureMethod, ScheduledMixture, mixture_layers

#: per form: the papers' defaults (see the module docstring)
FORMS = {
    "original": {"mixture": [{"name": "fp"}], "growth": 1.04, "growth_epochs": 150, "hard_fraction": 0.25,
                 "name": "eta"},
    "mixture": {"mixture": None, "growth": 1.02, "growth_epochs": 300, "hard_fraction": 0.0, "name": "omega"},
}


@register_method("binaryrelax")
class BinaryRelax(MixtureMethod):
    """BinaryRelax: q = (ω·Q_1 + Σ_{k>1} Q_k)/(ω + K - 1), ω from ``omega0`` growing ×``growth``
    per epoch. Options:

    * ``form``: ``original`` (Yin et al.: members [FP], growth 1.04, last 25% purely quantized) or
      ``mixture`` (003 eq. 8: ``mixture`` required, growth 1.02, no pure phase);
    * ``mixture``, ``act_mixture``: members beside the plan's weight / act quantizer (act_mixture
      omitted: plain STE activations; ``[{name: fp}]`` relaxes activations the original way);
    * ``omega0`` (1), ``growth``, ``growth_epochs`` (``paper``, ``run`` or a number, see module
      docstring), ``hard_fraction`` (final fraction of the batches trained on Q_1 alone);
    * ``eval_mode``: ``final`` (evaluate Q_1 alone, as Yin et al.'s code does; default) or ``mixture``.
    """

    def __init__(self, form: str = "original", mixture: Any = None, act_mixture: Any = None, omega0: float = 1.0,
                 growth: float | None = None, growth_epochs: Any = "paper", hard_fraction: float | None = None,
                 eval_mode: str = "final", record_points: int = 33):
        if form not in FORMS:
            raise ConfigError(f"option form must be one of {', '.join(FORMS)}, got {form!r}")
        d = FORMS[form]
        if mixture is None and d["mixture"] is None:
            raise ConfigError("binaryrelax form 'mixture' needs option mixture (003 eq. 8), "
                              "e.g. [{name: minmax, bits: 4}, {name: minmax, bits: 8}]")
        super().__init__(mixture if mixture is not None else d["mixture"], act_mixture, eval_mode, record_points)
        self.form = form
        self.param_name = d["name"]
        self.omega0 = _positive("omega0", omega0)
        self.growth = _positive("growth", d["growth"] if growth is None else growth)
        if self.growth < 1:
            raise ConfigError(f"option growth must be >= 1 (the weight of Q_1 grows), got {growth}")
        if growth_epochs not in ("paper", "run"):
            _positive("growth_epochs", growth_epochs)
        self.growth_epochs = d["growth_epochs"] if growth_epochs == "paper" else growth_epochs
        hf = d["hard_fraction"] if hard_fraction is None else hard_fraction
        if isinstance(hf, bool) or not isinstance(hf, (int, float)) or not 0 <= hf < 1:
            raise ConfigError(f"option hard_fraction must be in [0, 1), got {hard_fraction!r}")
        self.hard_fraction = float(hf)
        self.omega = self.omega0
        self._mix: list[ScheduledMixture] = []

    def make_mixture(self, members):
        return ScheduledMixture(members, self.eval_mode, self.omega0)

    # -- schedule --------------------------------------------------------------------------------
    @property
    def relax_steps(self) -> int:
        """B_relax: the batches before the purely quantized phase."""
        return max(1, round((1 - self.hard_fraction) * self.total_steps)) if self.hard_fraction else self.total_steps

    def omega_at(self, step: int) -> float:
        """ω before batch ``step`` (0-based): ω_0·growth^(E_ref·step/B_relax); inf in the hard phase."""
        b_relax = self.relax_steps
        if self.hard_fraction and step >= b_relax:
            return math.inf
        if self.growth_epochs == "run":  # literal: ×growth per epoch of this run
            e = step / max(self.steps_per_epoch, 1)
        else:
            e = float(self.growth_epochs) * step / max(b_relax, 1)
        return self.omega0 * self.growth**e

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self._mix = [m for _, _, m in mixture_layers(model)]
        self._set(self.omega0)

    def _set(self, omega: float) -> None:
        self.omega = omega
        for m in self._mix:
            m.omega = omega

    def on_step(self, model: nn.Module, step: int) -> None:
        self._check_setup()
        self.step = step
        self._set(self.omega_at(step))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.step >= 0 and self.total_steps:
            self._set(self.omega_at(self.step))

    # -- reporting -------------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        """ω (η for the original form; frozen at its last relaxed value in the hard phase) and c_1,
        the weight on Q_1 (1 in the hard phase)."""
        if math.isinf(self.omega):
            last = self.omega_at(self.relax_steps - 1) if self.total_steps else self.omega0
            return {self.param_name: last, "c1": 1.0}
        k = 1 + max((len(m.members) - 1 for m in self._mix), default=1)
        return {self.param_name: self.omega, "c1": self.omega / (self.omega + k - 1)}

    def summary(self, model: nn.Module) -> dict:
        out = super().summary(model)
        ge = "per epoch of this run" if self.growth_epochs == "run" else f"spread as {self.growth_epochs:g} epochs"
        out["schedule"] = (f"{self.form} form: {self.param_name} {self.omega0:g} x{self.growth:g}/epoch ({ge}), "
                           f"last {100 * self.hard_fraction:g}% purely Q1, eval {self.eval_mode}")
        return out


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"option {name} must be a number > 0, got {v!r}")
    return float(v)
