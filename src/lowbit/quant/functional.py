"""Shared quantization primitives: straight-through rounding, clipped STE, per-channel
reductions, the uniform grid and the fused activation kernels.

Every quantizer and method builds on these, so each rule exists once:

* :func:`ste`, :func:`round_ste`, :func:`grad_scale` - straight-through estimators
  (Bengio et al. 2013) and LSQ's gradient scaling (Esser et al. 2020);
* :func:`channel_view`, :func:`reduce_abs_mean` - per-output-channel statistics;
* :func:`_bounds`, :func:`_codes_to_values`, :func:`grid_levels` - the uniform grid
  ``lo + k*step``, computed with the same float32 ops everywhere so outputs and ``levels()``
  agree bit for bit;
* :func:`clip_round` / :func:`clip_round_levels` (:class:`_ClipRound`) and :func:`lsq_quantize`
  (:class:`_LSQFn`) - the fused clip + round kernels with a clipped straight-through gradient.
"""

from __future__ import annotations

import contextlib

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from . import compiled as _compiled
from . import native as _native

_EPS = 1e-8
_aten = torch.ops.aten


def _next_float(v: float, dtype: torch.dtype, up: bool) -> float:
    """The neighbour of ``v`` (rounded to ``dtype``) towards +inf (``up``) or -inf, in ``dtype``.

    For x of that dtype, ``x > _next_float(v, dt, False)`` <=> ``x >= v`` and ``x < _next_float(v,
    dt, True)`` <=> ``x <= v``: aten's fused strict-inequality kernels (``hardtanh_backward``,
    ``threshold_backward``) then give exactly the inclusive masks, in one pass.
    """
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(v), np.float32(np.inf if up else -np.inf)))
    return float(torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(math.inf if up else -math.inf, dtype=dtype)))


# ---------------------------------------------------------------------------------------------
# straight-through primitives
# ---------------------------------------------------------------------------------------------
def ste(x: Tensor, q: Tensor) -> Tensor:
    """Return ``q`` in the forward pass with the gradient of ``x`` (``dq/dx := 1``).

    Written as ``q + (x - x.detach())`` rather than ``x + (q - x).detach()``: the second form
    adds float rounding error, so the forward value would not lie exactly on the level set.
    """
    return q.detach() + (x - x.detach())


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity in the backward pass (Bengio et al. 2013 STE)."""
    return ste(x, torch.round(x))


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Forward ``x`` unchanged, multiply its gradient by ``scale`` (LSQ's gradient scaling).

    Written as ``x + (y - y.detach())``, y = x·scale, as :func:`ste`: ``(x - y).detach() + y`` rounds twice and
    moved about 0.3 % of float32 values by one ulp."""
    y = x * scale
    return x.detach() + (y - y.detach())


def autocast_off(x: Tensor):
    """``(context, x)`` for a quantizer's forward under ``torch.autocast``: a context that turns autocast off and ``x``
    in float32 where it is float16/bfloat16, as ``torch.amp.custom_fwd(cast_inputs=torch.float32)`` does; outside
    autocast ``(contextlib.nullcontext(), x)``. Quantization runs in float32 (the rules of :data:`lowbit.quant.base.RULES`) whatever the
    layers around it compute in: before session 29 a quantizer under autocast computed in the layer input's
    bfloat16 (codes one off at any bits, LSQ's step initialised as a bfloat16 parameter and its gradient from
    bfloat16 sums) and SAWB's alpha search summed its errors in bfloat16 (``linalg.vecdot`` is on CPU autocast's
    list): another alpha than the float32 forward, evaluation and the export use."""
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return contextlib.nullcontext(), x
    return torch.autocast(dev, enabled=False), (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)


_shared_ranges: list[dict] = []  # a stack: one dict per open shared_batch_range()


@contextmanager
def shared_batch_range():
    """Within this block, :func:`batch_aminmax` of the same tensor is computed once: the members
    of an activation mixture (003's 2/4/8-bit min-max members) all read the batch's min and max,
    and each would otherwise make its own pass over the layer input."""
    _shared_ranges.append({})
    try:
        yield
    finally:
        _shared_ranges.pop()


