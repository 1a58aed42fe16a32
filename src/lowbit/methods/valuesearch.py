"""Quantization through search (000): RDHS and SGT over a finite weight value set.

000 ("Quantization Through Search") treats choosing a weight's value like choosing an operation in
a differentiable architecture search: every weight has ``m`` candidate values ``v_1 < ... < v_m``
(a finite value set: ``{±1}``, ``{±1, ±1/2}``, ``{±1, ±1/2, ±1/4, ±1/8}``, any list) and ``m``
logits ``α``; the forward pass uses the value of the largest logit and the backward pass sends a
gradient to the logits. 000's "implementation optimization for ConvNets" keeps the logits of a
layer as one tensor shaped like the kernel plus a last axis of size ``m`` (the kernel "scaled by
each of m masks"). Two backward rules (000, "Method: RDHS" / "Method: SGT"):

* **RDHS**, reparameterization with deterministic hard sampling::

      y = softmax((α + μ·n) / τ)          soft sample, n ~ Gumbel(0, 1)
      z = one_hot(argmax_k y)             hard sample, used in the forward pass: w = Σ_k z_k·v_k
      ∂L/∂y := ∂L/∂z                      straight-through

  000 writes ``log α`` with α a probability; we store the logits themselves (α here is 000's
  ``log α``), as the authors' code does. μ = 0 (no noise, deterministic) is 000's recommendation
  (Table 3); the noise term is then skipped entirely. τ is cooled per epoch,
  τ = max(τ0·decay^epoch, τ_min) (authors: 1.0, 0.97, 1e-5).

* **SGT**, stochastic gradient transfer::

      k = argmax_r α_r,   w = v_k,   ∂L/∂α_i = ∂L/∂w · sign(v_i − v_k)   (0 for i = k)

  "when the gradient of q^k is positive it should decrease: the other candidates [below it]
  should gain a higher odd". No softmax: only the chosen path is in the graph, so it is cheaper
  than RDHS in time and memory (000 Table 4).

Both are weight parametrizations (:class:`ValueSearch`) registered by ``lowbit.quantize``: the
trainable tensor ``layer.parametrizations.weight.original`` *is* α, shape ``weight.shape + (m,)``
(float32, m × the weight's memory); no float copy of the weight is kept. It is initialised from
the layer's latent weight ``w`` (random init or a pretrained model) as

    α_i = −|w − c·v_i| / 2

so the initial argmax is the nearest value of ``c·V``, and between two neighbouring values the
logit margin is ``α_k − α_{k+1} = c·(v_k + v_{k+1})/2 − w``: the latent weight's distance to the
decision threshold. SGT moves that margin by the step's gradient, exactly as straight-through QAT
moves a latent weight; for {±1}, ``α_+ − α_− = w`` and SGT *is* BinaryConnect (same momentum and
weight decay, tested). ``c`` is the value set's scale when the plan gives one, else
``max|w| / max|V|`` per layer (``init_scale: max``; ``mean`` uses ``E|w| / E|V|``, ``none`` 1):
with ``max`` no weight lies beyond the outer values and a power-of-two set is filled as by the
``po2`` quantizer.

Which values a trained layer uses, and whether its products need a multiplier (000's "Req. Mult"
column: values in ``{0, ±2^k}`` times one scale need none), is reported by :func:`value_space`
for any quantized layer and by the method's ``summary()`` (run summary, ``lowbit info``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..plan import QuantSpec
from ..quant import build_quantizer
from ..quant.valueset import ValueSetQuantizer
from .base import Method, build_from_spec, register_method

INIT_SCALES = ("max", "mean", "none")


# ---------------------------------------------------------------------------------------------
# autograd functions: the two backward rules of 000, with only what each needs saved
# ---------------------------------------------------------------------------------------------
def _code_dtype(m: int) -> torch.dtype:
    # the chosen index is kept for the backward pass; one byte per weight for m <= 256
    return torch.uint8 if m <= 256 else torch.int64


class _SGT(torch.autograd.Function):
    """w = v[argmax α] (·s); ∂L/∂α_i = ∂L/∂w · sign(v_i − v_k) (000, "Method: SGT").

    Saves the chosen index (one byte per weight), no (..., m) tensor; the backward pass builds
    the (..., m) gradient once: a row of the m×m table sign(v_i − v_k), times ∂L/∂w.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, values: Tensor, scale: Tensor | None) -> Tensor:
        k = alpha.argmax(-1)
        w = values[k] if scale is None else values[k] * scale
        ctx.save_for_backward(k.to(_code_dtype(values.numel())), values)
        return w

    @staticmethod
    def backward(ctx, g: Tensor):
        k, values = ctx.saved_tensors
        # table[k, i] = sign(v_i − v_k); sign(s·v_i − s·v_k) is the same for a scale s > 0
        table = torch.sign(values.unsqueeze(0) - values.unsqueeze(1))
        d = table[k.long()]
        d.mul_(g.unsqueeze(-1))
        return d, None, None


