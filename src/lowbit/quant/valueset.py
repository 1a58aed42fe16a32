"""Finite value-set quantizers: any list of values with a scale, and power-of-two sets.

These are the value spaces of 000 (``{±1}``, ``{±1, ±1/2}``, ``{±1, ±1/2, ±1/4, ±1/8}``) and of
logarithmic quantization (002, INQ): each weight maps to the nearest value of
``scale·V`` (003 eq. 9, nearest in the Euclidean sense). Products with ``{0, ±2^k}`` need no
multiplier (a sign flip and a shift), which is what 000's "Req. Mult" column records.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Quantizer, channel_view, check_bits, register_quantizer
from .functional import nearest_index, ste

#: named value sets (000's spaces; "int-2bit" is the signed 2-bit integer grid)
VALUE_SETS: dict[str, tuple[float, ...]] = {
    "binary": (-1.0, 1.0),
    "ternary": (-1.0, 0.0, 1.0),
    "po2-2bit": (-1.0, -0.5, 0.5, 1.0),
    "po2-3bit": (-1.0, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1.0),
    "po2-4bit": tuple(sorted([s * 2.0**-k for s in (-1, 1) for k in range(8)])),
    "int-2bit": (-2.0, -1.0, 0.0, 1.0),
}

SCALES = ("none", "max", "mean")


def resolve_values(values: str | Sequence[float]) -> tuple[float, ...]:
    """A named set or an explicit list -> sorted distinct floats (>= 2 of them)."""
    if isinstance(values, str):
        if values not in VALUE_SETS:
            raise ConfigError(f"unknown value set '{values}'; named sets: {', '.join(VALUE_SETS)}")
        return VALUE_SETS[values]
    try:
        vals = tuple(sorted({float(v) for v in values}))
    except (TypeError, ValueError):
        raise ConfigError(f"values must be a list of numbers or a named set, got {values!r}") from None
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"values must hold at least 2 distinct finite numbers, got {values!r}")
    return vals


def bits_for(n_values: int) -> int:
    return max(1, math.ceil(math.log2(n_values)))


@register_quantizer("valueset")
class ValueSetQuantizer(Quantizer):
    """Nearest value of a finite set V times a scale: ``Q(w) = s·argmin_{v∈V} |w/s - v|``.

    ``values``: a list or a named set (binary, ternary, po2-2bit, po2-3bit, po2-4bit, int-2bit).
    ``scale``: ``"none"`` (s = 1; a following BatchNorm absorbs the magnitude, as 000 does),
    ``"max"`` (s = max|w| / max|V|) or ``"mean"`` (s = E|w| / E|V|; binary + mean = BWN).
    ``bits`` is ceil(log2 |V|); giving a different one is an error. Straight-through gradient.
    """

    min_bits, max_bits = 1, 8
    supports_per_channel = True

    def __init__(self, bits: int | None = None, role: str = "weight", per_channel: bool = False,
                 values: str | Sequence[float] = "binary", scale: str = "none"):
        vals = resolve_values(values)
        need = bits_for(len(vals))
        if bits is not None:
            check_bits(type(self), bits)
            if bits != need:
                raise ConfigError(f"value set of {len(vals)} values needs bits={need}, got bits={bits}")
        super().__init__(need, role, per_channel)
        if scale not in SCALES:
            raise ConfigError(f"valueset option scale must be one of {', '.join(SCALES)}, got '{scale}'")
        self.scale_mode = scale
        self.register_buffer("values", torch.tensor(vals), persistent=False)

    def scale(self, x: Tensor) -> Tensor:
        if self.scale_mode == "none":
            return torch.ones((), dtype=x.dtype, device=x.device)
        d = x.detach().abs()
        v = self.values.abs()
        if self.per_channel:
            f = d.flatten(1)
            s = f.max(1).values / v.max() if self.scale_mode == "max" else f.mean(1) / v.mean()
            return channel_view(s.clamp_min(1e-12), d)
        s = d.max() / v.max() if self.scale_mode == "max" else d.mean() / v.mean()
        return s.clamp_min(1e-12)

    def codes(self, x: Tensor, s: Tensor | None = None) -> Tensor:
        """Index into ``values`` of the nearest value for each element (int64); a value exactly
        half-way between two goes to the larger one (so binary + mean maps 0 to +β, as BWN)."""
        s = self.scale(x) if s is None else s
        r = x.detach() / s
        rows = r.flatten(1) if (self.per_channel and r.dim() > 1) else r.reshape(1, -1)
        return nearest_index(rows, self.values.reshape(1, -1)).long().reshape(x.shape)

    def quantize(self, x: Tensor) -> Tensor:
        s = self.scale(x)
        lv = self.values * s.reshape(-1, 1) if s.dim() > 0 else self.values * s
        self.record_levels(lv)
        return ste(x, self.values[self.codes(x, s)] * s)

    @property
    def n_scales(self) -> int:
        return len(self.values) + (0 if self.scale_mode == "none" else self.rows)

    def rule(self) -> str | None:
        # codes compare x/s with the midpoints of V, not x with those of s·V: the same only for s = 1
        return "nearest" if self.scale_mode == "none" else None

    def set_bits(self, bits: int) -> None:
        raise ConfigError(f"quantizer '{self.alias}': a value set fixes its bit width ({self.bits}); "
                          "build a new quantizer for another set")


def po2_values(bits: int, zero: bool) -> tuple[float, ...]:
    """Power-of-two set with 2^bits entries: ±2^-k (k = 0..2^(b-1)-1), or 0 plus ±2^-k one fewer."""
    half = 2 ** (bits - 1) - (1 if zero else 0)
    mags = [2.0**-k for k in range(half)]
    return tuple(sorted([-m for m in mags] + mags + ([0.0] if zero else [])))


@register_quantizer("po2")
class PowerOfTwoQuantizer(ValueSetQuantizer):
    """Power-of-two (logarithmic) levels ``s·{±2^-k}`` (000; INQ; 002's "logarithmic").

    bits=1: {±1}; bits=2: {±1, ±1/2}; bits=3: {±1, ±1/2, ±1/4, ±1/8} (000's sets) and so on.
    ``zero=True`` trades the smallest magnitude for a 0 level (bits >= 2). Default scale "max":
    s = max|w|, so the largest weight maps to ±s. Multiplication-free up to the one scale.
    """

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False,
                 zero: bool = False, scale: str = "max"):
        check_bits(type(self), bits)
        if zero and bits < 2:
            raise ConfigError("po2 with zero=True needs bits >= 2")
        super().__init__(bits, role, per_channel, values=po2_values(bits, zero), scale=scale)
        self.zero = bool(zero)

    def set_bits(self, bits: int) -> None:
        """Rebuild the power-of-two set for ``bits`` (a buffer, no new module)."""
        check_bits(type(self), bits)
        if self.zero and bits < 2:
            raise ConfigError("po2 with zero=True needs bits >= 2")
        self.bits, self._last_levels = int(bits), None
        self.values = torch.tensor(po2_values(bits, self.zero), device=self.values.device)
