"""Mixtures of quantizers: the building block that DQA and BinaryRelax share.

A layer's weight (or its input activation) is quantized by K registered quantizers at once and the
results are combined linearly (003 eq. 2-3)::

    q = Σ_k c_k · Q_k(x),      Q_1 .. Q_K sorted by bits, n_1 < n_2 < ... < n_K

Q_1 is the *final* quantizer: the plan's ``weight`` / ``act`` spec, what the network is at the end
of training and what cost and export see (``bits``, ``n_scales``, ``quantizer``, ``levels()`` are
Q_1's). The higher-bit members come from the method's ``mixture`` / ``act_mixture`` option. Only
the coefficients c differ between methods:

* DQA (:class:`AttentionMixture`): c = softmax(α/T), α learned (003 eq. 4);
* BinaryRelax (:class:`ScheduledMixture`): c = [ω, 1, ..., 1]/(ω + K - 1) with ω on a fixed
  schedule (Yin et al. 2018 for K = 2 with Q_2 = FP; 003 eq. 8 for K = 3).

Every member is built with :func:`lowbit.quant.build_quantizer`; nothing here quantizes by itself.
A mixture module is a weight parametrization (``torch.nn.utils.parametrize``) and, the same class,
an activation quantizer (``layer.input_quantizer``).

Evaluation and the end of training: in eval mode the module computes Q_1 alone (``eval_mode=
"final"``, the default), so validation measures the network that will be deployed and the
best-validation checkpoint is a Q_1 network (BinaryRelax's authors validate the quantized weights
the same way). :meth:`QuantizerMixture.harden` makes that permanent (``finalize``): the layer is then
exactly Q_1 whatever the mode.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..plan import QuantSpec
from ..quant import Quantizer, build_quantizer, get_quantizer_class
from ..quant import compiled as _compiled
from ..quant import native as _native
from ..quant.functional import (
    _bounds,
    _codes_to_values,
    autocast_off,
    clip_mask_grad,
    clip_round_values,
    clip_sum_above,
    clip_values,
    shared_batch_range,
)
from .base import Method, QuantizedWeight, build_from_spec

EVAL_MODES = ("final", "mixture")


# ---------------------------------------------------------------------------------------------
# member specs
# ---------------------------------------------------------------------------------------------
def build_member(spec: dict | QuantSpec, role: str, where: str = "mixture") -> Quantizer:
    """Build one mixture member with the core's ``build_quantizer``.

    ``bits`` may be left out for single-width families (fp: 32, bwn: 1, twn: 2) and value sets.
    """
    d = {"name": spec.name, "bits": spec.bits, **spec.options} if isinstance(spec, QuantSpec) else dict(spec)
    name, bits = d.pop("name", None), d.pop("bits", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: each member needs a quantizer name, e.g. {{name: minmax, bits: 4}}; got {spec!r}")
    try:
        cls = get_quantizer_class(name)
        if bits is None and cls.min_bits == cls.max_bits:
            bits = cls.min_bits
        if bits is None and name != "valueset":
            raise ConfigError(f"quantizer '{name}' needs bits")
        return build_quantizer(name, bits, role=role, **d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def label(q: Quantizer) -> str:
    """Short name of a member: ``minmax4``, ``twn2``, ``fp32``."""
    return f"{q.alias}{q.bits}"


def parse_members(value: Any, role: str, where: str) -> list[dict] | None:
    """Validate a ``mixture`` option (a list of quantizer specs) and return it sorted by bits.

    Each member is built once to check it (unknown names, bad bits and options fail here, at config
    load, as one line). Bits must be distinct: 003 assumes n_1 < n_2 < ... < n_K.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: a non-empty list of quantizers, e.g. [{{name: minmax, bits: 4}}], got {value!r}")
    specs = []
    for i, s in enumerate(value):
        if isinstance(s, str):  # shorthand: "fp", "twn", "bwn"
            s = {"name": s}
        if not isinstance(s, dict):
            raise ConfigError(f"{where}[{i}]: a quantizer spec like {{name: minmax, bits: 4}}, got {s!r}")
        q = build_member(s, role, f"{where}[{i}]")
        specs.append((q.bits, {**s, "bits": q.bits}))
    specs.sort(key=lambda t: t[0])
    bits = [b for b, _ in specs]
    if len(set(bits)) != len(bits):
        raise ConfigError(f"{where}: members need distinct bits (003: n_1 < n_2 < ... < n_K), got bits {bits}")
    return [s for _, s in specs]


