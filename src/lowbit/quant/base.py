"""The quantizer base class and the registry (the straight-through helpers live in
:mod:`lowbit.quant.functional` and are re-exported here).

A quantizer maps a real tensor onto a finite set of values (its *levels*). It is a small
``nn.Module``: ``forward(x) -> x_q`` with a straight-through gradient, ``bits``, ``levels()``
(the exact value set it maps onto now) and, for some families, learned state (LSQ's step,
PACT's clip). Methods (plain STE, BinaryRelax, DQA, ...) compose quantizers; they never
re-implement one.

Conventions every quantizer follows:

* ``role`` is ``"weight"`` or ``"act"``. Weight quantizers compute their statistics from the
  tensor itself on every call; activation quantizers keep running statistics or learned ranges.
* ``per_channel=True`` (where the family defines it) computes one scale per output channel
  (dim 0 of the weight); ``levels()`` is then a ``(C, L)`` tensor, one row per channel.
* ``levels()`` returns the level set of the *last* forward call (for data-dependent weight
  quantizers) or of the current learned state. It is sorted and has at most ``2**bits`` entries
  (or exactly the value set for finite-set quantizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .functional import (  # noqa: F401 (ste .. reduce_abs_mean re-exported)
    autocast_off,
    channel_view,
    clip_round,
    clip_round_grid,
    clip_round_levels,
    grad_scale,
    reduce_abs_mean,
    round_ste,
    ste,
)

ROLES = ("weight", "act")


# ---------------------------------------------------------------------------------------------
# self-description
# ---------------------------------------------------------------------------------------------
#: the float32 rules a quantizer's forward follows (:meth:`Quantizer.describe`, ``rule``):
#: * ``clip_div``: ``k = min(rint((max(x, low) - low) / step), qmax)`` (:func:`~.functional.clip_round`)
#: * ``mul_clip``: ``k = rint(clamp(x * f32(1/step), qmin, qmax))`` (LSQ, :func:`~.functional.lsq_quantize`)
#: * ``nearest``: ``k = #{j : x >= m_j}``, m the float32 midpoints of the levels (ties go up;
#:   :func:`~.functional.nearest_index`)
#: and ``None``: the output is on ``levels`` but not a function of ``x`` by one of these rules
#: (DoReFa's tanh-normalised weights, SAT's rescaled weights); codes are then found on the output.
RULES = ("clip_div", "mul_clip", "nearest")


@dataclass(frozen=True)
class QuantDescription:
    """What a quantizer says about itself (:meth:`Quantizer.describe`): export, cost and tests read
    this instead of the quantizer's class.

    ``levels``: the current sorted levels, ``(L,)`` or ``(R, L)``, None for full precision.
    ``uniform``: level ``k`` is ``low + k*step`` for codes ``k = qmin..qmax`` (float32, computed as
    the quantizer computes it); then ``low``/``step`` are float32 tensors of shape ``(R,)``.
    ``signed``: some level is negative. ``rule``: see :data:`RULES`. ``n_scales``: full-precision
    numbers stored next to the integer codes.
    """

    bits: int
    role: str
    levels: Tensor | None
    uniform: bool
    low: Tensor | None
    step: Tensor | None
    qmin: int
    qmax: int
    signed: bool
    rule: str | None
    n_scales: int


# ---------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """Base class: ``forward(x) -> x_q`` with a straight-through gradient.

    Subclasses set the class attributes below and implement ``quantize(x)``, which records the levels it maps onto
    (``self.clip_round(x, low, high)`` does; otherwise ``self.record_levels(levels)``).
    """

    alias: ClassVar[str] = ""
    #: marks quantizer modules for the cost model (which does not import this package)
    is_quantizer: ClassVar[bool] = True
    #: the roles this family defines ("weight", "act")
    roles: ClassVar[tuple[str, ...]] = ("weight",)
    #: allowed bit widths (inclusive)
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 8
    #: whether a per-output-channel variant exists
    supports_per_channel: ClassVar[bool] = False
    #: full-precision numbers per level set (offset + step for min-max; one scale if symmetric)
    scales_per_row: ClassVar[int] = 2

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False):
        super().__init__()
        check_bits(type(self), bits)
        if role not in self.roles:
            raise ConfigError(
                f"quantizer '{self.alias}' cannot quantize role '{role}'; it supports: {', '.join(self.roles)}"
            )
        if per_channel and not self.supports_per_channel:
            raise ConfigError(f"quantizer '{self.alias}' has no per_channel variant")
        self.bits = int(bits)
        self.role = role
        self.per_channel = bool(per_channel)
        self._last_levels: Tensor | None = None
        self._clip_range: tuple[Tensor, Tensor] | None = None  # (low, high) of the last clip_round

    # -- interface ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.__dict__["_ran"] = True  # a plain flag (no Module.__setattr__ per call): levels() says why none
        amp, x = autocast_off(x)  # under torch.autocast: float32, autocast off (functional.autocast_off)
        with amp:
            return self.quantize(x)

    def quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def levels(self) -> Tensor:
        """The sorted value set this quantizer maps onto now ((L,) or (C, L) per channel)."""
        if self._last_levels is None:
            if self.__dict__.get("_ran", False):  # it ran: its quantize() did not say what it maps onto
                raise RuntimeError(f"{type(self).__name__}.quantize() recorded no levels: call self.record_levels(levels) "
                                   "in it (self.clip_round(x, low, high) records them)")
            raise RuntimeError(f"{type(self).__name__}.levels(): call the quantizer on a tensor first")
        return self._last_levels

    @property
    def rows(self) -> int:
        """Level sets in use: 1 per tensor, C per output channel (known after the first call)."""
        lv = self._last_levels
        return 1 if lv is None or lv.dim() == 1 else lv.shape[0]

    @property
    def n_scales(self) -> int:
        """How many full-precision numbers must be stored next to the integer codes."""
        return self.scales_per_row * self.rows

    def record_levels(self, levels: Tensor) -> None:
        self._last_levels = levels.detach()

    def awaits_data(self) -> bool:
        """Whether this is an activation quantizer whose range, step or levels come from the data and that has
        not started yet. Such a quantizer starts on its first training-mode batch that is not all zeros (as
        BatchNorm's statistics, only in training mode); before that its output means nothing."""
        return self.role == "act" and "initialized" in self._buffers and not self.is_initialized()

    def starts_on(self, x: Tensor) -> bool:
        """Whether a data-initialised quantizer (one with an ``initialized`` buffer) starts on ``x`` now: a weight
        always (the weight is its data); an activation quantizer only in training mode and only on a batch that is
        not all zeros. Before session 25 LSQ, centroids and LQ-Net activations started on their first call in any
        mode, so one evaluation or cost probe (e.g. a zero image) fixed a step of 1e-8: 94.7 -> 55.7 % on digits;
        min-max and uniform started on an all-zero batch with an empty range."""
        if self.role == "weight":
            return True
        return self.training and bool(x.detach().ne(0).any())

    def is_initialized(self) -> bool:
        """``bool(self.initialized)`` (a buffer), read from the device until it is True and then
        remembered, so that a data-initialised quantizer does not wait for the device every step."""
        if not self.__dict__.get("_init_seen", False):
            self._init_seen = bool(self.initialized)
        return self._init_seen

    def _load_from_state_dict(self, *args, **kwargs):
        self._init_seen = False  # the loaded ``initialized`` is read again
        super()._load_from_state_dict(*args, **kwargs)

    def clip_round(self, x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        """:func:`~.functional.clip_round` of ``x`` onto ``2**bits`` levels in [low, high], recording
        the levels and the range (the clip-round family's :meth:`grid`)."""
        self._clip_range = (low.detach(), high.detach())
        self.record_levels(clip_round_levels(low, high, self.bits, self.per_channel, x.dtype))
        return clip_round(x, low, high, self.bits)

    # -- self-description --------------------------------------------------------------------
    def grid(self) -> tuple[Tensor, Tensor, int, int, str | None] | None:
        """``(low, step, qmin, qmax, rule)`` when the levels are the uniform grid
        ``low + k*step`` (k = qmin..qmax; low, step float32 of shape (R,)), else None. Families
        with a grid override this; the default is the clip-round grid of the last
        :meth:`clip_round` call, or None (a finite set searched by nearest level)."""
        if self._clip_range is None:
            return None
        low, step = clip_round_grid(*self._clip_range, self.bits)
        qmax = 2**self.bits - 1
        if step.numel() == 1:  # the codes the clamp at high leaves: fewer where the range collapsed (step at its floor)
            high = torch.as_tensor(float(self._clip_range[1].detach().reshape(-1)[0]), dtype=torch.float32)
            qmax = min(qmax, int(torch.round((high - low[0]) / step[0])))
        return low, step, 0, qmax, "clip_div"

    def rule(self) -> str | None:
        """The float32 rule of a non-grid quantizer's forward (:data:`RULES`)."""
        return "nearest"

    def describe(self) -> QuantDescription:
        """The quantizer's current level set and code rule (:class:`QuantDescription`)."""
        lv = self.levels()
        g = self.grid()
        if g is None:
            low = step = None
            qmin, qmax, rule = 0, lv.shape[-1] - 1, self.rule()
        else:
            low, step, qmin, qmax, rule = g
        return QuantDescription(self.bits, self.role, lv, g is not None, low, step, qmin, qmax,
                                bool((lv < 0).any()), rule, self.n_scales)

    # -- bit width ---------------------------------------------------------------------------
    def set_bits(self, bits: int) -> None:
        """Change the bit width in place: no new modules, learned state (LSQ's step, PACT's
        alpha) kept, derived constants updated (:meth:`_bits_changed`). Families with one bit
        width raise a one-line :class:`ConfigError`. The levels are current after the next call."""
        if self.min_bits == self.max_bits:
            raise ConfigError(f"quantizer '{self.alias}' has the fixed bit width {self.min_bits}; it cannot change bits")
        bits, old = check_bits(type(self), bits), self.bits
        if bits == old:  # nothing to change (before session 26 centroids and LQ-Net emptied their codebook)
            return
        self.bits = bits
        try:
            self._bits_changed()
        except ConfigError:  # refused: the old width stays whole (before session 25 sawb closed_form kept the new
            self.bits = old  # bits and failed later with a KeyError)
            self._bits_changed()
            raise
        self._last_levels = None
        self.__dict__["_ran"] = False

    def _bits_changed(self) -> None:
        """Hook: update what depends on ``self.bits`` (the default has nothing to update)."""

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, role={self.role}"
        return s + (", per_channel=True" if self.per_channel else "")


def check_bits(cls: type, bits) -> int:
    """``bits`` as an int (any integer type: numpy, a 0-dim integer tensor), or a one-line ConfigError."""
    import operator

    allowed = str(cls.min_bits) if cls.min_bits == cls.max_bits else f"{cls.min_bits}..{cls.max_bits}"
    try:
        if isinstance(bits, bool):
            raise TypeError
        bits = operator.index(bits)
    except TypeError:
        raise ConfigError(f"quantizer '{cls.alias}' supports integer bits {allowed}, got {bits!r}") from None
    if not cls.min_bits <= bits <= cls.max_bits:
        raise ConfigError(f"quantizer '{cls.alias}' supports bits {allowed}, got {bits}")
    return bits


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
_REGISTRY = Registry("quantizer", fixed=("bits", "role"))


def register_quantizer(alias: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a quantizer buildable by name (``build_quantizer(alias, ...)``)."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)) or cls.quantize is Quantizer.quantize:
            raise TypeError(f"quantizer '{alias}': register a subclass of lowbit.quant.Quantizer that implements "
                            "quantize(x) -> x_q")
        cls.alias = alias
        return _REGISTRY.register(alias)(cls)

    return deco


def list_quantizers(role: str | None = None) -> list[str]:
    return [a for a in _REGISTRY.names() if role is None or role in _REGISTRY.get(a).roles]


def get_quantizer_class(name: str) -> type[Quantizer]:
    return _REGISTRY.get(name)


def quantizer_options(name: str) -> list[str]:
    """Keyword options a quantizer accepts besides ``bits`` and ``role``."""
    return _REGISTRY.options(name)


def build_quantizer(name: str, bits: int | None, role: str | None = None, **options) -> Quantizer:
    """Build a registered quantizer; every bad input is a one-line :class:`ConfigError`.

    ``role`` defaults to the family's first role ("weight", or "act" for PACT / uniform).
    """
    cls = get_quantizer_class(name)
    role = role or cls.roles[0]
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got '{role}'")
    _REGISTRY.check_options(name, options)
    try:
        return cls(bits=bits, role=role, **options)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"quantizer '{name}': {e}") from None
