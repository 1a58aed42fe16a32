"""Requantization: a real multiplier as an int32 multiplier and a shift, and the one rounding rule.

The one place that defines it (NumPy here; the C runtime's ``lb_requantize`` in
``runtime/lowbit_rt.c`` computes the same integers with integer operations only)::

    real = M · 2^(shift − 31),   M in [2^30, 2^31) (or −M for a negative real) with at most 24
                                 significant bits (its low 7 bits are 0), shift ≤ 30
    requantize(x, M, shift) = rint(f32(f32(x) · f32(real)))     (round half to even)

that is, what a float32 multiply-and-round computes: ``x`` (an int32 accumulator) rounded to a
float32, times the float32 multiplier (exact: ``M`` has 24 significant bits), the product rounded to
a float32, then rounded to the nearest integer, ties to even. This is the requantization
onnxruntime's integer kernels do (MLAS: ``QLinearConv`` converts ``acc + bias`` to float32,
multiplies by the float32 scale and rounds half to even), so the ONNX model, NumPy and C compute
the same codes bit for bit. TFLite Micro / CMSIS-NN's single-rounding fixed-point form
(``floor(x·M/2^(31−shift) + 1/2)``, lowbit's before session 10) differs from it by one code where
``x·real`` lies within a float32 rounding of a half: onnxruntime then disagreed with the integer
model on 129 of 11 million codes of one MobileNetV2 depthwise layer (an accumulator of 36 at
5.4999999697 steps, rounded to 5.5 in float32), enough to flip 1.1 % of the predictions.

The C runtime computes the same without a float unit: round ``x`` to 24 significant bits, multiply by
``M`` (one 64-bit product, below 2^62), round the product to 24 significant bits, shift right by
``31 − shift`` rounding half to even (every rounding is :func:`rne_shift`). The result differs from
``rint(x · real)`` by at most one code (the multiplier's relative error is ≤ 2^−25, each float32
rounding's 2^−24). A real below 2^−31 keeps ``31 − shift ≤ 62`` by giving up low bits of ``M``
(such a multiplier rounds nearly everything to 0 anyway).

Negative multipliers are allowed (a BatchNorm with γ < 0 gives a negative per-channel scale); the
rounding is symmetric.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

#: the largest shift (a real multiplier below 2^30); ``31 - shift`` must stay >= 1
MAX_SHIFT = 30
#: the smallest shift (``31 - shift <= 62`` keeps the 64-bit shift defined)
MIN_SHIFT = -31
#: significant bits of a float32: of the multiplier ``M`` and of every rounding in :func:`requantize`
F32_BITS = 24


def quantize_multiplier(real, bits: int = F32_BITS) -> tuple[np.ndarray, np.ndarray]:
    """``(M, shift)`` (int32 arrays, the shape of ``real``) with ``real ≈ M · 2^(shift − 31)``, ``M``
    rounded to ``bits`` (≤ 24) significant bits (fewer: ``real·2^k`` stays a float32 for small k; the
    global pooling's multiplier times the pooled size, :func:`lowbit.intmode.int_graph`)."""
    r = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ConfigError("requantization: a non-finite multiplier")
    if not 1 <= bits <= F32_BITS:
        raise ConfigError(f"requantization: multiplier bits {bits} outside 1..{F32_BITS}")
    mant, exp = np.frexp(np.abs(r))  # |r| = mant * 2^exp, mant in [0.5, 1)
    m = np.rint(mant * 2.0**bits).astype(np.int64) << (31 - bits)  # a float32 exactly
    carry = m == 2**31  # mantissa rounded up to 1.0
    m = np.where(carry, 2**30, m)
    exp = np.where(carry, exp + 1, exp).astype(np.int64)
    zero = r == 0
    m = np.where(zero, 0, m)
    exp = np.where(zero, 0, exp)
    if np.any(exp > MAX_SHIFT):
        raise ConfigError(f"requantization: multiplier {float(np.abs(r).max()):.3g} is >= 2^{MAX_SHIFT}")
    low = exp < MIN_SHIFT  # give up low bits of M so that 31 - shift <= 62
    if np.any(low):
        m = np.where(low, m >> np.minimum(MIN_SHIFT - exp, 62), m)
        exp = np.where(low, MIN_SHIFT, exp)
    m = np.where(r < 0, -m, m)
    return m.astype(np.int32), exp.astype(np.int32)


def requantize(x, mult, shift):
    """``rint(f32(f32(x) · f32(mult · 2^(shift − 31))))``, ties to even (int64 out; module docstring).

    ``x`` int32-range integers (any integer array), ``mult``/``shift`` int32, broadcastable
    (per-channel: shape ``(C, 1, 1)`` against ``(N, C, H, W)``). NumPy's float32 arithmetic is IEEE
    single precision, so this is the definition itself. A torch tensor is computed the same way in
    torch, on its device: an integer tensor gives int64; a floating one holding integers (the integer
    reference's float64 accumulators, :mod:`lowbit.export.intgraph`) gives the rounded float32 values,
    which are integers held exactly.
    """
    r = real_multiplier(mult, shift).astype(np.float32)
    if not (isinstance(x, np.ndarray) or np.isscalar(x)):  # torch
        import torch

        y = torch.mul(x.detach().to(torch.float32), torch.from_numpy(np.ascontiguousarray(r)).to(x.device)).round_()
        return y if x.is_floating_point() else y.to(torch.int64)
    return np.rint(np.asarray(x).astype(np.float32) * r).astype(np.int64)


def round_sig(v, bits: int = F32_BITS):
    """Integers ``v`` rounded to ``bits`` significant bits, half to even (the value a float32 holds
    for an integer): the integer-only step of the C runtime's :func:`requantize` (``lb_round24``)."""
    v = np.asarray(v, dtype=np.int64)
    a = np.abs(v)
    e = np.frexp(a.astype(np.float64))[1].astype(np.int64)  # bit length, or one more where float64 rounded up
    e = np.where((e > 0) & ((a >> np.maximum(e - 1, 0)) == 0), e - 1, e)
    s = np.maximum(e - bits, 0)
    return rne_shift(v, s) << s


def requantize_int(x, mult, shift):
    """:func:`requantize` with integer operations only, the C runtime's algorithm (module docstring):
    ``rne_shift(round_sig(round_sig(x) · round_sig(mult)), 31 − shift)``."""
    p = round_sig(round_sig(x) * round_sig(mult))
    return rne_shift(p, 31 - np.asarray(shift, dtype=np.int64))


def rne_shift(v, s):
    """``v / 2^s`` rounded half to even (NumPy integers, ``s >= 0``): the output residual add's
    rounding (onnxruntime's float32 ``QLinearAdd``; the C runtime's ``lb_rne_shift``). A torch float64
    tensor holding integers below 2^53 is computed in torch (``v·2^−s`` is exact, then rounded half to
    even), and stays float64."""
    if not (isinstance(v, np.ndarray) or np.isscalar(v)):  # torch
        import torch

        return torch.round(v * torch.exp2(-torch.as_tensor(np.asarray(s), dtype=torch.float64).to(v.device)))
    v = np.asarray(v, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    fl = v >> s
    rem = v - (fl << s)
    half = (np.int64(1) << s) >> 1
    return fl + ((rem > half) | ((rem == half) & (half > 0) & ((fl & 1) == 1)))


def thresholds(mult, shift, zero: int, lo: int, hi: int, bound: int) -> np.ndarray:
    """A layer's requantize-and-clamp ``clamp(requantize(v, mult[c], shift[c]) + zero, lo, hi)`` as thresholds:
    an int32 array ``T`` of shape ``(C, hi − lo)``, ascending per channel, such that for every accumulator
    ``|v| <= bound`` the code is ``lo + #{k : u >= T[c, k]}`` with ``u = v``, or ``u = −v`` where ``mult[c] < 0``.

    The requantization is monotone in ``v`` (each float32 rounding and the rounding to an integer are; a negative
    multiplier reverses it, and ``requantize(v, −M) = requantize(−v, M)`` since every rounding is symmetric), so the
    code steps up at most ``hi − lo`` times, and ``T[c, k − 1]`` is the least ``u`` whose code is at least
    ``lo + k`` (found by bisection over ``[−bound, bound]``; ``bound + 1``, capped at 2^31 − 1, where no ``u`` in
    range reaches it). The C runtime compares instead of requantizing where a layer's outputs have few codes (the
    bit-packed networks' 1- and 2-bit activations; ``lb_conv_out``), as FINN does on FPGAs: the same codes, without
    the 64-bit product that a Cortex-M0 has no instruction for."""
    m = np.abs(np.asarray(mult, dtype=np.int64)).reshape(-1, 1)
    sh = np.broadcast_to(np.asarray(shift, dtype=np.int64).reshape(-1, 1), m.shape)
    n = int(hi) - int(lo)
    if n < 0 or bound < 0 or bound >= 2**31:
        raise ConfigError(f"requantization thresholds: codes {lo}..{hi}, accumulator bound {bound}")
    want = int(lo) + np.arange(1, n + 1, dtype=np.int64).reshape(1, -1)
    a = np.full((m.shape[0], n), -int(bound), dtype=np.int64)
    b = np.full((m.shape[0], n), int(bound) + 1, dtype=np.int64)
    while np.any(a < b):
        mid = (a + b) // 2
        ok = np.clip(requantize(mid, m, sh) + int(zero), lo, hi) >= want
        live = a < b
        b = np.where(live & ok, mid, b)
        a = np.where(live & ~ok, mid + 1, a)
    return np.minimum(a, 2**31 - 1).astype(np.int32)


def real_multiplier(mult, shift) -> np.ndarray:
    """The real number ``M · 2^(shift − 31)`` a pair stands for (float64)."""
    return np.asarray(mult, dtype=np.float64) * np.exp2(np.asarray(shift, dtype=np.float64) - 31)