# ---------------------------------------------------------------------------------------------
# the mixture module
# ---------------------------------------------------------------------------------------------
class QuantizerMixture(nn.Module):
    """``x -> Σ_k c_k Q_k(x)`` over members sorted by bits; subclasses define the coefficients c.

    Gradients: every member has its own straight-through gradient, so dq/dx = Σ_k c_k dQ_k/dx
    (= 1 where no member clips, since Σ c_k = 1), and dq/dc_k = Q_k(x).
    """

    #: activation mixtures compute their clip-round members in one autograd Function
    #: (:func:`fused_mix`); False: every member is its own Function, summed by :func:`weighted_sum`
    fused: bool = True

    def __init__(self, members: Sequence[Quantizer], eval_mode: str = "final"):
        super().__init__()
        if len(members) < 2:
            raise ValueError("a mixture needs at least two quantizers")
        bits = [m.bits for m in members]
        if bits != sorted(bits) or len(set(bits)) != len(bits):
            raise ValueError(f"mixture members must be sorted by strictly increasing bits, got {bits}")
        if eval_mode not in EVAL_MODES:
            raise ConfigError(f"eval_mode must be one of {', '.join(EVAL_MODES)}, got {eval_mode!r}")
        self.members = nn.ModuleList(members)
        self.eval_mode = eval_mode
        # a buffer, so that a hardened model saved and loaded stays hardened
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))

    # -- what the final network is ---------------------------------------------------------------
    @property
    def quantizer(self) -> Quantizer:
        """Q_1, the final (lowest-bit) quantizer: what export and cost see."""
        return self.members[0]

    @property
    def bits(self) -> int:
        return self.members[0].bits

    @property
    def n_scales(self) -> int:
        return self.members[0].n_scales

    @property
    def role(self) -> str:
        return self.members[0].role

    @property
    def per_channel(self) -> bool:
        return self.members[0].per_channel

    def levels(self) -> Tensor:
        return self.members[0].levels()

    def labels(self) -> list[str]:
        return [label(m) for m in self.members]

    # -- coefficients ----------------------------------------------------------------------------
    def coefficients(self) -> Tensor:  # pragma: no cover - abstract
        """The K mixing coefficients c (they sum to 1)."""
        raise NotImplementedError

    # -- forward ---------------------------------------------------------------------------------
    def is_final(self) -> bool:
        """Whether forward computes Q_1 alone (hardened, or evaluating with eval_mode 'final')."""
        return bool(self.hardened) or (not self.training and self.eval_mode == "final")

    def forward(self, x: Tensor) -> Tensor:
        if self.is_final():
            return self.members[0](x)
        amp, x = autocast_off(x)  # under torch.autocast: float32, as each member (the fused kernel calls none)
        with amp:
            return self.mix(x, self.coefficients())

    def mix(self, x: Tensor, c: Tensor) -> Tensor:
        """Σ_k c_k Q_k(x) (003 eq. 2). A member whose coefficient is exactly 0 is skipped: its term
        and every gradient through it are exactly 0 (softmax underflow, a hard BinaryRelax phase)."""
        keep = [k for k, z in enumerate((c.detach() == 0).tolist()) if k == 0 or not z]
        cs = c if len(keep) == len(self.members) else c[keep]
        with shared_batch_range():  # min-max members read the batch's min/max once
            if self.fused and self.role == "act":
                return fused_mix(x, cs, [self.members[k] for k in keep])
            qs = [self.members[k](x) for k in keep]
        return weighted_sum(cs, qs)

    def harden(self) -> None:
        """From now on the module is exactly Q_1 (003: the network ends as the lowest-bit quantizer)."""
        self.hardened.fill_(True)

    @torch.no_grad()
    def transfer_curve(self, w: Tensor, points: int = 33) -> tuple[list[float], list[float]]:
        """The mixture's quantization function q(w) = Σ c_k Q_k(w) sampled at ``points`` of the
        layer's own weights, evenly spread over [min w, max w] (003 Figure 3b).

        Quantizer statistics (min/max, E|w|, α) depend on the whole tensor, so the function is read
        off the tensor itself: (w_i, q_i) for the weights nearest to an even grid of w.
        """
        flat = w.detach().flatten()
        q = self.mix(w.detach(), self.coefficients().detach()).flatten()
        order = flat.argsort()
        s = flat[order]
        targets = torch.linspace(float(s[0]), float(s[-1]), points, device=s.device)
        idx = torch.unique(torch.searchsorted(s, targets).clamp_(max=len(s) - 1))
        pick = order[idx]
        return [_r(v) for v in flat[pick].tolist()], [_r(v) for v in q[pick].tolist()]

    def extra_repr(self) -> str:
        return f"members={'+'.join(self.labels())}, eval_mode={self.eval_mode}"