class _RDHS(torch.autograd.Function):
    """Forward ``w = Σ_k z_k·(s·v_k)`` with ``z = one_hot(argmax logits)``; backward through
    ``y = softmax(logits/τ)`` with ∂L/∂y := ∂L/∂z (000, "Method: RDHS")::

        ∂L/∂z_k = g·s·v_k,   ∂L/∂logits = (g·s/τ) · y ⊙ (v − Σ_j y_j v_j)

    (the softmax Jacobian-vector product written out). Saves ``y`` only; never builds the one-hot
    ``z`` or the straight-through sum as tensors.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, values: Tensor, scale: Tensor | None, tau: float) -> Tensor:
        k = logits.argmax(-1)  # = argmax of y (softmax is monotone), without softmax round-off ties
        w = values[k] if scale is None else values[k] * scale
        y = torch.softmax(logits / tau, dim=-1)  # max-subtracting: finite for any τ > 0
        ctx.save_for_backward(y, values, scale if scale is not None else torch.ones(()))
        ctx.tau = tau
        return w

    @staticmethod
    def backward(ctx, g: Tensor):
        y, values, scale = ctx.saved_tensors
        ybar = y @ values  # Σ_j y_j v_j, weight-shaped
        d = values - ybar.unsqueeze(-1)
        d.mul_(y)  # y ⊙ (v − ȳ): exactly 0 where y is one-hot, so a tiny τ gives 0, not NaN
        d.mul_((g * scale / ctx.tau).unsqueeze(-1))
        return d, None, None, None


# ---------------------------------------------------------------------------------------------
# the parametrization
# ---------------------------------------------------------------------------------------------
class ValueSearch(nn.Module):
    """Weight parametrization ``α -> w = s·v[argmax α]`` over a finite value set (000).

    ``quantizer`` (a :class:`~lowbit.quant.valueset.ValueSetQuantizer`, from the plan's weight
    spec) gives the candidate values ``v`` (sorted, ``m`` of them), the optional scale rule
    (``none``: s = 1, the following BatchNorm absorbs the magnitude, as 000 does; ``max``/``mean``,
    per layer or per output channel: s is computed once from the latent weight and kept as the
    buffer ``scale``) and the bit width ``ceil(log2 m)``.

    ``right_inverse(w)`` (called by ``register_parametrization`` and by ``layer.weight = w``) turns
    a float weight into logits ``α_i = −|w − c·v_i| / 2`` (module docstring), shape ``w.shape + (m,)``.
    Subclasses implement ``forward(α)`` with their backward rule; without a gradient to compute
    (evaluation) both just return ``s·v[argmax α]``.
    """

    def __init__(self, quantizer: ValueSetQuantizer, init_scale: str = "max"):
        super().__init__()
        self.quantizer = quantizer
        self.init_scale = init_scale
        self.register_buffer("scale", None)

    # -- value set -------------------------------------------------------------------------------
    @property
    def values(self) -> Tensor:
        return self.quantizer.values

    @property
    def m(self) -> int:
        return self.values.numel()

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @property
    def n_scales(self) -> int:
        """Stored full-precision numbers: the value table plus the scale(s), if any."""
        return self.m + (0 if self.scale is None else self.scale.numel())

    def scale_kind(self) -> str:
        if self.scale is None:
            return "none"
        return "per channel" if self.scale.numel() > 1 else "per layer"

    # -- α <-> w ---------------------------------------------------------------------------------
    def right_inverse(self, w: Tensor) -> Tensor:
        w = w.detach()
        q = self.quantizer
        if q.scale_mode != "none":
            self.scale = q.scale(w).to(w.dtype)
            c = self.scale
        else:
            self.scale = None
            c = self._init_normaliser(w)
        c = c.unsqueeze(-1) if c.dim() else c
        return (w.unsqueeze(-1) - c * self.values.to(w.dtype)).abs_().mul_(-0.5)

    def _init_normaliser(self, w: Tensor) -> Tensor:
        if self.init_scale == "none":
            return torch.ones((), dtype=w.dtype)
        # compose the value-set quantizer's own scale rule rather than re-deriving it
        q = build_quantizer("valueset", None, values=self.values.tolist(), scale=self.init_scale,
                            per_channel=self.quantizer.per_channel)
        return q.scale(w).to(w.dtype)

    def remember_levels(self) -> None:
        """Record the level set on the quantizer, so ``quantizer.levels()`` answers (the exporter
        and the cost model read it) although the quantizer itself never runs."""
        self.quantizer.record_levels(self.levels())

    def hard(self, alpha: Tensor) -> Tensor:
        """``s·v[argmax α]``, no gradient."""
        w = self.values[alpha.argmax(-1)]
        return w if self.scale is None else w * self.scale

    @staticmethod
    def codes(alpha: Tensor) -> Tensor:
        """Index of the chosen value for each weight (int64, weight-shaped)."""
        return alpha.detach().argmax(-1)

    def levels(self) -> Tensor:
        """The values the layer can take: ``(m,)``, or ``(C, m)`` with a per-channel scale."""
        if self.scale is None:
            return self.values
        return self.values * self.scale.reshape(-1, 1) if self.scale.numel() > 1 else self.values * self.scale

    def _needs_grad(self, alpha: Tensor) -> bool:
        return torch.is_grad_enabled() and alpha.requires_grad

    def extra_repr(self) -> str:
        return f"m={self.m}, scale={self.scale_kind()}"


class SGTSearch(ValueSearch):
    """:class:`ValueSearch` with 000's stochastic gradient transfer (:class:`_SGT`)."""

    def forward(self, alpha: Tensor) -> Tensor:
        self.remember_levels()
        if not self._needs_grad(alpha):
            return self.hard(alpha)
        return _SGT.apply(alpha, self.values, self.scale)


