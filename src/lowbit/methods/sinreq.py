"""SinReQ and SINAREQ: sinusoidal regularisation towards a quantizer's levels (seed 001).

**SinReQ** (fixed bits) adds to the task loss, over the quantized layers l::

    R_l = mean_i sin²(π·((u_i - c_l)/Δ_l + h_l))                       001 (SinReQ abstract)
    loss = task + λ_q(t)·Σ_l R_l
    λ_q(t) = strength·½·(1 + tanh((t - warmup·E)/tau))                 authors' code: warmup 0.2, tau 20

``u`` is the latent weight *in the quantizer's own domain*, the value the quantizer rounds (DoReFa:
tanh(w)/max|tanh w|; WRPN: clip(w, -1, 1); SAWB, min-max, LSQ: w), clipped to the grid's range;
``c`` is the centre of the grid, ``Δ`` its step, ``h = ½`` when the grid has an even number of
levels (no level at the centre: 0 is not a level of a symmetric grid) and 0 otherwise. So R is
exactly 0 on every level and 1 half-way between two. For DoReFa this is the issue's
sin²(π·r/Δ) on r = tanh(w)/(2·max|tanh w|) + ½ with Δ = 1/(2^k - 1); for a symmetric 2^k-level
grid it is the "shift Δ/2 for grids without a zero level". Everything comes from the quantizer's
:meth:`~lowbit.quant.Quantizer.describe` (``low``, ``step``, ``qmin``, ``qmax``) and, for families
that round a transformed weight (``rule`` None), its ``domain(w)`` method; no class is named here.
``t`` is the epoch as a real number (step / steps per epoch), ``E`` the number of epochs.

``domain: raw`` is the authors' code instead: u = the raw latent w, c = 0, Δ = 1/(2^b - 1) for grids
with a 0 level and Δ = 1/(2^b - 0.5) with h = ½ otherwise (their "DoReFa form"). That regularises the
wrong variable for DoReFa (it quantizes tanh-normalised weights) and 1/(2^b - 0.5) is the DoReFa step
of b + 1 bits (../shared/METHODS.md). Default ``quantizer``: the only choice whose zeros are the
levels the forward pass actually uses.

**SINAREQ** (learned bits) gives every quantized layer a real β_l ("the bits", a parameter of the
layer's weight parametrization, so checkpoints carry it), initialised at the plan's weight bits::

    Δ_l(β) = span_l / (n_l + 2^β - 2^b)     (= 1/(2^β - 1) on the unit range of a 2^b-level grid)
    R_l(β) = mean_i sin²(π·((u_i - c_l)/Δ_l(β) + h_l)) / 2^β          authors' learned-bits form
    loss = task + λ_q(t)·Σ_l R_l(β_l) + λ_f·Σ_l β_l                   λ_f = 0.03 (authors)

(n_l = qmax - qmin, b the integer bits in use). β lives in its own parameter group without weight
decay (``bits_lr`` its learning rate, default the optimizer's), is clamped to ``bits: [lo, hi]`` after
every step, and the layer quantizes at ceil(β) bits throughout (``lowbit.set_bits`` whenever that
changes), so every validated epoch and checkpoint is the network at its own bits. ``finetune_epochs``
F > 0 freezes β after epoch E - F (rounded up, bits fixed) and trains the last F epochs of the same
``fit`` at those bits with the fixed-bit SinReQ term. ``finalize`` rounds up and applies the bits
(also to a model rebuilt from a checkpoint: ``lowbit eval``, ``lowbit info``, the exporters).

Config::

    plan:
      weight: {name: dorefa, bits: 4}
      act: {name: dorefa, bits: 4}
      method: {name: sinreq, strength: 1.0}              # domain: quantizer | raw
    # or, learned bits from 8 down (plan bits = β's start):
      weight: {name: dorefa, bits: 8}
      method: {name: sinareq, lam_f: 0.03, bits: [2, 8], finetune_epochs: 2}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant import Quantizer
from ..quant.functional import channel_view
from .base import Method, QuantizedWeight, build_from_spec, register_method

DOMAINS = ("quantizer", "raw")
#: β within this of an integer rounds to it (float noise must not cost a whole bit)
ROUND_TOL = 1e-4


def _number(name: str, v: Any, low: float, strict: bool = False) -> float:
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or (v <= low if strict else v < low):
        raise ConfigError(f"option {name} must be a number {'>' if strict else '>='} {low:g}, got {v!r}")
    return float(v)


def lam_schedule(t: float, epochs: int, warmup: float = 0.2, tau: float = 20.0) -> float:
    """½·(1 + tanh((t - warmup·E)/tau)) (authors' code; t in epochs): ½ at t = warmup·E, rising
    towards 1 over a few tau. With tau = 20 and a short run it stays near ½·(1 - tanh(warmup·E/20))."""
    return 0.5 * (1.0 + math.tanh((t - warmup * epochs) / tau))


def round_up_bits(beta: float, lo: int, hi: int) -> int:
    """ceil(β) within [lo, hi]; β within :data:`ROUND_TOL` above an integer rounds down to it."""
    return int(min(max(math.ceil(beta - ROUND_TOL), lo), hi))


# ---------------------------------------------------------------------------------------------
# a layer's grid in the regulariser's domain
# ---------------------------------------------------------------------------------------------
def sin_grid(q: Quantizer, w: Tensor, bits: Tensor | float | None = None, domain: str = "quantizer"):
    """``(u, c, Δ, h)`` for R = mean sin²(π((u - c)/Δ + h)): ``u`` the weight in the domain
    (clipped to the grid), ``c`` the grid's centre, ``Δ`` its step at ``bits`` (a real β, or the
    quantizer's own bits when None), ``h`` 0 or ½. c and Δ broadcast against ``w`` (per channel: one
    per output channel). The quantizer must have been called since its last change (its levels)."""
    try:
        d = q.describe()
    except RuntimeError:
        raise ConfigError(f"sinreq: call the model once before reading quantizer '{q.alias}' (no levels yet)") from None
    if not d.uniform or d.levels is None:
        raise ConfigError(f"sinreq: quantizer '{q.alias}' at {d.bits} bits has no uniform grid (dorefa, wrpn, sawb, "
                          "minmax, lsq and qnn have one at 2 bits and more); with sinareq, raise the lower end of "
                          "plan.method.bits, since the learned bits visit every value in that range")
    n = d.qmax - d.qmin  # steps of the grid at the integer bits in use
    h = 0.5 if (n + 1) % 2 == 0 else 0.0  # even level count: no level at the centre
    if domain == "raw":  # the authors' code: raw w, Δ = 1/(2^b - 1) (0 level) or 1/(2^b - 0.5), shift Δ/2
        b = float(d.bits) if bits is None else bits
        return w, 0.0, 1.0 / (2.0**b - (1.0 if h == 0 else 0.5)), h
    fn = getattr(q, "domain", None)
    if fn is None and d.rule is None:
        raise ConfigError(f"sinreq: quantizer '{q.alias}' rounds a transformed weight but has no domain() "
                          "saying which; it cannot be regularised in its own domain (domain: raw works)")
    u = fn(w) if fn is not None else w
    low, step = d.low.to(w.device, w.dtype), d.step.to(w.device, w.dtype)
    if low.numel() > 1:
        low, step = channel_view(low, w), channel_view(step, w)
    else:
        low, step = low.reshape(()), step.reshape(())
    lo, hi = low + d.qmin * step, low + d.qmax * step
    u = torch.minimum(torch.maximum(u, lo), hi)
    if bits is not None:
        step = (hi - lo) / (n + 2.0**bits - 2.0**d.bits)
    return u, (lo + hi) / 2, step, h


def sin_penalty(u: Tensor, c, step, h: float) -> Tensor:
    """mean sin²(π((u - c)/Δ + h)): 0 on every level, 1 half-way between two."""
    return torch.sin(math.pi * ((u - c) / step + h)).pow(2).mean()


def latent_weight(module: nn.Module) -> Tensor:
    """The trained (unquantized) weight of a parametrized layer."""
    return module.parametrizations.weight.original


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, layer, weight parametrization) of every layer whose weight the plan quantizes: not integer mode's
    own 8-bit ends, which take plain STE quantizers (the regulariser and the learned bits are the plan's)."""
    from ..quantize import quant_state, weight_param

    state = quant_state(model)
    ends = {lp.name for lp in state.layers if "weight" in lp.integer_roles} if state is not None else set()
    return [(n, m, weight_param(m)) for n, m in model.named_modules() if weight_param(m) is not None and n not in ends]