class _WeightedSum(torch.autograd.Function):
    """q = Σ_k c_k·Q_k with dq/dc_k = <G, Q_k> and dq/dQ_k = c_k·G.

    The same values and gradients as ``sum(c[k] * qs[k])``, in one output buffer and with the
    coefficient gradients as dot products: activation mixtures run this on every layer input of
    every step, where the K temporaries of the plain expression cost more than the quantizers.
    """

    @staticmethod
    def forward(ctx, c: Tensor, *qs: Tensor) -> Tensor:
        cf = c.detach().tolist()
        out = torch.mul(qs[0], cf[0])
        for ck, qk in zip(cf[1:], qs[1:]):
            out.add_(qk, alpha=ck)
        ctx.save_for_backward(c, *qs)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        c, *qs = ctx.saved_tensors
        gc = None
        if ctx.needs_input_grad[0]:
            gf = g.reshape(-1)
            gc = torch.stack([torch.dot(gf, q.reshape(-1)) for q in qs]).to(c.dtype)
        gqs = [(g if ck == 1.0 else g * ck) if ctx.needs_input_grad[k + 1] else None
               for k, ck in enumerate(c.tolist())]
        return (gc, *gqs)


def weighted_sum(c: Tensor, qs: Sequence[Tensor]) -> Tensor:
    """Σ_k c_k·qs[k] (c: a K-vector, possibly requiring grad)."""
    return _WeightedSum.apply(c, *qs)


def _clip_member(m: Quantizer, x: Tensor):
    """Run member ``m`` on ``x`` up to its :meth:`Quantizer.clip_round` call.

    Returns ``((low, high), None)`` for a clip-round member: its running statistics, levels and
    range are updated exactly as by its forward (the bookkeeping of ``clip_round`` runs on an
    empty tensor), but the full-size quantization is left to :class:`_FusedMix`. A member whose
    forward does not call ``clip_round`` (LSQ, FP, value sets, ...) is simply run:
    ``(None, m(x))``.
    """
    real = getattr(type(m), "clip_round", None)
    if real is None:
        return None, m(x)
    box = []

    def capture(x_: Tensor, low: Tensor, high: Tensor) -> Tensor:
        with torch.no_grad():
            real(m, x_.new_empty(0), low, high)
        box.append((low, high))
        return x_

    m.clip_round = capture  # an instance attribute shadows the method for this one call
    try:
        out = m(x)
    finally:
        del m.clip_round
    if not box:
        return None, out
    if len(box) != 1 or out is not x:
        raise RuntimeError(f"{type(m).__name__} cannot be fused in a mixture: its forward must return "
                           "self.clip_round(...) unchanged (set QuantizerMixture.fused = False)")
    return box[0], None