class RDHSSearch(ValueSearch):
    """:class:`ValueSearch` with 000's RDHS (:class:`_RDHS`): hard sample forward, softmax backward.

    ``tau`` is set by the method's schedule; ``mu`` scales Gumbel noise added to the logits in
    training mode only (evaluation always uses ``argmax α``), drawn from ``generator`` (which the
    method re-seeds every step, so a resumed run draws the same noise).
    """

    def __init__(self, quantizer: ValueSetQuantizer, init_scale: str = "max", mu: float = 0.0, tau: float = 1.0):
        super().__init__(quantizer, init_scale)
        self.mu = mu
        self.tau = tau
        self.generator: torch.Generator | None = None

    def forward(self, alpha: Tensor) -> Tensor:
        self.remember_levels()
        logits = alpha
        if self.mu > 0 and self.training:  # μ = 0: no noise term at all (0·inf would be NaN)
            logits = alpha + self.mu * gumbel_like(alpha, self.generator)
        if not self._needs_grad(alpha):
            return self.hard(logits)
        return _RDHS.apply(logits, self.values, self.scale, self.tau)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mu={self.mu}, tau={self.tau:.4g}"


def gumbel_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise ``−log(E)``, E ~ Exp(1), clamped so it is always finite."""
    e = torch.empty_like(x).exponential_(generator=generator)
    return e.clamp_min_(torch.finfo(x.dtype).tiny).log_().neg_()


# ---------------------------------------------------------------------------------------------
# the value space a layer uses, and 000's "Req. Mult"
# ---------------------------------------------------------------------------------------------
def is_power_of_two(x: float) -> bool:
    """True for x = 2^k, k any integer (exact float test)."""
    return x > 0 and math.frexp(x)[0] == 0.5


def needs_multiplier(values: Iterable[float]) -> bool:
    """000's "Req. Mult": False iff ``values ⊂ a·{0, ±2^k}`` for one common factor ``a``.

    Test: every nonzero |v| divided by the largest |v| is an exact power of two. Products with such
    values are a sign flip and a shift; the common factor multiplies the accumulated sum once.
    """
    mags = [abs(float(v)) for v in values if v != 0]
    if not mags:
        return False
    top = max(mags)
    return not all(is_power_of_two(v / top) for v in mags)


def format_value(v: float) -> str:
    f = Fraction(v).limit_denominator(1 << 20)
    if float(f) != v:
        return f"{v:.4g}"
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def format_values(values: Iterable[float]) -> str:
    """000's notation: ``{±1, ±1/2}`` for a symmetric set, else the sorted list."""
    vals = sorted(set(float(v) for v in values))
    if not vals:
        return "{}"
    s = set(vals)
    if all(-v in s for v in vals):
        mags = sorted({abs(v) for v in vals if v != 0}, reverse=True)
        parts = (["0"] if 0.0 in s else []) + [f"±{format_value(m)}" for m in mags]
    else:
        parts = [format_value(v) for v in vals]
    return "{" + ", ".join(parts) + "}"