@torch.no_grad()
def quantization_error(model: nn.Module, domain: str = "quantizer") -> dict[str, float]:
    """Per quantized layer, mean |u - Q(u)|/Δ: the distance of the latent weights from their
    nearest level in steps, in the quantizer's domain (0: every weight on a level; 0.25: weights
    spread evenly between the levels; at most 0.5). Quantizers whose grid is not uniform are skipped."""
    out = {}
    for name, m, wp in quantized_layers(model):
        q = getattr(wp, "quantizer", None)
        try:
            u, c, step, h = sin_grid(q, latent_weight(m), domain=domain)
        except (ConfigError, AttributeError):
            continue
        p = (u - c) / step + h  # levels at integer p
        out[name] = float((p - torch.round(p)).abs().mean())
    return out


# ---------------------------------------------------------------------------------------------
# SinReQ: fixed bits
# ---------------------------------------------------------------------------------------------
@register_method("sinreq")
class SinReQ(Method):
    """SinReQ (001): straight-through QAT with the plan's quantizers plus λ_q(t)·Σ_l R_l (module
    docstring). Options: ``strength`` (λ_q's factor, default 1), ``domain`` (``quantizer`` default,
    or ``raw``: the authors' code), ``warmup`` (0.2) and ``tau`` (20 epochs) of the schedule."""

    def __init__(self, strength: float = 1.0, domain: str = "quantizer", warmup: float = 0.2, tau: float = 20.0):
        super().__init__()
        self.strength = _number("strength", strength, 0.0)
        if domain not in DOMAINS:
            raise ConfigError(f"option domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
        self.domain = domain
        self.warmup = _number("warmup", warmup, 0.0)
        self.tau = _number("tau", tau, 0.0, strict=True)
        self.lam_q = 0.0
        self.epochs = 1
        self._layers: list[tuple[str, nn.Module, nn.Module]] = []

    # -- schedule ---------------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self.epochs = max(1, total_steps // max(steps_per_epoch, 1))
        self._layers = quantized_layers(model)
        self.on_step(model, 0)

    def lam_at(self, step: int) -> float:
        t = step / self.steps_per_epoch if self.steps_per_epoch else 0.0
        return self.strength * lam_schedule(t, self.epochs, self.warmup, self.tau)

    def on_step(self, model: nn.Module, step: int) -> None:
        self.lam_q = self.lam_at(step)

    # -- the regulariser --------------------------------------------------------------------------
    def layer_bits(self, wp: nn.Module):
        """The bits R_l is taken at: None (the quantizer's own) here; SINAREQ's β."""
        return None

    def regularizer(self, layers=None) -> Tensor | None:
        """Σ_l R_l over the quantized layers (after a forward pass, which records their grids)."""
        total = None
        for _, m, wp in layers if layers is not None else self._layers:
            bits = self.layer_bits(wp)
            u, c, step, h = sin_grid(wp.quantizer, latent_weight(m), bits, self.domain)
            r = sin_penalty(u, c, step, h)
            if bits is not None and self.normalize:
                r = r / 2.0**bits
            total = r if total is None else total + r
        return total

    normalize = False  # SINAREQ divides R_l by 2^β (authors' learned-bits form)

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        if self.lam_q == 0 or not self._layers:
            return None
        r = self.regularizer()
        return None if r is None else self.lam_q * r

    # -- reporting --------------------------------------------------------------------------------
    def log(self) -> dict[str, float]:
        return {"lam_q": self.lam_q}

    def epoch_record(self, model: nn.Module) -> dict:
        return {"qerr": {k: round(v, 5) for k, v in quantization_error(model).items()}}

    def summary(self, model: nn.Module) -> dict:
        err = quantization_error(model)
        out = {"sinreq": (f"strength {self.strength:g}, domain {self.domain}, "
                          f"lam_q = strength/2*(1+tanh((epoch-{self.warmup:g}E)/{self.tau:g}))")}
        if err:
            out["quant error"] = (f"mean |u-Q(u)|/step {sum(err.values()) / len(err):.4f} over {len(err)} layers "
                                  "(0.25 = spread evenly between levels)")
        return out


# ---------------------------------------------------------------------------------------------
# SINAREQ: learned bits
# ---------------------------------------------------------------------------------------------
class LearnedBitsWeight(QuantizedWeight):
    """``w -> Q(w)`` at the quantizer's bits, plus the layer's learned real bits β (a parameter,
    so it is trained, checkpointed and restored with the model)."""

    def __init__(self, quantizer: Quantizer, init_bits: float):
        super().__init__(quantizer)
        self.beta = nn.Parameter(torch.tensor(float(init_bits)))


def _bits_range(v: Any) -> tuple[int, int]:
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) for b in v) and 1 <= v[0] <= v[1] <= 32)
    if not ok:
        raise ConfigError(f"option bits must be [low, high] integers with 1 <= low <= high <= 32, got {v!r}")
    return int(v[0]), int(v[1])