def batch_aminmax(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(min, max) of ``x`` (detached, as ``dtype``); shared inside :func:`shared_batch_range`."""
    if not _shared_ranges:
        return x.detach().to(dtype).aminmax()
    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version, x.dtype, x.device, dtype)
    cache = _shared_ranges[-1]
    if key not in cache:
        cache[key] = x.detach().to(dtype).aminmax()
    return cache[key]


def channel_view(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-output-channel statistic of shape (C,) to broadcast against ``x`` (C, ...)."""
    return stat.reshape((-1,) + (1,) * (x.dim() - 1))


def reduce_abs_mean(x: Tensor, per_channel: bool) -> Tensor:
    """E|x| over the tensor, or per output channel (dim 0), shaped to broadcast against x."""
    if per_channel:
        return channel_view(x.detach().abs().flatten(1).mean(1), x)
    return x.detach().abs().mean()


# ---------------------------------------------------------------------------------------------
# fused clip + round with a clipped straight-through gradient
# ---------------------------------------------------------------------------------------------
def _bounds(low: Tensor, high: Tensor, n_steps: int):
    """(lo, hi, step): Python floats for a per-tensor range on the CPU (cheap in-place ops on big
    activation tensors), detached tensors shaped like ``low`` otherwise (per channel, or on an
    accelerator, where ``float()`` would wait for the device every step)."""
    if low.numel() == 1 and high.numel() == 1 and low.device.type == "cpu":  # float(): no sync on CPU
        lo, hi = float(low.detach()), float(high.detach())
        return lo, hi, max((hi - lo) / n_steps, _EPS)
    lo, hi = low.detach(), high.detach()
    return lo, hi, ((hi - lo) / n_steps).clamp_min(_EPS)


def _codes_to_values(k: Tensor, lo, step) -> Tensor:
    """Integer codes (as floats) -> values ``k*step + lo``, in place. The one place this is done,
    so that forward outputs and ``levels()`` agree bit for bit."""
    k.mul_(step)
    if not (isinstance(lo, float) and lo == 0.0):
        k.add_(lo)
    return k


def grid_levels(lo, step, n_levels: int, dtype=torch.float32) -> Tensor:
    """The levels ``lo + i*step`` (i < n_levels): (L,) for float/scalar bounds, (C, L) per channel;
    built on the device of ``step`` when it is a tensor."""
    k = torch.arange(n_levels, dtype=dtype, device=step.device if isinstance(step, Tensor) else None)
    if isinstance(step, Tensor) and step.numel() > 1:
        k = k.repeat(step.numel(), 1)
        return _codes_to_values(k, lo.reshape(-1, 1), step.reshape(-1, 1))
    if isinstance(step, Tensor):
        step, lo = step.reshape(()), lo.reshape(())
    return _codes_to_values(k, lo, step)


class _ClipRound(torch.autograd.Function):
    """q = low + round((clamp(x, low, high) - low) / step) * step,  step = (high - low) / n_steps.

    Backward (clipped STE, PACT's rule for the upper clip):
        dq/dx    = 1[low <= x <= high]
        dq/dhigh = 1[x > high]          (only when ``high`` requires grad: PACT's learned alpha)
        dq/dlow  = 1[x < low]           (only when ``low`` requires grad: a learned offset)

    This runs on every activation of every step: a per-tensor range is read once as Python
    floats and the forward is one clamp plus in-place ops (no sub/add when low = 0, post-ReLU).
    ``low``/``high`` may also be per-channel tensors (SAWB per output channel).
    """

    @staticmethod
    def forward(ctx, x: Tensor, low: Tensor, high: Tensor, n_steps: int):
        ctx.native = None
        ctx.shapes = (low.shape, high.shape)
        if not _compiled.active(x) and _native.active(x):  # the default on CPU: one native pass
            lo, hi, step = _bounds(low, high, n_steps)
            if isinstance(lo, float):
                q = _native.mix_fwd(x, [lo], [hi], [step], None)
                ctx.save_for_backward(x)
                ctx.range, ctx.native = (lo, hi), step
                return q
        q, lo, hi = clip_round_values(x, low, high, n_steps)
        ctx.save_for_backward(x)
        ctx.range = (lo, hi)
        ctx.none_below = ctx.needs_input_grad[2] and none_below(x, lo)
        return q

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.range
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] and ctx.shapes[1].numel() > 1:
            # a learned low, or a learned per-channel high: before session 27 low got no gradient (None, silently)
            # and a per-channel high failed in autograd (a 0-dim gradient for a (C, 1, ...) tensor)
            gx = clip_mask_grad(g, x, lo, hi) if ctx.needs_input_grad[0] else None
            glow = torch.where(x < lo, g, 0).sum_to_size(ctx.shapes[0]) if ctx.needs_input_grad[1] else None
            ghigh = torch.where(x > hi, g, 0).sum_to_size(ctx.shapes[1]) if ctx.needs_input_grad[2] else None
            return gx, glow, ghigh, None
        if ctx.native is not None:  # one pass: dx (bit-identical to the eager mask) and Σ g·1[x > hi]
            gx, _, above = _native.mix_bwd(g, x, [lo], [hi], [ctx.native],
                                           [(lo, hi, 1.0)] if ctx.needs_input_grad[0] else None, True, False,
                                           ctx.needs_input_grad[2])
            ghigh = torch.tensor(above[0], dtype=x.dtype).reshape(()) if ctx.needs_input_grad[2] else None
            return gx, None, ghigh, None
        if isinstance(lo, float) and _compiled.active(x):  # opt-in: one compiled pass
            r = _compiled.clip_bwd(g, x, lo, hi)
            if r is not None:
                return r[0], None, r[1].reshape(()) if ctx.needs_input_grad[2] else None, None
        gx = clip_mask_grad(g, x, lo, hi)
        ghigh = None
        if ctx.needs_input_grad[2]:
            ghigh = (clip_sum_above(g, x, hi, gx) if ctx.none_below else clip_sum_above(g, x, hi)).reshape(())
        return gx, None, ghigh, None


