"""Opt-in ``torch.compile`` kernels for the activation path (one pass over the tensor each way).

The eager kernels of :mod:`lowbit.quant.functional` take several passes over every activation
(clamp, divide, round, scale; then the masks and reductions of the backward). Compiled by
inductor, the same expressions become one loop each: the forward reads x once and writes q; the
backward reads x and the incoming gradient once, writes dx and reduces the scalar gradients in
the same loop (the quantized values are recomputed there instead of being stored).

* Forward outputs are bit-identical to the eager kernels: the same IEEE float32 operations in the
  same order (inductor compiles with ``-ffp-contract=off``), with the step and 1/s passed in as the
  float32 constants the eager code uses (tests/test_kernels.py::test_compiled_kernels_match_eager
  checks it, with ``LOWBIT_TEST_COMPILE=1``).
* Backward: the same masks; the scalar gradients (LSQ's step, PACT's clip, a mixture's
  coefficients) are the same sums in another order (float rounding may differ in the last bits).
* A mixture's forward sum ``Σ c_k·Q_k(x)`` is computed as products and adds where eager uses a
  fused multiply-add (``add_(alpha=)``): the same value up to the last bit; every ``Q_k(x)`` is
  exact.

Enable with ``LOWBIT_COMPILE=1`` in the environment or :func:`enable`. Off by default: the first
call of each kernel compiles it (a few seconds to tens of seconds with gcc, cached on disk by
inductor afterwards). Shapes are dynamic and every range/step/coefficient is a tensor argument,
so nothing recompiles from step to step. Only float32 CPU tensors of at least
:data:`MIN_NUMEL` elements take this path; if compiling fails the kernels fall back to eager
for the rest of the process (with one warning).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

#: smaller tensors (weights, tiny test activations) stay eager: a compiled call costs ~0.1 ms
MIN_NUMEL = 1 << 16

_state = {"on": os.environ.get("LOWBIT_COMPILE", "") not in ("", "0"), "failed": False}
_compiled: dict = {}


def enable(on: bool = True) -> None:
    """Turn the compiled activation kernels on or off for this process."""
    _state["on"] = bool(on)


def enabled() -> bool:
    return _state["on"] and not _state["failed"]


def active(x: Tensor) -> bool:
    """Whether ``x`` takes the compiled path."""
    return (_state["on"] and not _state["failed"] and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() >= MIN_NUMEL)


def f32(v) -> Tensor:
    """A Python float as the float32 0-dim tensor eager torch would cast it to."""
    return torch.tensor(v, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# the kernels (plain functions; compiled on first use)
# ---------------------------------------------------------------------------------------------
def _clip_q(x: Tensor, lo: Tensor, hi: Tensor, step: Tensor, lo_nonzero: bool) -> Tensor:
    q = torch.clamp(x, lo, hi)
    if lo_nonzero:
        q = q - lo
    q = torch.round(q / step) * step
    if lo_nonzero:
        q = q + lo
    return q


def _rows(t: Tensor) -> Tensor:
    """Row sums (per sample): the reductions are finished in eager by torch's cascade sum, which
    keeps them about as accurate as eager's single ``sum()`` (one long vectorised accumulation
    is ~5x less accurate in float32)."""
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t.sum().reshape(1)


def _clip_fwd(x, lo, hi, step, lo_nonzero: bool):
    return _clip_q(x, lo, hi, step, lo_nonzero)


def _clip_bwd(g, x, lo, hi):
    gx = torch.where((x >= lo) & (x <= hi), g, 0.0)
    return gx, _rows(torch.where(x > hi, g, 0.0))


def _lsq_fwd(v, inv, s, qn, qp):
    return torch.round(torch.clamp(v * inv, qn, qp)) * s


def _lsq_bwd(g, v, inv, s, qn, qp, lo, hi):
    gv = torch.where((v > lo) & (v < hi), g, 0.0)
    q = torch.round(torch.clamp(v * inv, qn, qp)) * s
    return gv, _rows(gv * (q - v)), _rows(torch.where(v >= hi, g, 0.0)), _rows(torch.where(v <= lo, g, 0.0))


def _mix_fwd(x, c, lo, hi, step, k: int, lo_nonzero: bool):
    out = None
    for j in range(k):
        q = _clip_q(x, lo[j], hi[j], step[j], lo_nonzero) * c[j]
        out = q if out is None else out + q
    return out


def _mix_bwd(g, x, c, lo, hi, step, k: int, lo_nonzero: bool):
    w, gcs, above = None, [], []
    for j in range(k):
        wj = torch.where((x >= lo[j]) & (x <= hi[j]), c[j], 0.0)
        w = wj if w is None else w + wj
        gcs.append(_rows(g * _clip_q(x, lo[j], hi[j], step[j], lo_nonzero)))
        above.append(_rows(torch.where(x > hi[j], g, 0.0)))
    return g * w, torch.stack(gcs), torch.stack(above)


_KERNELS = {f.__name__: f for f in (_clip_fwd, _clip_bwd, _lsq_fwd, _lsq_bwd, _mix_fwd, _mix_bwd)}


def _call(name: str, *args):
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_KERNELS[name], dynamic=True)
    try:
        return fn(*args)
    except Exception as e:  # no compiler, an inductor bug: eager from now on
        _state["failed"] = True
        warnings.warn(f"lowbit: torch.compile of the activation kernels failed ({type(e).__name__}: {e}); "
                      "using the eager kernels", RuntimeWarning, stacklevel=3)
        return None


# ---------------------------------------------------------------------------------------------
# entry points used by lowbit.quant.functional and lowbit.methods.mixture (None: use eager)
# ---------------------------------------------------------------------------------------------
def clip_fwd(x: Tensor, lo: float, hi: float, step: float) -> Tensor | None:
    return _call("_clip_fwd", x, f32(lo), f32(hi), f32(step), lo != 0.0)


def clip_bwd(g: Tensor, x: Tensor, lo: float, hi: float):
    """(dx, Σ_{x > hi} g)."""
    r = _call("_clip_bwd", g, x, f32(lo), f32(hi))
    return None if r is None else (r[0], r[1].sum())


def lsq_fwd(v: Tensor, sf: float, qn: int, qp: int) -> Tensor | None:
    return _call("_lsq_fwd", v, f32(1.0 / sf), f32(sf), f32(-qn), f32(qp))


def lsq_bwd(g: Tensor, v: Tensor, sf: float, qn: int, qp: int):
    """(dv, Σ_inside g·(q - v), Σ_{v >= hi} g, Σ_{v <= lo} g)."""
    r = _call("_lsq_bwd", g, v, f32(1.0 / sf), f32(sf), f32(-qn), f32(qp), f32(-qn * sf), f32(qp * sf))
    return None if r is None else (r[0], r[1].sum(), r[2].sum(), r[3].sum())


def mix_fwd(x: Tensor, c: Tensor, lo: Tensor, hi: Tensor, step: Tensor, lo_nonzero: bool) -> Tensor | None:
    return _call("_mix_fwd", x, c, lo, hi, step, int(lo.numel()), lo_nonzero)


def mix_bwd(g: Tensor, x: Tensor, c: Tensor, lo: Tensor, hi: Tensor, step: Tensor, lo_nonzero: bool):
    """(dx, (dc_k), (Σ_{x > hi_k} g))."""
    r = _call("_mix_bwd", g, x, c, lo, hi, step, int(lo.numel()), lo_nonzero)
    return None if r is None else (r[0], r[1].sum(1), r[2].sum(1))