class _FusedMix(torch.autograd.Function):
    """q = Σ_k c_k·Q_k(x) in one Function: the clip-round members' Q_k are computed here (the
    same float32 operations as :class:`~lowbit.quant.functional._ClipRound`, summed in the same
    order as :func:`weighted_sum`: the forward value is bit-identical), the other members'
    outputs come in as tensors.

    ``plan[k]`` is ``n_steps`` for a clip-round member (its ``low``, ``high`` are next in
    ``tensors``) or None (its output is next). Backward, one pass per distinct clip range::

        dL/dx     = Σ_k c_k·1[low_k <= x <= high_k]·G   (members with equal ranges merged)
        dL/dc_k   = <G, Q_k>
        dL/dhigh_k = c_k·Σ G·1[x > high_k]              (PACT's α)
        dL/dQ_k   = c_k·G                               (members run outside)

    The x and high gradients sum the same terms as per-member Functions, in another order
    (float rounding may differ in the last bits); the c gradient is the same dot products.
    With the opt-in compiled kernels (:mod:`lowbit.quant.compiled`) and clip-round members only,
    forward and backward are one compiled pass each: the Q_k are exact, their weighted sum is
    products and adds instead of eager's fused multiply-add (equal up to the last bit), and the
    Q_k are recomputed in the backward instead of being stored.
    """

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, plan: tuple, *tensors: Tensor) -> Tensor:
        ctx.compiled, ctx.xmin, ctx.native = None, None, None
        if (all(n is not None for n in plan) and len(plan) <= _native.MAX_MEMBERS and not _compiled.active(x)
                and _native.active(x)):
            b = [_bounds(tensors[2 * k], tensors[2 * k + 1], n) for k, n in enumerate(plan)]
            if all(isinstance(v, float) for r in b for v in r):  # per-tensor ranges: one native pass
                lo, hi, st = (list(v) for v in zip(*b))
                out = _native.mix_fwd(x, lo, hi, st, c.detach().tolist())
                ctx.save_for_backward(x, c)
                ctx.plan, ctx.native = plan, (lo, hi, st)
                return out
        if all(n is not None for n in plan) and _compiled.active(x) and c.dtype == x.dtype:
            b = [_bounds(tensors[2 * k], tensors[2 * k + 1], n) for k, n in enumerate(plan)]
            if all(isinstance(v, float) for lo, hi, st in b for v in (lo, hi, st)):
                lo, hi, st = (torch.tensor(v, dtype=torch.float32) for v in zip(*b))
                nz = any(v != 0.0 for v in lo.tolist())
                out = _compiled.mix_fwd(x, c.detach(), lo, hi, st, nz)
                if out is not None:  # opt-in: one compiled pass; Q_k recomputed in backward
                    ctx.save_for_backward(x, c)
                    ctx.plan, ctx.clips, ctx.compiled = plan, [(u, v) for u, v, _ in b], (lo, hi, st, nz)
                    return out
        cf = c.detach().tolist()
        qs, clips, i, need_high = [], [], 0, False
        for n in plan:
            if n is None:
                qs.append(tensors[i])
                clips.append(None)
                i += 1
            else:
                qs.append(None)
                clips.append(_bounds(tensors[i], tensors[i + 1], n))
                need_high = need_high or ctx.needs_input_grad[3 + i + 1]  # this member's high (PACT's α)
                i += 2
        _clip_values(x, clips, qs)
        clips = [r if r is None else r[:2] for r in clips]
        # the smallest input, read once on CPU when a clip gradient is wanted (see clip_sum_above)
        ctx.xmin = float(x.min()) if need_high and x.device.type == "cpu" and x.numel() else None
        out = torch.mul(qs[0], cf[0])
        for ck, qk in zip(cf[1:], qs[1:]):
            out.add_(qk, alpha=ck)
        ctx.save_for_backward(x, c, *qs)
        ctx.plan, ctx.clips = plan, clips
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, c, *qs = ctx.saved_tensors
        cf = c.tolist()
        if ctx.native is not None:
            return _FusedMix.native_backward(ctx, g, x, c, cf)
        if ctx.compiled is not None:
            r = _compiled.mix_bwd(g, x, c.detach(), *ctx.compiled)
            if r is not None:
                gx, gc, above = r
                grads = []
                for k in range(len(ctx.plan)):
                    grads += [None, (above[k] * cf[k]).reshape(()) if ctx.needs_input_grad[4 + 2 * k] else None]
                return (gx if ctx.needs_input_grad[0] else None, gc.to(c.dtype) if ctx.needs_input_grad[1] else None,
                        None, *grads)
            qs = [clip_round_values(x, torch.tensor(lo), torch.tensor(hi), n)[0]  # compile failed: eager
                  for (lo, hi), n in zip(ctx.clips, ctx.plan)]
        gc = None
        if ctx.needs_input_grad[1]:
            gf = g.reshape(-1)
            gc = torch.stack([torch.dot(gf, q.reshape(-1)) for q in qs]).to(c.dtype)
        # clip members with the same (float) range share one masked pass
        groups: dict = {}
        for k, r in enumerate(ctx.clips):
            if r is not None:
                key = r if isinstance(r[0], float) and isinstance(r[1], float) else k
                rng, w = groups.get(key, (r, 0.0))
                groups[key] = (rng, w + cf[k])
        gx = None
        inside: dict = {}  # a float range -> sum(g·1[lo <= x <= hi]), for the clip gradients below
        if ctx.needs_input_grad[0]:
            for key, ((lo, hi), w) in groups.items():
                part = clip_mask_grad(g, x, lo, hi)
                if isinstance(key, tuple) and ctx.xmin is not None and ctx.xmin >= lo:  # xmin: a high wants grad
                    inside[hi] = part.sum()  # no x below lo: sum(g·1[x > hi]) = sum(g) − this
                if gx is None:
                    gx = part if w == 1.0 else part.mul_(w)
                else:
                    gx.add_(part, alpha=w)
        gsum = g.sum() if inside else None
        grads, i, above = [], 3, {}
        for k, n in enumerate(ctx.plan):
            if n is None:
                grads.append((g if cf[k] == 1.0 else g * cf[k]) if ctx.needs_input_grad[i] else None)
                i += 1
                continue
            ghigh = None
            if ctx.needs_input_grad[i + 1]:
                hi = ctx.clips[k][1]
                key = hi if isinstance(hi, float) else k
                if key not in above:
                    above[key] = gsum - inside[hi] if key in inside else clip_sum_above(g, x, hi)
                ghigh = (above[key] * cf[k]).reshape(())
            grads += [None, ghigh]
            i += 2
        return (gx, gc, None, *grads)

    @staticmethod
    def native_backward(ctx, g: Tensor, x: Tensor, c: Tensor, cf: list[float]):
        """The backward of the native forward (every member clip-round with a float range): one
        pass. The input gradient merges members with equal ranges as the eager backward does
        (first range ``g·w``, the next as fused multiply-adds: bit-identical); the coefficient
        and clip gradients are the same sums accumulated in double."""
        lo, hi, st = ctx.native
        k = len(lo)
        highs = [ctx.needs_input_grad[4 + 2 * j] for j in range(k)]
        groups = None
        if ctx.needs_input_grad[0]:
            merged: dict = {}
            for j in range(k):
                w = merged.get((lo[j], hi[j]), 0.0)
                merged[(lo[j], hi[j])] = w + cf[j]
            groups = [(u, v, w) for (u, v), w in merged.items()]
        gx, gc, above = _native.mix_bwd(g, x, lo, hi, st, groups, bool(groups) and groups[0][2] == 1.0,
                                        ctx.needs_input_grad[1], any(highs))
        grads = []
        for j in range(k):
            grads += [None, (torch.tensor(above[j], dtype=x.dtype) * cf[j]).reshape(()) if highs[j] else None]
        gct = torch.tensor(gc, dtype=c.dtype) if ctx.needs_input_grad[1] else None
        return (gx, gct, None, *grads)