@dataclass
class LayerValueSpace:
    """The values a quantized layer's weight takes (``values``, normalised so the scale is
    factored out), out of how many candidates (``n_candidates``, None when not a search), the
    scale (``none``, ``per layer``, ``per channel``, or ``real`` for a float weight) and whether
    a product with it needs a multiplier (000's "Req. Mult")."""

    values: tuple[float, ...]
    n_candidates: int | None
    scale: str
    req_mult: bool

    @property
    def space(self) -> str:
        if self.scale == "real":
            return "R"
        base = format_values(self.values)
        return base if self.scale == "none" else f"{base}·s ({self.scale})"

    def describe(self) -> str:
        of = "" if self.n_candidates is None else f" ({len(self.values)} of {self.n_candidates} values)"
        return f"{self.space}{of}, mult {'Y' if self.req_mult else 'N'}"


#: more distinct values than this in a layer: a float weight, not a value set
MAX_VALUES = 256


def value_space(module: nn.Module) -> LayerValueSpace | None:
    """The value space actually used by a quantized conv/linear layer (None if not parametrized).

    A :class:`ValueSearch` layer is read exactly from its codes (``argmax α``). Any other layer is
    read from its quantized weight: its distinct values, tested for one scale per layer
    (``values / max|values| ⊂ {0, ±2^k}``), then per output channel; a scale per output channel
    multiplies each output once, like a per-layer one, so the products need no multiplier either.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    p = module.parametrizations.weight[0]
    if isinstance(p, ValueSearch):
        alpha = module.parametrizations.weight.original
        used = p.values[torch.unique(p.codes(alpha))].tolist()
        return LayerValueSpace(tuple(used), p.m, p.scale_kind(), needs_multiplier(used))
    with torch.no_grad():
        w = module.weight.detach()
    u = torch.unique(w)
    small = u.numel() <= MAX_VALUES
    if small and not needs_multiplier(u.tolist()):
        top = u.abs().max().item()
        scale = "none" if top == 0 or is_power_of_two(top) else "per layer"
        return LayerValueSpace(tuple((u if scale == "none" else u / top).tolist()), None, scale, False)
    per_row = _per_channel(w)
    if per_row is not None and (not per_row.req_mult or not small):
        return per_row
    if small:  # a few values, but not powers of two of one scale (e.g. SAWB's {±a, ±3a})
        return LayerValueSpace(tuple((u / u.abs().max()).tolist()), None, "per layer", True)
    return LayerValueSpace((), None, "real", True)


def _per_channel(w: Tensor) -> LayerValueSpace | None:
    """The layer read as one value set per output channel (None if a channel has too many)."""
    rows = w.flatten(1) if w.dim() > 1 else w.reshape(1, -1)
    normed, req = set(), False
    for r in rows:
        ur = torch.unique(r)
        if ur.numel() > MAX_VALUES:
            return None
        req = req or needs_multiplier(ur.tolist())
        top = ur.abs().max()
        normed.update((ur / top if top > 0 else ur).tolist())
    return LayerValueSpace(tuple(sorted(normed)), None, "per channel", req)


def value_space_report(model: nn.Module) -> dict[str, LayerValueSpace]:
    """:func:`value_space` of every parametrized (quantized) layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        vs = value_space(m)
        if vs is not None:
            out[name] = vs
    return out