@register_method("sinareq")
class SINAREQ(SinReQ):
    """SINAREQ (001): SinReQ with a learned real bit width β per quantized layer (module docstring).
    Options: those of ``sinreq`` and ``lam_f`` (0.03), ``bits`` ([2, 8]: β's range), ``init_bits``
    (β's start; default the plan's weight bits), ``bits_lr`` (β's learning rate; default the
    optimizer's), ``normalize`` (divide R_l by 2^β, true), ``finetune_epochs`` (0)."""

    #: its finetune epochs freeze the learned bits β: parameters DDP expects a gradient for get none, and DDP's
    #: reducer fails at the first such step (session 24: a traceback after two epochs under torchrun)
    ddp = False

    def __init__(self, lam_f: float = 0.03, bits: Any = (2, 8), init_bits: float | None = None,
                 bits_lr: float | None = None, normalize: bool = True, finetune_epochs: int = 0,
                 strength: float = 1.0, domain: str = "quantizer", warmup: float = 0.2, tau: float = 20.0):
        super().__init__(strength, domain, warmup, tau)
        self.lam_f = _number("lam_f", lam_f, 0.0)
        self.lo, self.hi = _bits_range(bits)
        self.init_bits = None if init_bits is None else _number("init_bits", init_bits, 1.0)
        if self.init_bits is not None and not self.lo <= self.init_bits <= self.hi:
            raise ConfigError(f"option init_bits must lie in bits [{self.lo}, {self.hi}], got {init_bits}")
        self.bits_lr = None if bits_lr is None else _number("bits_lr", bits_lr, 0.0, strict=True)
        if not isinstance(normalize, bool):
            raise ConfigError(f"option normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise ConfigError(f"option finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
        self.finetune_epochs = finetune_epochs
        self.frozen = False
        self._model: nn.Module | None = None

    # -- what a layer is made of ------------------------------------------------------------------
    def weight_parametrization(self, layer: str, module: nn.Module, spec) -> nn.Module:
        q = build_from_spec(spec, "weight")
        cls = type(q)
        if not (cls.min_bits <= self.lo and self.hi <= cls.max_bits):
            raise ConfigError(f"sinareq: bits [{self.lo}, {self.hi}] is outside what quantizer '{q.alias}' "
                              f"supports ({cls.min_bits}..{cls.max_bits})")
        b0 = q.bits
        for b in range(self.lo, self.hi + 1):  # the learned bits visit every width in the range (before: refused
            if b != b0:  # by set_bits in mid-training, e.g. sawb's closed form at 6 and 7 bits)
                try:
                    q.set_bits(b)
                except ConfigError as e:
                    raise ConfigError(f"sinareq: bits [{self.lo}, {self.hi}] include {b}, which quantizer '{q.alias}' "
                                      f"cannot take ({e}); narrow plan.method.bits") from None
        if q.bits != b0:
            q.set_bits(b0)
        init = self.init_bits if self.init_bits is not None else float(q.bits)
        if not self.lo <= init <= self.hi:
            raise ConfigError(f"sinareq: the plan's weight bits {q.bits} (beta's start) lie outside bits "
                              f"[{self.lo}, {self.hi}]; set init_bits or widen bits")
        return LearnedBitsWeight(q, init)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Everything else as usual; the β's in their own group, no weight decay (``bits_lr``)."""
        betas = [wp.beta for _, _, wp in _bit_layers(model)]
        ids = {id(b) for b in betas}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        group = {"params": betas, "weight_decay": 0.0, **({"lr": self.bits_lr} if self.bits_lr else {})}
        return [{"params": rest}, group]

    # -- schedule ---------------------------------------------------------------------------------
    def check_epochs(self, epochs: int) -> None:
        if self.finetune_epochs >= epochs:
            raise ConfigError(f"option finetune_epochs ({self.finetune_epochs}) must be below train.epochs "
                              f"({epochs}): the bits are learned in the epochs before")

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        self.frozen = False
        super().setup(model, total_steps, steps_per_epoch)
        self._model = model
        self._layers = _bit_layers(model)
        self.check_epochs(self.epochs)
        for _, _, wp in self._layers:
            wp.beta.requires_grad_(True)
        self._apply_bits(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        super().on_step(model, step)
        if not self.frozen:
            self._apply_bits(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if not self.frozen:  # the epoch's last step moved β: validate (and checkpoint) at its bits
            self._apply_bits(model)
        if self.finetune_epochs and not self.frozen and epoch + 1 == self.epochs - self.finetune_epochs:
            self.freeze(model)

    def _apply_bits(self, model: nn.Module, layers=None) -> None:
        """Clamp β to its range and give each layer ceil(β) bits where that changed."""
        from ..quantize import set_bits

        todo = {}
        with torch.no_grad():
            for name, _, wp in layers if layers is not None else self._layers:
                wp.beta.clamp_(self.lo, self.hi)
                b = round_up_bits(float(wp.beta.detach()), self.lo, self.hi)
                if b != wp.bits:
                    todo[name] = b
        if todo:
            set_bits(model, todo)

    def freeze(self, model: nn.Module, layers=None) -> None:
        """Round every β up, apply those bits and stop training β (the fine-tune phase)."""
        layers = layers if layers is not None else self._layers
        self._apply_bits(model, layers)
        for _, _, wp in layers:
            wp.beta.requires_grad_(False)
        self.frozen = True

    def finalize(self, model: nn.Module) -> None:
        """The layers get ceil(β) bits (also on a model rebuilt from a checkpoint)."""
        self.freeze(model, _bit_layers(model))

    # -- the regulariser --------------------------------------------------------------------------
    def layer_bits(self, wp: nn.Module):
        return None if self.frozen else wp.beta

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        total = super().extra_loss(model)
        if not self.frozen and self.lam_f and self._layers:
            f = self.lam_f * torch.stack([wp.beta for _, _, wp in self._layers]).sum()
            total = f if total is None else total + f
        return total

    # -- state and reporting ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        self.frozen = False
        if state.get("frozen") and self._model is not None:  # β came back with the model: its bits again
            self.freeze(self._model)

    def log(self) -> dict[str, float]:
        out = super().log()
        if self._layers:
            out["avg_bits"] = sum(wp.bits for _, _, wp in self._layers) / len(self._layers)
        return out

    def epoch_record(self, model: nn.Module) -> dict:
        layers = _bit_layers(model)
        return {**super().epoch_record(model),
                "beta": {n: round(float(wp.beta.detach()), 4) for n, _, wp in layers},
                "bits": {n: int(wp.bits) for n, _, wp in layers}}

    def summary(self, model: nn.Module) -> dict:
        layers = _bit_layers(model)
        out = super().summary(model)
        if layers:
            n = {name: latent_weight(m).numel() for name, m, _ in layers}
            bits = {name: int(wp.bits) for name, _, wp in layers}
            out["sinareq"] = (f"lam_f {self.lam_f:g}, bits [{self.lo}, {self.hi}], beta rounded up, "
                              f"fine-tune {self.finetune_epochs} epochs")
            out["learned bits"] = ", ".join(f"{k} {v}" for k, v in bits.items())
            out["avg weight bits"] = (f"{sum(bits[k] * n[k] for k in bits) / sum(n.values()):.3f} per weight, "
                                      f"{sum(bits.values()) / len(bits):.3f} per layer")
            out["beta"] = ", ".join(f"{k} {float(wp.beta.detach()):.3f}" for k, _, wp in layers)
        return out


def _bit_layers(model: nn.Module) -> list[tuple[str, nn.Module, LearnedBitsWeight]]:
    return [(n, m, wp) for n, m, wp in quantized_layers(model) if isinstance(wp, LearnedBitsWeight)]