def _clip_values(x: Tensor, bounds: list, qs: list) -> None:
    """qs[k] = the clip-round member k's Q_k(x) for ``bounds[k] = (lo, hi, step)`` (None: not a
    clip member), with the same float32 operations as :func:`clip_round_values`; members with the
    same float range share the clamp (min-max members do: one running range)."""
    for k, b in enumerate(bounds):
        if b is None or qs[k] is not None:
            continue
        lo, hi, step = b
        if not (isinstance(lo, float) and isinstance(hi, float)):
            qs[k] = clip_values(x, lo, hi, step)
            continue
        same = [j for j in range(k, len(bounds)) if bounds[j] is not None and qs[j] is None
                and bounds[j][0] == lo and bounds[j][1] == hi and isinstance(bounds[j][0], float)]
        t = torch.clamp(x, lo, hi)
        if lo != 0.0:
            t.sub_(lo)
        for i, j in enumerate(same):
            st = bounds[j][2]
            q = t.div_(st) if i == len(same) - 1 else torch.div(t, st)
            qs[j] = _codes_to_values(q.round_(), lo, st)


def fused_mix(x: Tensor, c: Tensor, members: Sequence[Quantizer]) -> Tensor:
    """Σ_k c_k·members[k](x) (c: a K-vector, possibly requiring grad) with the clip-round members
    computed in one :class:`_FusedMix` (one backward instead of K Functions and K-1 sums)."""
    plan, tensors = [], []
    for m in members:
        rng, out = _clip_member(m, x)
        if rng is None:
            plan.append(None)
            tensors.append(out)
        else:
            plan.append(2**m.bits - 1)
            tensors += list(rng)
    if all(n is None for n in plan):
        return weighted_sum(c, tensors)
    return _FusedMix.apply(x, c, tuple(plan), *tensors)


