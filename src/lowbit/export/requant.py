"""Fixed-point requantization: a real multiplier as an int32 multiplier and a shift.

The one place that defines it (NumPy here; the C runtime's ``lb_requantize`` in
``runtime/lowbit_rt.c`` computes the same integers). It is the single-rounding form that
TFLite Micro and CMSIS-NN use (``TFLITE_SINGLE_ROUNDING`` / ``CMSIS_NN_USE_SINGLE_ROUNDING``):

    real ≈ M · 2^(shift − 31),   M in [2^30, 2^31) (or −M for a negative real), shift ≤ 30
    requantize(x, M, shift) = floor(x · M / 2^(31 − shift) + 1/2)      (round half up)

computed exactly with one 64-bit product: ``t = 31 − shift``, ``((x·M) >> (t − 1)) + 1) >> 1``
(arithmetic shifts). ``x`` is an int32 accumulator, so ``|x·M| < 2^62``. A real below
2^−31 keeps ``t ≤ 62`` by giving up low bits of ``M`` (such a multiplier rounds nearly everything
to 0 anyway). The result differs from ``rint(x · real)`` by at most one code: the multiplier's
relative error is ≤ 2^−31 and the roundings differ only at ties.

Negative multipliers are allowed (a BatchNorm with γ < 0 gives a negative per-channel scale); the
rounding is still ``floor(· + 1/2)``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

#: the largest shift (a real multiplier below 2^30); ``31 - shift`` must stay >= 1
MAX_SHIFT = 30
#: the smallest shift (``31 - shift <= 62`` keeps the 64-bit shift defined)
MIN_SHIFT = -31


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """``(M, shift)`` (int32 arrays, the shape of ``real``) with ``real ≈ M · 2^(shift − 31)``."""
    r = np.asarray(real, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ConfigError("requantization: a non-finite multiplier")
    mant, exp = np.frexp(np.abs(r))  # |r| = mant * 2^exp, mant in [0.5, 1)
    m = np.rint(mant * 2.0**31).astype(np.int64)
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
    """``floor(x · mult / 2^(31 − shift) + 1/2)`` exactly (int64 out; module docstring).

    ``x`` int32-range integers (any integer array), ``mult``/``shift`` int32, broadcastable
    (per-channel: shape ``(C, 1, 1)`` against ``(N, C, H, W)``). Works on NumPy arrays and on
    torch int64 tensors alike (only ``*``, ``>>``, ``+``).
    """
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = np.asarray(x, dtype=np.int64)
        mult = np.asarray(mult, dtype=np.int64)
        t = 31 - np.asarray(shift, dtype=np.int64)
    else:  # torch
        import torch

        mult = torch.as_tensor(np.asarray(mult, dtype=np.int64), device=x.device)
        t = torch.as_tensor(31 - np.asarray(shift, dtype=np.int64), device=x.device)
        x = x.to(torch.int64)
    return (((x * mult) >> (t - 1)) + 1) >> 1


def rne_shift(v, s):
    """``v / 2^s`` rounded half to even (NumPy integers, ``s >= 0``): the output residual add's
    rounding (onnxruntime's float32 ``QLinearAdd``; the C runtime's ``lb_rne_shift``)."""
    v = np.asarray(v, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    fl = v >> s
    rem = v - (fl << s)
    half = (np.int64(1) << s) >> 1
    return fl + ((rem > half) | ((rem == half) & (half > 0) & ((fl & 1) == 1)))


def real_multiplier(mult, shift) -> np.ndarray:
    """The real number ``M · 2^(shift − 31)`` a pair stands for (float64)."""
    return np.asarray(mult, dtype=np.float64) * np.exp2(np.asarray(shift, dtype=np.float64) - 31)