def clip_round_values(x: Tensor, low: Tensor, high: Tensor, n_steps: int):
    """:class:`_ClipRound`'s forward without autograd: ``(q, lo, hi)``, lo/hi as :func:`_bounds`
    gives them (the fused mixture of :mod:`lowbit.methods.mixture` computes its members with it)."""
    lo, hi, step = _bounds(low, high, n_steps)
    return clip_values(x, lo, hi, step), lo, hi


def clip_values(x: Tensor, lo, hi, step) -> Tensor:
    """``lo + round((clamp(x, lo, hi) - lo)/step)*step`` for bounds from :func:`_bounds`."""
    if isinstance(lo, float) and _compiled.active(x):  # opt-in: the same float32 ops in one pass
        q = _compiled.clip_fwd(x, lo, hi, step)
        if q is not None:
            return q
    q = torch.clamp(x, lo, hi)
    if not (isinstance(lo, float) and lo == 0.0):
        q.sub_(lo)
    q.div_(step).round_()
    return _codes_to_values(q, lo, step)


def clip_mask_grad(g: Tensor, x: Tensor, lo, hi) -> Tensor:
    """``g·1[lo <= x <= hi]``. For float bounds one fused aten pass (``hardtanh_backward`` with the
    neighbouring floats as strict bounds: bit-identical to the mask product, which converts the
    bool mask to float first and is 3-8x slower on CPU)."""
    if isinstance(lo, float) and isinstance(hi, float):
        return _aten.hardtanh_backward(g, x, _next_float(lo, x.dtype, False), _next_float(hi, x.dtype, True))
    return g * (x >= lo).logical_and_(x <= hi)


def none_below(x: Tensor, lo) -> bool:
    """True when no entry of ``x`` lies below a float ``lo`` (a post-ReLU input of a clip at 0), read
    in the forward on CPU (one read-only pass; no host synchronisation is added on other devices)."""
    return isinstance(lo, float) and x.device.type == "cpu" and x.numel() > 0 and bool(x.min() >= lo)


def clip_sum_above(g: Tensor, x: Tensor, hi, inside: Tensor | None = None) -> Tensor:
    """``sum(g·1[x > hi])`` (PACT's clip gradient), one fused pass for a float ``hi``. Given
    ``inside = g·1[lo <= x <= hi]`` of an ``x`` with nothing below ``lo`` (:func:`none_below`), it is
    ``sum(g) − sum(inside)``: two read-only sums instead of a masked tensor (the same terms; float32
    sums of 10^6 terms agree to ~1e-6 relative)."""
    if inside is not None:
        return g.sum() - inside.sum()
    if isinstance(hi, float):
        return _aten.threshold_backward(g, x, hi).sum()
    return (g * (x > hi)).sum()


def lsq_quantize(v: Tensor, s: Tensor, qn: int, qp: int, gscale: float) -> Tensor:
    """round(clamp(v/s, -qn, qp))*s with LSQ's gradients (see :class:`_LSQFn`)."""
    return _LSQFn.apply(v, s, qn, qp, gscale)


def clip_round(x: Tensor, low: Tensor, high: Tensor, bits: int) -> Tensor:
    return _ClipRound.apply(x, low, high, 2**bits - 1)