def _r(v: float, digits: int = 5) -> float:
    """Round to ``digits`` significant digits (keeps metrics.jsonl small)."""
    return float(f"{v:.{digits}g}") if math.isfinite(v) else v


def eq7_init(bits: Sequence[int]) -> list[float]:
    """003 eq. 7: α_k = Σ_{j≠k} n_j / Σ_j n_j (the lowest bit width gets the largest α)."""
    total = float(sum(bits))
    return [(total - n) / total for n in bits]


class AttentionMixture(QuantizerMixture):
    """DQA's layer (003 eq. 2-4): q = Σ_k a_k Q_k(x), a = softmax(α/T), α learned.

    α is initialised by eq. 7; the temperature T is set from outside (the method's schedule,
    eq. 5) and :meth:`normalize_` applies Algorithm 1's α ← α/std(α) before each step.
    """

    def __init__(self, members: Sequence[Quantizer], eval_mode: str = "final", temperature: float = 100.0):
        super().__init__(members, eval_mode)
        self.alpha = nn.Parameter(torch.tensor(eq7_init([m.bits for m in members])))
        self.temperature = float(temperature)

    def attention(self) -> Tensor:
        """a = softmax(α/T) (003 eq. 4)."""
        return torch.softmax(self.alpha / self.temperature, 0)

    def coefficients(self) -> Tensor:
        return self.attention()

    @torch.no_grad()
    def normalize_(self, eps: float = 1e-12) -> None:
        """α ← α/std(α) (003 Algorithm 1; torch's unbiased std). Skipped when std is 0 or not
        finite (all α equal: the softmax is uniform anyway, and dividing would give inf/NaN)."""
        s = self.alpha.std()
        if torch.isfinite(s) and s > eps:
            self.alpha.div_(s)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", T={self.temperature:.4g}"


class ScheduledMixture(QuantizerMixture):
    """BinaryRelax's layer: q = (ω·Q_1(x) + Σ_{k>1} Q_k(x)) / (ω + K - 1), ω set from outside.

    K = 2 with Q_2 = FP is the original (η·Q(w) + w)/(1 + η) of Yin et al. 2018; K = 3 is 003 eq. 8.
    ``omega = inf`` gives Q_1 exactly (BinaryRelax's second, purely quantized phase).
    """

    def __init__(self, members: Sequence[Quantizer], eval_mode: str = "final", omega: float = 1.0):
        super().__init__(members, eval_mode)
        self.omega = float(omega)

    def coefficients(self) -> Tensor:
        k = len(self.members)
        if math.isinf(self.omega):
            c = torch.zeros(k)
            c[0] = 1.0
            return c
        c = torch.ones(k)
        c[0] = self.omega
        return c / (self.omega + k - 1)


