"""Integer tensors with one power-of-two exponent (NITI's number format) and the ops NITI trains with.

A value is ``q · 2^e``: ``q`` an int8 tensor in ``[-127, 127]``, ``e`` a Python int (one per tensor).
Products of int8 tensors accumulate in int32 (int64 where a sum could overflow int32); the result goes
back to 8 bits by an arithmetic right shift of ``b - 7`` bits when it needs ``b > 7`` magnitude bits,
the shift added to the exponent (wangmaolin/niti ``act_calc``/``err_calc``). Nothing here touches a
floating-point tensor: exponents are Python ints, ranges are read as Python ints
(``int.bit_length``), rounding is done with shifts and integer random numbers.

Rounding when dropping ``s`` bits of an integer ``x = f·2^s + r`` (``f = x >> s``, ``0 <= r < 2^s``):

* :func:`round_shift`: to nearest, ties up: ``(x + 2^(s-1)) >> s`` (NITI's ``RoundShift``);
* :func:`stochastic_shift`: ``f + 1`` with probability ``r / 2^s`` (``u < r``, ``u`` uniform in
  ``[0, 2^s)``): unbiased, ``E = x / 2^s``. (NITI's ``StoShift`` floors and then adds ``sign(x)``, which
  moves negative values the wrong way; this one rounds both signs up from the floor.)
* :func:`pseudo_stochastic_shift`: NITI's ``PstoShift``, the random number taken from the dropped bits
  themselves: the upper half of ``r`` is compared with its lower half (doubled when ``s`` is odd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

QMAX = 127  # int8 codes are kept in [-127, 127] (symmetric)
BITS = 7  # magnitude bits of an int8 code
INT32_SAFE = 2**31 - 1


@dataclass
class IntT:
    """``q · 2^e``: an integer tensor and its shared exponent."""

    q: Tensor
    e: int


def max_abs(x: Tensor) -> int:
    """``max |x|`` as a Python int (0 for an empty tensor)."""
    if not x.numel():
        return 0
    lo, hi = torch.aminmax(x)  # no full-size |x| temporary
    return max(-int(lo), int(hi))


def round_shift(x: Tensor, s: int) -> Tensor:
    if s <= 0:
        return x
    return (x + (1 << (s - 1))) >> s


def stochastic_shift(x: Tensor, s: int, generator: torch.Generator | None = None) -> Tensor:
    if s <= 0:
        return x
    f = x >> s
    r = x - (f << s)
    u = torch.randint(0, 1 << s, x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return f + (u < r).to(x.dtype)


def pseudo_stochastic_shift(x: Tensor, s: int, generator: torch.Generator | None = None) -> Tensor:
    if s <= 1:
        return round_shift(x, s)
    f = x >> s
    r = x - (f << s)
    lo_bits = s // 2
    hi = r >> lo_bits
    lo = r & ((1 << lo_bits) - 1)
    if s % 2:
        lo = lo * 2  # hi has one bit more than lo
    return f + (hi > lo).to(x.dtype)


ROUNDING = {"nearest": round_shift, "stochastic": stochastic_shift, "pseudo": pseudo_stochastic_shift}


def shift_rounded(x: Tensor, s: int, rounding: str, generator: torch.Generator | None = None) -> Tensor:
    if rounding == "nearest":
        return round_shift(x, s)
    return ROUNDING[rounding](x, s, generator)


def to_bits(acc: Tensor, bits: int = BITS, rounding: str = "nearest", qmax: int = QMAX,
            generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """An integer accumulator back to ``bits`` magnitude bits: ``(int8 codes, shift)``; the value
    is ``codes · 2^shift`` in the accumulator's units. ``bits`` may be <= 0 (a gradient shifted
    below one unit: codes 0/±1 by stochastic rounding)."""
    m = max_abs(acc)
    if m == 0:
        return torch.zeros(acc.shape, dtype=torch.int8, device=acc.device), 0
    s = max(0, m.bit_length() - bits)
    q = shift_rounded(acc.long() if s >= 31 else acc, s, rounding, generator)
    return q.clamp_(-qmax, qmax).to(torch.int8), s


def renorm(acc: Tensor, e: int) -> IntT:
    """Accumulator ``acc · 2^e`` -> int8 with round-to-nearest (forward activations, errors)."""
    q, s = to_bits(acc)
    return IntT(q, e + s)


def align_add(a: IntT, b: IntT) -> IntT:
    """``a + b`` at the larger exponent (the other operand round-shifted), summed in int32, back to
    int8 (a residual add and the join of two error paths)."""
    e = max(a.e, b.e)
    qa = round_shift(a.q.to(torch.int32), e - a.e) if e - a.e < 31 else torch.zeros_like(a.q, dtype=torch.int32)
    qb = round_shift(b.q.to(torch.int32), e - b.e) if e - b.e < 31 else torch.zeros_like(b.q, dtype=torch.int32)
    return renorm(qa + qb, e)


def _acc_dtype(n_terms: int) -> torch.dtype:
    return torch.int32 if n_terms * QMAX * QMAX <= INT32_SAFE else torch.int64


# -- conv / linear: forward, input error, weight gradient (all integer) --------------------------------
def conv_forward(x: Tensor, w: Tensor, stride, padding) -> Tensor:
    dt = _acc_dtype(w[0].numel())
    return F.conv2d(x.to(dt), w.to(dt), stride=stride, padding=padding)


def conv_input_error(err: Tensor, w: Tensor, in_shape, stride: int, padding: int) -> Tensor:
    """``d(loss)/d(input)`` of a conv as a transposed convolution, in integers: the error dilated by
    the stride, padded by ``k - 1 - p`` (plus what the forward's floor division dropped), convolved
    with the flipped, transposed weight."""
    n, o, ho, wo = err.shape
    k = w.shape[-1]
    dt = _acc_dtype(o * k * k)
    e = err.to(dt)
    if stride > 1:
        d = torch.zeros((n, o, (ho - 1) * stride + 1, (wo - 1) * stride + 1), dtype=dt, device=err.device)
        d[:, :, ::stride, ::stride] = e
        e = d
    h, wd = in_shape[-2:]
    rh = (h + 2 * padding - k) % stride
    rw = (wd + 2 * padding - k) % stride
    p = k - 1 - padding
    e = F.pad(e, (p, p + rw, p, p + rh))
    wt = torch.flip(w, (2, 3)).transpose(0, 1).to(dt)
    return F.conv2d(e, wt)


def conv_weight_grad(x: Tensor, err: Tensor, k: int, stride: int, padding: int) -> Tensor:
    """``sum_n err ⋆ x``: ``grad[o, c, i, j] = Σ_{n,y,x} err[n,o,y,x] · x_pad[n,c,y·s+i,x·s+j]``, as one
    integer conv over the batch (batch and channel axes swapped, the stride as a dilation)."""
    n, o, ho, wo = err.shape
    dt = _acc_dtype(n * ho * wo)
    xp = F.pad(x.to(dt), (padding,) * 4)
    if stride == 1:
        g = F.conv2d(xp.transpose(0, 1), err.to(dt).transpose(0, 1))  # (C, O, k', k')
        return g[:, :, :k, :k].transpose(0, 1).contiguous()
    # strided: one integer matmul per tap (torch has no integer dilated conv on CPU)
    e = err.to(dt).transpose(0, 1).reshape(o, -1)  # (O, N·L)
    g = torch.empty((o, x.shape[1], k, k), dtype=dt, device=x.device)
    for i in range(k):
        for j in range(k):
            xs = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            g[:, :, i, j] = e @ xs.transpose(0, 1).reshape(x.shape[1], -1).t()
    return g


def linear_forward(x: Tensor, w: Tensor) -> Tensor:
    dt = _acc_dtype(w.shape[1])
    return x.to(dt) @ w.to(dt).t()


def linear_input_error(err: Tensor, w: Tensor) -> Tensor:
    dt = _acc_dtype(w.shape[0])
    return err.to(dt) @ w.to(dt)


def linear_weight_grad(x: Tensor, err: Tensor) -> Tensor:
    dt = _acc_dtype(x.shape[0])
    return err.to(dt).t() @ x.to(dt)


# -- the integer softmax cross-entropy gradient (wangmaolin/niti ti_loss.py) -----------------------------
LOG2E_Q15 = 47274  # round(log2(e) · 2^15): changes the softmax base from e to 2
SUM_BITS = 11  # the softmax is normalised to a sum of 2^11


def ce_error(logits: IntT, target: Tensor, generator: torch.Generator | None = None) -> IntT:
    """``softmax(z) - onehot(y)`` in integers, NITI's way: with ``z = q·2^e``, ``s = floor(q·log2(e)·2^e)``
    (``e >= -6``; base 2 instead of e), shifted so the row max is 10, clipped at 0, ``p = 2^s - 1``
    normalised to a row sum of ``2^11`` (integer division), ``2^11`` subtracted at the target, then
    stochastically shifted right by 4 to int8. For ``e < -6`` every ``s`` would round to 0, and
    ``2^s ≈ 1 + s·ln2`` is approximated as NITI does by ``2^(1-2e) + q·2^(1-e) + q²`` (∝ 1 + x + x²/2)."""
    q = logits.q.long()
    e = logits.e
    if e > -7:
        s = ((q * LOG2E_Q15) << e) >> 15 if e >= 0 else (q * LOG2E_Q15) >> (15 - e)
        s = s - (s.max(1, keepdim=True).values - 10)
        s = s.clamp_min(0)
        p = (torch.ones_like(s) << s) - 1
    else:
        e = max(e, -24)  # below 2^-24 a logit is 0 to the error's 8 bits; and 2^(1-2e)·2^11 must fit int64
        p = (1 << (1 - 2 * e)) + q * (1 << (1 - e)) + q * q
    total = p.sum(1, keepdim=True).clamp_min(1)
    p = torch.div(p << SUM_BITS, total, rounding_mode="floor")
    p[torch.arange(len(q), device=q.device), target] -= 1 << SUM_BITS
    g = stochastic_shift(p, 4, generator).clamp_(-QMAX, QMAX).to(torch.int8)
    return IntT(g, 4 - SUM_BITS)


def from_float(x: Tensor, bits: int = BITS) -> IntT:
    """A float tensor (the input batch) -> int8 with a power-of-two exponent (NITI's ``TiFloatToInt8``).
    The only float operation of a NITI step: it is the data arriving, not training."""
    m = float(x.detach().abs().max()) if x.numel() else 0.0
    from ..quant.pow2int import pow2_exponent

    e = pow2_exponent(m, bits + 1) if m > 0 else 0
    q = torch.clamp(torch.round(x * 2.0**-e), -QMAX, QMAX).to(torch.int8)
    return IntT(q, e)
