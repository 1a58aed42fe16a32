"""What a deployed layer needs to know about its quantizers: level sets, integer codes, act grids.

Weights
-------
A quantized weight is stored as integer *codes*: the index of each weight's value in the sorted
level set ``levels()`` of its quantizer (per tensor ``(L,)`` or per output channel ``(R, L)``),
bit-packed at the quantizer's bits. The level set itself is stored compactly (:class:`LevelSpec`):

* ``grid``:   ``lo + j·step`` per row: uniform quantizers (min-max, SAWB; BWN ``{-β, β}`` and TWN
  ``{-β, 0, β}`` are grids too): 2 floats per row;
* ``lattice``: ``(j + zero)·step`` per row, integer ``zero`` (LSQ's ``k·s``): 2 floats per row;
* ``values``: ``scale[r] · v_j``, one shared value list (LSQ ``s·{-2^(b-1) ..}``, power-of-two
  and value-set quantizers): L + R floats;
* ``table``:  every level of every row (anything else; per tensor this is often the smallest).

The kind is chosen so that the stored numbers rebuild the quantizer's float32 levels bit for bit.

For integer arithmetic every row is then written as ``level_j = off + s · m_j`` with small
integers ``m`` (:func:`integer_form`), preferring ``off = 0``: symmetric grids give odd integers
(SAWB 2 bit: ``α/3 · {-3, -1, 1, 3}``), LSQ gives ``s · {-2^(b-1) .. 2^(b-1)-1}``, power-of-two
sets give ``2^-K · {±1, ±2, .., ±2^K}`` (shifts); a uniform grid whose 0 is off the grid keeps an
offset ``off = lo`` with ``m = j``. A value set with no common base (``{-1, 0.3, 1}``) has no
integer form; its layer runs on float MACs over the decoded levels.

Activations
-----------
The exporter replays the exact float32 rule an activation quantizer describes
(:meth:`lowbit.quant.Quantizer.describe`), so that codes agree bit for bit (:class:`ActQuant`):

* ``clip_div`` (min-max, uniform, PACT, DoReFa, QNN, SAT without calibration:
  :func:`lowbit.quant.functional.clip_round`):
  ``k = min(rint((max(x, lo) - lo) / step), 2^b - 1)``, value ``lo + k·step``. The quantizer
  clamps at ``hi`` before dividing; because ``(hi - lo)/step`` rounds to ``2^b - 1`` the clamp of
  the code gives the same result without storing ``hi``.
* ``mul_clip`` (LSQ, Esser et al. 2020 eq. 1; SAT's calibrated PACT):
  ``k = rint(clamp(x · (1/s), -Qn, Qp))``, value ``k·s``.
* ``nearest`` (BNN's sign, learned centroids, LQ-Net): ``k = #{j : x >= m_j}`` with the float32
  midpoints ``m_j = (l_j + l_{j+1})/2`` of the levels ``l`` (:func:`lowbit.quant.functional.nearest_index`);
  value ``lo + k·step`` when the levels are a grid (BNN: -1 + 2k), else the stored level ``l_k``
  (such a layer runs the float kernel).

``rint`` is round-half-to-even (``torch.round``, C99 ``rintf``, ``np.rint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..quant import Quantizer

#: relative tolerance when recognising a grid or an integer form in float32 levels
LEVEL_RTOL = 1e-5
#: largest |m| of an integer form (C accumulates m·k in int32)
MAX_INT_LEVEL = 2**15 - 1  # int16: the C code table and the ONNX initializer (po2 5-bit reaches 2**15)


# ---------------------------------------------------------------------------------------------
# weight level sets
# ---------------------------------------------------------------------------------------------
@dataclass
class LevelSpec:
    """A layer's level set, ``R`` rows (1 per tensor, or one per output channel) of ``L`` levels.

    Stored so that :meth:`levels32` rebuilds the quantizer's float32 levels bit for bit (the
    exporter only chooses a kind that does): ``grid`` as the quantizer computes it,
    ``f32(j·step) + lo`` (:func:`lowbit.quant.uniform.grid_levels`); ``lattice`` as
    ``f32((j + zero)·step)`` (LSQ's ``k·s``); ``values`` as ``f32(values·scale)``; ``table`` as is.
    """

    kind: str  # "grid" | "lattice" | "values" | "table"
    rows: int
    n: int  # L
    lo: np.ndarray | None = None  # grid: (R,) float32
    step: np.ndarray | None = None  # grid, lattice: (R,) float32
    zero: np.ndarray | None = None  # lattice: (R,) integers (as float32): level j is (j + zero)·step
    values: np.ndarray | None = None  # values: (L,) float32
    scale: np.ndarray | None = None  # values: (R,) float32
    table: np.ndarray | None = None  # table: (R, L) float32

    def levels64(self) -> np.ndarray:
        """The levels as float64 ``(R, L)``: the exact real values the stored numbers define."""
        j = np.arange(self.n, dtype=np.float64)
        if self.kind == "grid":
            return self.lo.astype(np.float64)[:, None] + j * self.step.astype(np.float64)[:, None]
        if self.kind == "lattice":
            return (j[None, :] + self.zero.astype(np.float64)[:, None]) * self.step.astype(np.float64)[:, None]
        if self.kind == "values":
            return self.scale.astype(np.float64)[:, None] * self.values.astype(np.float64)[None, :]
        return self.table.astype(np.float64)

    def levels32(self) -> np.ndarray:
        """The float32 levels, computed as the quantizer computes them."""
        j = np.arange(self.n, dtype=np.float32)
        if self.kind == "grid":
            return j[None, :] * self.step[:, None] + self.lo[:, None]
        if self.kind == "lattice":
            return (j[None, :] + self.zero[:, None]) * self.step[:, None]
        if self.kind == "values":
            return self.values[None, :] * self.scale[:, None]
        return self.table

    def arrays(self) -> dict[str, np.ndarray]:
        """The float32 arrays stored for this level set (what the size accounting counts)."""
        names = {"grid": ("lo", "step"), "lattice": ("zero", "step"), "values": ("values", "scale"),
                 "table": ("table",)}[self.kind]
        return {k: getattr(self, k) for k in names}

    @property
    def n_floats(self) -> int:
        return sum(a.size for a in self.arrays().values())


def describe_levels(levels: np.ndarray) -> LevelSpec:
    """The most compact :class:`LevelSpec` whose :meth:`~LevelSpec.levels32` equals ``levels``
    ((L,) or (R, L), float32) bit for bit; a table when nothing smaller is exact."""
    lv = np.asarray(levels, dtype=np.float32)
    lv = lv.reshape(1, -1) if lv.ndim == 1 else lv
    rows, n = lv.shape
    f32, f64 = np.float32, np.float64
    lo, hi = lv[:, 0], lv[:, -1]
    cands = []
    # grids: the step as a per-tensor range computes it (float64 then float32) or a per-channel
    # one (float32 throughout), or the step between the two first levels
    for step in (((hi.astype(f64) - lo.astype(f64)) / (n - 1)).astype(f32), (hi - lo) / f32(n - 1), lv[:, 1] - lo):
        cands.append(LevelSpec("grid", rows, n, lo=lo.copy(), step=np.asarray(step, f32)))
    # integer lattices k·s (LSQ): s is the smallest non-zero magnitude, 0 is level -zero
    nz = np.where(lv != 0, np.abs(lv), np.inf).min(1)
    if np.all(np.isfinite(nz)):
        cands.append(LevelSpec("lattice", rows, n, zero=np.rint(lo / nz).astype(f32), step=nz.astype(f32)))
    # shared values x per-row scale: integers x step (LSQ, power-of-two) or values / max|level|
    amax = np.abs(lv).max(1)
    form = integer_form(lv)
    if form is not None and np.all(form[2] == 0) and np.all(form[0] == form[0][:1]):
        cands.append(LevelSpec("values", rows, n, values=form[0][0].astype(f32), scale=form[1].astype(f32)))
    ref = int(np.argmax(amax))
    if amax[ref] > 0:
        cands.append(LevelSpec("values", rows, n, values=(lv[ref] / amax[ref]).astype(f32), scale=amax.astype(f32)))
    cands.append(LevelSpec("table", rows, n, table=lv.copy()))
    exact = [c for c in cands if np.array_equal(c.levels32(), lv)]
    return min(exact, key=lambda c: c.n_floats)  # the table is always exact; min keeps the first of equals


def integer_form(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Write each row as ``level_j = off + s·m_j`` with integers ``m`` (module docstring).

    Returns ``(m (R, L) int64, s (R,) float64, off (R,) float64)``, or None when some row has no
    such form (a value set without a common base). ``off = 0`` whenever the row is an integer
    multiple of its smallest non-zero magnitude; otherwise a uniform grid keeps ``off = lo``.
    """
    lv = np.asarray(levels, dtype=np.float64)
    lv = lv.reshape(1, -1) if lv.ndim == 1 else lv
    rows, n = lv.shape
    m = np.zeros((rows, n), dtype=np.int64)
    s = np.zeros(rows)
    off = np.zeros(rows)
    for r in range(rows):
        row = lv[r]
        amax = np.abs(row).max()
        if amax == 0.0:
            continue  # an all-zero row: m = 0
        nz = np.abs(row[row != 0.0])
        base = nz.min()
        q = row / base
        qi = np.rint(q)
        if np.abs(qi).max() <= MAX_INT_LEVEL and np.all(np.abs(q - qi) <= LEVEL_RTOL * np.abs(qi).max()):
            m[r], s[r] = qi.astype(np.int64), base
            continue
        step = (row[-1] - row[0]) / (n - 1)
        j = np.arange(n)
        if step > 0 and np.all(np.abs(row[0] + j * step - row) <= LEVEL_RTOL * amax):
            m[r], s[r], off[r] = j, step, row[0]
            continue
        return None
    return m, s, off


def weight_codes(weight: torch.Tensor, levels: torch.Tensor, layer: str) -> np.ndarray:
    """Index of each weight's value in its row of ``levels`` (uint8, the weight's shape).

    The quantized weight must lie on the level set (the quantizers guarantee it bit for bit);
    a weight that does not (a relaxed or mixed weight of a method that was not finalized) is a
    :class:`ConfigError`: it has no integer code.
    """
    w = weight.detach().double()
    lv = levels.detach().double()
    per_row = lv.dim() == 2 and lv.shape[0] > 1
    lv = lv.reshape(lv.shape[0] if per_row else 1, -1)
    wr = w.reshape(lv.shape[0] if per_row else 1, -1)
    if per_row and wr.shape[0] != lv.shape[0]:
        raise ConfigError(f"layer '{layer}': {lv.shape[0]} level rows for a weight of {w.shape[0]} output channels")
    mid = (lv[:, 1:] + lv[:, :-1]) / 2
    codes = torch.stack([torch.bucketize(wr[i], mid[i]) for i in range(wr.shape[0])])
    dev = (lv.gather(1, codes) - wr).abs().max().item()
    scale = max(lv.abs().max().item(), 1e-30)
    if dev > 1e-6 * scale:
        raise ConfigError(
            f"layer '{layer}': its weight is not on its quantizer's level set (max deviation {dev:.3g}); "
            "only weights that are exactly quantized can be exported (finalize the method first)"
        )
    return codes.reshape(w.shape).cpu().numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# activation grids
# ---------------------------------------------------------------------------------------------
@dataclass
class ActQuant:
    """A layer's input quantizer as a deployable rule (module docstring); constants are float32."""

    quantizer: str
    bits: int
    rule: str  # "clip_div" | "mul_clip" | "nearest"
    step: float  # clip_div: the divisor; mul_clip: the step s (value = k*s); nearest: 0 off a grid
    lo: float = 0.0  # clip_div, nearest: the value of code 0
    inv: float = 0.0  # mul_clip: float32(1/s), the multiplier
    qmin: int = 0  # integer code range
    qmax: int = 0
    table: list[float] | None = None  # nearest: the float32 levels (their midpoints are the thresholds)

    @property
    def uniform(self) -> bool:
        """Whether the value of code k is ``real_lo + step·k`` (what the integer kernel needs)."""
        return self.step != 0.0

    @property
    def thresholds(self) -> np.ndarray:
        """nearest: the float32 midpoints of the levels, as the quantizer computes them."""
        t = np.asarray(self.table, dtype=np.float32)
        return (t[1:] + t[:-1]) / np.float32(2)

    @property
    def zero(self) -> int:
        """Storage offset: codes are kept as ``k - qmin`` in 0..2^b-1 (uint8)."""
        return -self.qmin

    @property
    def real_lo(self) -> float:
        """The real value of integer code 0 (``a = real_lo + step·k``)."""
        return 0.0 if self.rule == "mul_clip" else self.lo

    def to_dict(self) -> dict:
        d = {"quantizer": self.quantizer, "bits": self.bits, "rule": self.rule, "step": self.step,
             "lo": self.lo, "inv": self.inv, "qmin": self.qmin, "qmax": self.qmax}
        return d if self.table is None else {**d, "table": list(self.table)}

    @classmethod
    def from_dict(cls, d: dict) -> ActQuant:
        return cls(**d)

    # -- reference implementation (NumPy, float32: the same operations as PyTorch and the C code)
    def codes(self, x: np.ndarray) -> np.ndarray:
        """Integer codes ``k`` (int32) of a float32 array."""
        x = np.asarray(x, dtype=np.float32)
        f32 = np.float32
        if self.rule == "clip_div":
            t = np.maximum(x, f32(self.lo))
            if self.lo != 0.0:
                t = t - f32(self.lo)
            k = np.rint(t / f32(self.step))
            return np.minimum(k, f32(self.qmax)).astype(np.int32)
        if self.rule == "nearest":
            k = np.zeros(x.shape, dtype=np.int32)
            for m in self.thresholds:
                k += x >= m
            return k + np.int32(self.qmin)
        t = np.minimum(np.maximum(x * f32(self.inv), f32(self.qmin)), f32(self.qmax))
        return np.rint(t).astype(np.int32)

    def values(self, k: np.ndarray) -> np.ndarray:
        """Dequantized float32 values of codes, computed as the quantizer computes them."""
        if not self.uniform:
            return np.asarray(self.table, dtype=np.float32)[np.asarray(k) - self.qmin]
        v = np.asarray(k).astype(np.float32) * np.float32(self.step)
        if self.real_lo != 0.0:
            v = v + np.float32(self.real_lo)
        return v


def _f32(x) -> float:
    return float(np.float32(x))


def act_quant(q: nn.Module | None, layer: str) -> ActQuant | None:
    """The :class:`ActQuant` of a layer's ``input_quantizer`` (None for none or full precision),
    read from what the quantizer describes of itself (:meth:`lowbit.quant.Quantizer.describe`)
    after its last call (so run one forward pass first)."""
    if q is None:
        return None
    if not isinstance(q, Quantizer):
        what = (" (an activation mixture, DQA/BinaryRelax act_mixture: a deployed layer needs one activation grid; "
                "harden it first: lowbit.quant_state(model).method.finalize(model), as a run folder's export does; "
                "or keep the mixture to the weights)" if "Mixture" in type(q).__name__ else "")
        raise ConfigError(f"layer '{layer}': input quantizer {type(q).__name__} is not a lowbit Quantizer{what}")
    try:
        d = q.describe()
    except RuntimeError as e:
        if q.__dict__.get("_ran", False):  # it ran and has no levels: a quantizer that does not record them
            raise ConfigError(f"layer '{layer}': {e}") from None
        raise ConfigError(f"layer '{layer}': its input quantizer has not run yet; run one forward pass") from None
    if d.levels is None:
        return None  # full precision
    name, bits = q.alias, int(d.bits)
    if d.levels.dim() == 2 and d.levels.shape[0] > 1 or d.rule not in ("clip_div", "mul_clip", "nearest"):
        raise ConfigError(f"layer '{layer}': activation quantizer '{name}' describes no per-tensor float32 rule "
                          f"(rule {d.rule}); the exporter cannot replay it")
    low = _f32(d.low[0]) if d.uniform else 0.0
    step = _f32(d.step[0]) if d.uniform else 0.0
    if d.rule == "mul_clip":
        return ActQuant(name, bits, "mul_clip", step=step, inv=_f32(1.0 / step), qmin=d.qmin, qmax=d.qmax)
    if d.rule == "clip_div":
        return ActQuant(name, bits, "clip_div", step=step, lo=low, qmin=d.qmin, qmax=d.qmax)
    table = [_f32(v) for v in d.levels.detach().reshape(-1).float().tolist()]
    return ActQuant(name, bits, "nearest", step=step, lo=low, qmin=d.qmin, qmax=d.qmax, table=table)