# ---------------------------------------------------------------------------------------------
# the method part both share
# ---------------------------------------------------------------------------------------------
def mixture_layers(model: nn.Module) -> Iterator[tuple[str, str, QuantizerMixture]]:
    """(layer name, "weight" | "act", module) for every mixture in a quantized model."""
    from ..quantize import weight_param

    for name, m in model.named_modules():
        wp = weight_param(m)
        if isinstance(wp, QuantizerMixture):
            yield name, "weight", wp
        aq = getattr(m, "input_quantizer", None)
        if isinstance(aq, QuantizerMixture):
            yield name, "act", aq


def distinct_values_check(model: nn.Module) -> tuple[int, int, dict[str, int]]:
    """Count, per quantized layer, the distinct values of ``layer.weight`` (per output channel for a
    per-channel Q_1) and compare with 2^n_1. Returns (layers within bound, layers, counts)."""
    from ..quantize import weight_param

    ok, total, counts = 0, 0, {}
    with torch.no_grad():
        for name, m in model.named_modules():
            wp = weight_param(m)
            if wp is None:
                continue
            w = m.weight
            q1 = wp.quantizer
            if q1.bits >= 32:
                continue
            if q1.per_channel:
                n = max(int(torch.unique(row).numel()) for row in w.flatten(1))
            else:
                n = int(torch.unique(w).numel())
            counts[name] = n
            total += 1
            ok += n <= 2**q1.bits
    return ok, total, counts