def overall(report: dict[str, LayerValueSpace]) -> tuple[str, bool]:
    """(value space over all layers, whether any layer needs a multiplier)."""
    if not report:
        return "R", True
    if any(v.scale == "real" for v in report.values()):
        return "R", True
    vals = sorted({x for v in report.values() for x in v.values})
    scales = sorted({v.scale for v in report.values()} - {"none"})
    space = format_values(vals) + ("" if not scales else f"·s ({', '.join(scales)})")
    return space, any(v.req_mult for v in report.values())


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------
def _number(method: str, key: str, value, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    """A float option, checked; bad ones are one-line ConfigErrors naming the option."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method '{method}' option {key} must be a number, got {value!r}") from None
    bad = not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) or (
        high is not None and x > high)
    if bad:
        rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ConfigError(f"method '{method}' option {key} must be {rng}, got {value!r}")
    return x


class ValueSearchMethod(Method):
    """Shared part of RDHS and SGT: builds one :class:`ValueSearch` per quantized layer from the
    plan's value set, records how many weights change value per epoch, and reports the value
    space used and 000's "Req. Mult" in ``summary()``."""

    search_cls: type[ValueSearch] = ValueSearch

    def __init__(self, init_scale: str = "max"):
        super().__init__()
        if init_scale not in INIT_SCALES:
            raise ConfigError(f"method '{self.name}' option init_scale must be one of "
                              f"{', '.join(INIT_SCALES)}, got {init_scale!r}")
        self.init_scale = init_scale
        self.layers: dict[str, nn.Module] = {}  # layer name -> conv/linear module
        self._codes: dict[str, Tensor] = {}  # codes at the start of the epoch (one byte per weight)

    def weight_parametrization(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        q = build_from_spec(spec, "weight")
        if not isinstance(q, ValueSetQuantizer):
            raise ConfigError(f"method '{self.name}' searches a finite value set: plan weight for layer "
                              f"{layer} must be valueset or po2, got '{spec.name}'")
        self.layers[layer] = module
        return self._make(q)

    def _make(self, q: ValueSetQuantizer) -> ValueSearch:
        return self.search_cls(q, self.init_scale)

    def searches(self):
        for name, mod in self.layers.items():
            yield name, mod, mod.parametrizations.weight[0], mod.parametrizations.weight.original

    # -- schedule --------------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self._remember_codes()

    def _remember_codes(self) -> None:
        self._codes = {n: p.codes(a).to(_code_dtype(p.m)) for n, _, p, a in self.searches()}

    def load_state_dict(self, state: dict) -> None:
        # called on resume after the model's α were loaded: the epoch starts from these codes
        self._remember_codes()

    def epoch_record(self, model: nn.Module) -> dict:
        """``changed``: fraction of searched weights whose value changed during the epoch."""
        changed = total = 0
        for n, _, p, a in self.searches():
            new = p.codes(a).to(_code_dtype(p.m))
            if n in self._codes:
                changed += int((new != self._codes[n]).sum())
                total += new.numel()
            self._codes[n] = new
        return {"changed": changed / total} if total else {}

    # -- reporting -------------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict:
        """Value space searched and used, and 000's "Req. Mult", overall and per layer."""
        report = {n: value_space(mod) for n, mod in self.layers.items()}
        if not report:
            return {}
        searched = format_values(sorted({v for _, _, p, _ in self.searches() for v in p.values.tolist()}))
        space, mult = overall(report)
        out = {
            "value_space": f"{space} (searched {searched})",
            "req_mult": "Y" if mult else "N",
            "search": self.describe(),
        }
        out.update({n: v.describe() for n, v in report.items()})
        return out

    def describe(self) -> str:
        return f"{self.name}, init_scale {self.init_scale}"


@register_method("sgt")
class SGT(ValueSearchMethod):
    """000's stochastic gradient transfer over a finite value set (:class:`_SGT`).

    ``plan: {weight: {name: valueset, values: po2-2bit}, method: {name: sgt}}``.
    Option ``init_scale`` (max | mean | none): how the latent weight is matched to the value set
    to pick the initial (nearest) value when the value set has no scale of its own.
    """

    search_cls = SGTSearch


@register_method("rdhs")
class RDHS(ValueSearchMethod):
    """000's RDHS over a finite value set (:class:`_RDHS`) with a per-epoch temperature.

    ``τ(e) = max(tau0·tau_decay^e, tau_min)`` after ``e`` finished epochs (authors: 1.0, 0.97,
    1e-5); ``mu``: scale of the Gumbel noise on the logits (0 = deterministic, 000 Table 3).
    ``plan: {weight: {name: valueset, values: binary}, method: {name: rdhs, mu: 0.0}}``.
    """

    search_cls = RDHSSearch

    def __init__(self, mu: float = 0.0, tau0: float = 1.0, tau_decay: float = 0.97, tau_min: float = 1e-5,
                 init_scale: str = "max"):
        super().__init__(init_scale)
        self.mu = _number("rdhs", "mu", mu, low=0.0)
        self.tau0 = _number("rdhs", "tau0", tau0, low=0.0, low_open=True)
        self.tau_decay = _number("rdhs", "tau_decay", tau_decay, low=0.0, high=1.0, low_open=True)
        self.tau_min = _number("rdhs", "tau_min", tau_min, low=0.0, low_open=True)
        self.epochs_done = 0
        self.generator = torch.Generator()
        self._seed = 0

    def _make(self, q: ValueSetQuantizer) -> ValueSearch:
        p = RDHSSearch(q, self.init_scale, mu=self.mu, tau=self.tau)
        p.generator = self.generator
        return p

    @property
    def tau(self) -> float:
        return max(self.tau0 * self.tau_decay ** self.epochs_done, self.tau_min)

    def _push_tau(self) -> None:
        for _, _, p, _ in self.searches():
            p.tau = self.tau

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self._seed = torch.initial_seed()  # the run's seed (train.build_model seeds torch)
        device = next((a.device for _, _, _, a in self.searches()), torch.device("cpu"))
        if self.generator.device != device:  # the noise is drawn where α lives
            self.generator = torch.Generator(device=device)
            for _, _, p, _ in self.searches():
                p.generator = self.generator
        self._push_tau()

    def on_step(self, model: nn.Module, step: int) -> None:
        if self.mu > 0:  # noise as a function of (seed, step): a resumed run draws the same
            self.generator.manual_seed((self._seed * 1_000_003 + step) % (2**63))

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.epochs_done = epoch + 1
        self._push_tau()

    def log(self) -> dict[str, float]:
        return {"tau": self.tau}

    def state_dict(self) -> dict:
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epochs_done = int(state.get("epochs_done", 0))
        self._push_tau()

    def describe(self) -> str:
        return f"rdhs, mu {self.mu:g}, tau {self.tau:.4g} (tau0 {self.tau0:g} x {self.tau_decay:g}^epoch, " \
               f"min {self.tau_min:g}), init_scale {self.init_scale}"