def clip_round_levels(low: Tensor, high: Tensor, bits: int, per_channel: bool = False, dtype=None) -> Tensor:
    """The exact value set :func:`clip_round` maps onto for this range ((C, L) per channel), in
    ``dtype`` (the input's; default that of ``low``)."""
    lo, _, step = _bounds(low, high, 2**bits - 1)
    lv = grid_levels(lo, step, 2**bits, dtype or low.dtype)
    return lv.reshape(-1, 2**bits) if per_channel else lv


def clip_round_grid(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(low, step) of :func:`clip_round`'s grid as the float32 constants its forward uses, (R,)."""
    lo, _, step = _bounds(low, high, 2**bits - 1)
    f = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu()  # noqa: E731
    return f(lo), f(step)


class _LSQFn(torch.autograd.Function):
    """LSQ (Esser et al. 2020, eq. 1-3): v_hat = round(clamp(v/s, -Qn, Qp)) * s.

    Backward (the paper's eq. 3, strict inequalities):
        d v_hat / d v = 1[-Qn < v/s < Qp]
        d v_hat / d s = round(v/s) - v/s  inside,  -Qn  if v/s <= -Qn,  Qp  if v/s >= Qp;
                        times the gradient scale g = 1/sqrt(N*Qp)
    ``s`` is a scalar or a per-channel tensor shaped to broadcast against ``v``. Inside the range
    round(v/s) - v/s = (v_hat - v)/s, so the step gradient needs no second rounding pass.
    """

    @staticmethod
    def forward(ctx, v: Tensor, s: Tensor, qn: int, qp: int, gscale: float):
        ctx.native = False
        if s.numel() == 1 and s.device.type == "cpu":
            sf = float(s)
            q = _compiled.lsq_fwd(v, sf, qn, qp) if _compiled.active(v) else None  # opt-in, same ops
            if q is None and _native.active(v):  # the default on CPU: one pass, q recomputed in backward
                ctx.save_for_backward(v, s)
                ctx.q, ctx.native = (qn, qp, gscale), True
                return _native.lsq_fwd(v, 1.0 / sf, sf, qn, qp)
            if q is None:
                q = torch.mul(v, 1.0 / sf).clamp_(-qn, qp).round_().mul_(sf)  # same ops as levels()
        elif s.numel() == 1:  # the same float32 operations without a host sync: f32(1/f64(s))
            q = torch.mul(v, (1.0 / s.detach().double()).to(v.dtype)).clamp_(-qn, qp).round_().mul_(s.detach())
        else:
            q = torch.div(v, s).clamp_(-qn, qp).round_().mul_(s)
        ctx.save_for_backward(v, s, q)
        ctx.q = (qn, qp, gscale)
        return q

    @staticmethod
    def backward(ctx, g: Tensor):
        qn, qp, gscale = ctx.q
        if ctx.native:  # one pass: gv (bit-identical to hardtanh_backward) and the two dot products
            v, s = ctx.saved_tensors
            sf = float(s)
            gv, gq, gvv = _native.lsq_bwd(g, v, 1.0 / sf, sf, qn, qp, -qn * sf, qp * sf, ctx.needs_input_grad[1])
            gs = ((gq - gvv) / s * gscale).reshape(s.shape) if ctx.needs_input_grad[1] else None
            return gv, gs, None, None, None
        v, s, q = ctx.saved_tensors
        cpu_scalar = s.numel() == 1 and s.device.type == "cpu"
        lo, hi = (-qn * float(s), qp * float(s)) if cpu_scalar else (-qn * s, qp * s)
        r = _compiled.lsq_bwd(g, v, float(s), qn, qp) if cpu_scalar and _compiled.active(v) else None
        if r is not None:  # opt-in: one compiled pass (the step gradient's sums in another order)
            gv, gin, above, below = r
            gs = None
            if ctx.needs_input_grad[1]:
                gs = gin / s + qp * above
                if qn:
                    gs = gs - qn * below
                gs = (gs * gscale).reshape(s.shape)
            return gv, gs, None, None, None
        if cpu_scalar:
            # the activation path: one fused aten pass for the input gradient (bit-identical to the
            # masks below) and two read-only dot products for the step gradient. With q/s =
            # clamp(round(v/s), -Qn, Qp), eq. 3's d v_hat/d s is q/s - (v/s)·1[inside] everywhere
            # (Qp above, -Qn below, round(v/s) - v/s inside), so
            #     dL/ds = (Σ g·q - Σ g·1[inside]·v) / s = (g·q - gv·v) / s
            # (the same sums as the masks, in another order; no mask or difference tensor is written)
            gv = _aten.hardtanh_backward(g, v, lo, hi)  # g where lo < v < hi (strict, eq. 3)
            gs = None
            if ctx.needs_input_grad[1]:
                gs = (torch.dot(g.reshape(-1), q.reshape(-1)) - torch.dot(gv.reshape(-1), v.reshape(-1))) / s
                gs = (gs * gscale).reshape(s.shape)
            return gv, gs, None, None, None
        above = v >= hi
        below = v <= lo
        inside = above.logical_or(below).logical_not_()
        gv = g * inside
        gs = None
        if ctx.needs_input_grad[1]:
            if s.numel() == 1:
                gs = torch.dot(gv.reshape(-1), (q - v).reshape(-1)) / s + qp * (g * above).sum()
                if qn:
                    gs = gs - qn * (g * below).sum()
                gs = (gs * gscale).reshape(s.shape)
            else:  # per-channel step (weights: small tensors)
                ds = torch.where(inside, (q - v) / s, torch.where(above, float(qp), float(-qn)))
                dims = [d for d in range(g.dim()) if s.shape[d] == 1]
                gs = (g * ds).sum(dim=dims, keepdim=True) * gscale
        return gv, gs, None, None, None


# ---------------------------------------------------------------------------------------------
# nearest-level search and the clipped straight-through estimator
# ---------------------------------------------------------------------------------------------
#: up to this many levels the nearest level is found by comparisons with the midpoints (a uint8
#: counter; measured about 3x faster than searchsorted for 8 levels on CPU), above by searchsorted
_COMPARE_MAX_LEVELS = 16


def nearest_index(rows: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level for every entry: ``rows`` (R, N), ``levels`` (R, L) or (1, L)
    (shared by all rows), sorted along dim 1.

    The index counts the float32 midpoints ``(l_j + l_{j+1})/2`` that are <= x, so an entry
    exactly half-way between two levels goes to the upper one (sign(0) = +1 for {-b, b}); this
    is the ``nearest`` rule of :meth:`lowbit.quant.Quantizer.describe`. uint8 for at most
    ``_COMPARE_MAX_LEVELS`` levels, else int64 (one batched ``searchsorted``)."""
    mid = (levels[:, 1:] + levels[:, :-1]) / 2
    if levels.shape[1] > _COMPARE_MAX_LEVELS:
        if mid.shape[0] == 1:
            return torch.searchsorted(mid[0].contiguous(), rows.contiguous(), right=True)
        return torch.searchsorted(mid.contiguous(), rows.contiguous(), right=True)
    idx = torch.zeros(rows.shape, dtype=torch.uint8, device=rows.device)
    above = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    for j in range(mid.shape[1]):
        idx.add_(torch.ge(rows, mid[:, j : j + 1], out=above))
    return idx


def keep_nan(q: Tensor, x: Tensor) -> Tensor:
    """``q`` with NaN wherever ``x`` is NaN, as torch's own ops propagate it: a nearest-level search sends NaN to
    some level, and a NaN in the data would then train on a finite loss without a word."""
    d = x.detach()
    return torch.where(d.isnan(), d, q)


def take_levels(levels: Tensor, idx: Tensor) -> Tensor:
    """``levels[r, idx[r, n]]``: (R, N) values, exactly the entries of ``levels`` ((1, L): shared)."""
    idx = idx.long()
    if levels.shape[0] == 1:
        return levels[0].index_select(0, idx.reshape(-1)).reshape(idx.shape)
    return levels.gather(1, idx)


class _ClippedSTE(torch.autograd.Function):
    """Forward ``q``; backward ``g·1[lo <= x <= hi]`` (clipped straight-through; BinaryNet's
    hardtanh STE, Courbariaux et al. 2016 eq. 4), without the extra full-size passes of
    ``ste(clamp(x, lo, hi), q)``. ``lo``/``hi`` are floats or 0-dim tensors (no host sync)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, lo, hi):
        ctx.save_for_backward(x)
        ctx.range = (lo, hi)
        return q

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.range
        return clip_mask_grad(g, x, lo, hi), None, None, None


def clipped_ste(x: Tensor, q: Tensor, lo, hi) -> Tensor:
    """``q`` forward, gradient ``1[lo <= x <= hi]`` w.r.t. ``x`` (none w.r.t. ``q``)."""
    return _ClippedSTE.apply(x, q.detach(), lo, hi)
