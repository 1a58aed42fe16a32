"""The activation kernels as they were before issue 11's speed work (commit a973515), for
``qat_overhead.py --before``: the same model is stepped with these backward passes swapped in, so
before and after are timed interleaved in one process.

Only the backward passes changed (the forward outputs are bit-identical), and activation
mixtures computed each member as its own autograd Function summed by ``weighted_sum``
(``QuantizerMixture.fused = False``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from lowbit.methods.mixture import QuantizerMixture
from lowbit.quant.functional import _ClipRound, _LSQFn


def clip_round_backward(ctx, g: Tensor):
    (x,) = ctx.saved_tensors
    lo, hi = ctx.range
    above = x > hi
    inside = (x >= lo).logical_and_(above.logical_not())
    gx = g * inside
    ghigh = (g * above).sum().reshape(()) if ctx.needs_input_grad[2] else None
    return gx, None, ghigh, None


def lsq_backward(ctx, g: Tensor):
    v, s, q = ctx.saved_tensors
    qn, qp, gscale = ctx.q
    lo, hi = (-qn * s, qp * s) if s.numel() > 1 else (-qn * float(s), qp * float(s))
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
        else:
            ds = torch.where(inside, (q - v) / s, torch.where(above, float(qp), float(-qn)))
            dims = [d for d in range(g.dim()) if s.shape[d] == 1]
            gs = (g * ds).sum(dim=dims, keepdim=True) * gscale
    return gv, gs, None, None, None


@contextmanager
def before_kernels():
    """Swap the pre-issue-11 backward passes and unfused mixtures in (forward and backward of one
    step must both run inside)."""
    from lowbit.quant import native

    saved = (_ClipRound.__dict__["backward"], _LSQFn.__dict__["backward"], QuantizerMixture.fused,
             native._state["on"])
    _ClipRound.backward = staticmethod(clip_round_backward)
    _LSQFn.backward = staticmethod(lsq_backward)
    QuantizerMixture.fused = False
    native.enable(False)  # the native kernels came after
    try:
        yield
    finally:
        _ClipRound.backward, _LSQFn.backward, QuantizerMixture.fused, on = saved
        native.enable(on)