class MixtureMethod(Method):
    """The method part DQA and BinaryRelax share: build members around the plan's final quantizer,
    step a schedule, harden at the end, record coefficients per epoch, check the final network.

    Members with no more bits than a layer's final quantizer are left out for that layer (a layer
    the plan keeps at 8 bits gets no 8-bit member); a layer left with no member is plain STE.
    """

    def __init__(self, mixture: Any = None, act_mixture: Any = None, eval_mode: str = "final",
                 record_points: int = 33):
        super().__init__()
        if eval_mode not in EVAL_MODES:
            raise ConfigError(f"option eval_mode must be one of {', '.join(EVAL_MODES)}, got {eval_mode!r}")
        if not isinstance(record_points, int) or isinstance(record_points, bool) or record_points < 0:
            raise ConfigError(f"option record_points must be an integer >= 0, got {record_points!r}")
        self.mixture = parse_members(mixture, "weight", "mixture")
        self.act_mixture = parse_members(act_mixture, "act", "act_mixture")
        self.eval_mode = eval_mode
        self.record_points = record_points
        self.step = -1
        self.finalized = False
        self.q1_weight_at_end: dict[str, float] = {}
        self._labels: dict[str, str] = {}
        self._ready = False

    def _check_setup(self) -> None:
        # the schedules are functions of the batch index over the whole run: without setup() they
        # would silently stay at their start values
        if not self._ready or self.total_steps <= 0:
            raise RuntimeError(f"method '{self.name}': call setup(model, total_steps, steps_per_epoch) before "
                               "training (lowbit.train.run does)")

    # -- building layers -------------------------------------------------------------------------
    def _members(self, spec: QuantSpec, extra: list[dict] | None, role: str, layer: str) -> list[Quantizer]:
        q1 = build_from_spec(spec, role)
        if q1.bits >= 32:
            raise ConfigError(f"plan.{role} of layer '{layer}': the final quantizer must be low-bit, got {spec.name}")
        higher = [build_member(s, role, f"{'act_' if role == 'act' else ''}mixture") for s in extra or []]
        return [q1] + [m for m in higher if m.bits > q1.bits]

    def make_mixture(self, members: list[Quantizer]) -> QuantizerMixture:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_parametrization(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        members = self._members(spec, self.mixture, "weight", layer)
        return QuantizedWeight(members[0]) if len(members) == 1 else self.make_mixture(members)

    def act_quantizer(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        members = self._members(spec, self.act_mixture, "act", layer)
        return members[0] if len(members) == 1 else self.make_mixture(members)

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self._ready = True
        roles = {r for _, r, _ in mixture_layers(model)}
        if self.act_mixture and "act" not in roles:
            from ..quantize import quant_state

            if not any(lp.act is not None for lp in getattr(quant_state(model), "layers", [])):
                raise ConfigError("plan.method.act_mixture is set but no layer has an activation quantizer (plan.act)")
            raise ConfigError("plan.method.act_mixture: no member has more bits than the layers' activation "
                              "quantizer (plan.act), so no layer is a mixture and this would be plain STE")
        if self.mixture and "weight" not in roles:
            raise ConfigError("plan.method.mixture: no member has more bits than the layers' weight quantizer "
                              "(plan.weight), so no layer is a mixture and this would be plain STE")

    # -- the end ---------------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> None:
        """Make the network exactly Q_1: harden every weight mixture (``layer.weight`` = Q_1(w),
        ``.quantizer`` = Q_1 for export) and put each activation mixture's Q_1 itself in its place
        as ``layer.input_quantizer``. Remembers how much weight Q_1 had just before."""
        self._labels = self._mixture_labels(model)
        for name, role, m in list(mixture_layers(model)):
            self.q1_weight_at_end[f"{name}:{role}" if role == "act" else name] = float(m.coefficients().detach()[0])
            m.harden()
            if role == "act":
                model.get_submodule(name).input_quantizer = m.members[0]
        self.finalized = True

    @staticmethod
    def _mixture_labels(model: nn.Module) -> dict[str, str]:
        layers = list(mixture_layers(model))
        out = {}
        for role, key in (("weight", "mixture"), ("act", "act mixture")):
            labels = sorted({"+".join(m.labels()) for _, r, m in layers if r == role})
            if labels or role == "weight":
                out[key] = ", ".join(labels) or "none"
        return out

    # -- records ---------------------------------------------------------------------------------
    def epoch_record(self, model: nn.Module) -> dict:
        """Per layer: the coefficients (``attention``, ``act_attention``), the member labels
        (``mixture``) and the quantization function q(w) (``qfunc``: [w points, q points])."""
        att, act_att, labels, qfunc = {}, {}, {}, {}
        for name, role, m in mixture_layers(model):
            c = [_r(v, 6) for v in m.coefficients().detach().tolist()]
            if role == "weight":
                att[name] = c
                labels[name] = m.labels()
                if self.record_points:
                    w = _latent(model, name)
                    qfunc[name] = list(m.transfer_curve(w, self.record_points))
            else:
                act_att[name] = c
                labels[f"{name}:act"] = m.labels()
        out = {"attention": att, "mixture": labels}
        if act_att:
            out["act_attention"] = act_att
        if qfunc:
            out["qfunc"] = qfunc
        return out

    def summary(self, model: nn.Module) -> dict:
        """The mixtures; once the network is Q_1 (finalized, or evaluated with eval_mode "final"),
        the check that every quantized layer's weight has at most 2^n_1 distinct values."""
        out = dict(self._labels) if self.finalized else self._mixture_labels(model)
        layers = list(mixture_layers(model))
        if self.finalized or (layers and all(m.is_final() for _, _, m in layers)):
            ok, total, _ = distinct_values_check(model)
            out["exact Q1"] = (f"{'yes' if ok == total else 'NO'}: {ok}/{total} quantized layers have "
                               f"<= 2^n1 distinct weight values")
            if self.q1_weight_at_end:
                out["Q1 weight at end"] = (f"min {min(self.q1_weight_at_end.values()):.4f} over "
                                           f"{len(self.q1_weight_at_end)} mixtures, before hardening")
        return out

    def state_dict(self) -> dict:
        # with the schedule's length: a state read into a method set up for another run (DCQ's fine-tune, a run
        # reloaded for eval) gives the temperature / omega of the step it was saved at
        return {"step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def end_schedule(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        self.setup(model, total_steps, steps_per_epoch)
        self.load_state_dict({**self.state_dict(), "step": total_steps - 1})

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", -1))
        self.total_steps = int(state.get("total_steps", self.total_steps))  # a state saved before session 26: no length
        self.steps_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))


def _latent(model: nn.Module, layer: str) -> Tensor:
    """The latent (full-precision) weight of a parametrized layer."""
    return model.get_submodule(layer).parametrizations.weight.original
