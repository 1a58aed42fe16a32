"""The integer-only network: its graph, the NumPy integer reference, and its packed file.

What an integer-mode model (``plan.integer: true``, :mod:`lowbit.intmode`) computes in eval mode
*is* this graph run by :class:`IntReference`; the C runtime (``runtime/``, :mod:`.int_c`) and
the integer ONNX model (:mod:`.int_onnx`) compute the same integers.

Tensors hold unsigned integer codes ``q`` in ``0 .. 2^bits − 1`` with real value
``scale · (q − zero)`` (:class:`TensorQ`; ``zero`` an integer). Ops (:class:`IntOp`):

=============  ==================================================================================
``quant_in``   float input -> codes, with the input quantizer's own float32 rule (:class:`ActQuant`)
``conv``       conv / linear / grouped / depthwise on codes, integer weights ``m`` (symmetric,
               :func:`lowbit.export.levels.integer_form`), ``A = Σ m·(q − zero_in)`` (padding is a
               real 0), ``acc = A + bias`` (+ ``requantize(q_res − zero_res, res_mult, res_shift)``,
               a fused residual add), then ``clamp(requantize(acc, mult, shift) + zero_out, lo, hi)``
               (a fused ReLU is ``lo = zero_out``) or, for the classifier, float32 logits
               ``f32(acc) · out_scale``. With ``attrs["residual"] == "output"`` the residual is
               added after the conv's own requantization instead (:func:`residual_output_constants`):
               ``mid = clamp(requantize(acc, mult, shift) + mid_zero, 0, 255)``, then
               ``clamp(rne((mid − mid_zero)·mid_mult + (q_res − zero_res)·res_mult, res_shift)
               + zero_out, lo, hi)`` (``rne(v, S)``: ``v / 2^S`` rounded half to even)
``gap``        global average pooling: ``requantize(Σ_p (q − zero_in), mult, shift) + zero_out``
``maxpool``    max of the codes in each window (padding skipped)
``flatten``    a reshape
=============  ==================================================================================

Per-channel constants (computed once, :func:`conv_constants`, in float64): with the BatchNorm
``g, h`` (eval, running statistics), the weight scale ``s_w`` and the input scale ``s_in``,
``eff = g·s_w·s_in`` (the real value of one accumulator unit), ``bias = rint(h / eff)``,
``(mult, shift) = quantize_multiplier(eff / s_out)``, residual ``quantize_multiplier(s_res / eff)``.
The requantization is :func:`lowbit.export.requant.requantize` (int32 multiplier + shift).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .levels import ActQuant
from .pack import pack_codes, packed_nbytes, read_codes
from .package import check_digests, check_manifest, digests, reading, sealed
from .requant import quantize_multiplier, requantize, rne_shift

FORMAT = "lowbit.packed.integer"
VERSION = 2  # 2: conv attrs "residual" (output residual adds); version 1 files load too
_F32 = np.float32


@dataclass
class TensorQ:
    """A quantized tensor: ``real = scale · (q − zero)``, ``q`` in ``0 .. 2^bits − 1``."""

    bits: int
    zero: int
    scale: float  # float64 (documentation and constants; the runtime only sees multipliers)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def to_dict(self) -> dict:
        return {"bits": self.bits, "zero": self.zero, "scale": self.scale}


def tensor_q(a: ActQuant, where: str) -> TensorQ:
    """The :class:`TensorQ` of an activation quantizer's uniform grid (its 0 must be a code)."""
    if not a.uniform or a.rule not in ("clip_div", "mul_clip"):
        raise ConfigError(f"integer mode: tensor '{where}': quantizer '{a.quantizer}' (rule {a.rule}) is not a "
                          "uniform grid; use pact, lsq, uniform or dorefa activations")
    step = float(a.step)
    z = -a.qmin - float(a.real_lo) / step
    if abs(z - round(z)) > 1e-4 or step <= 0:
        raise ConfigError(f"integer mode: tensor '{where}': quantizer '{a.quantizer}' has its 0 between two codes "
                          f"(zero point {z:.4g}); use a grid with 0 on it (pact, lsq, uniform)")
    n = a.qmax - a.qmin + 1
    bits = max(1, int(np.ceil(np.log2(n))))
    if n != 2**bits:  # the integer network clamps to 2^bits codes: it would give codes the quantizer never does
        raise ConfigError(f"integer mode: tensor '{where}': quantizer '{a.quantizer}' uses {n} codes, not 2^bits: its "
                          "range collapsed (calibrated on constant inputs, e.g. a layer dead on the data seen); train "
                          "with data that reaches it, or keep the layer in full precision")
    if bits > 8:
        raise ConfigError(f"integer mode: tensor '{where}' has {bits}-bit codes; at most 8")
    return TensorQ(bits, int(round(z)), step)


@dataclass
class IntOp:
    kind: str
    name: str
    inputs: list[str]  # conv: [x] or [x, residual]
    output: str
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)  # geometry, groups, layer, relu
    act: ActQuant | None = None  # quant_in
    codes: np.ndarray | None = None  # conv: weight codes (O, C/g, kh, kw) uint8
    wbits: int = 0
    wquant: str = ""
    lut: np.ndarray | None = None  # (R, L) int16: code -> integer weight
    bias: np.ndarray | None = None  # int32 (O,)
    mult: np.ndarray | None = None  # int32 (O,) (gap: (1,))
    shift: np.ndarray | None = None
    res_mult: np.ndarray | None = None
    res_shift: np.ndarray | None = None
    out_scale: np.ndarray | None = None  # float32 (O,): classifier

    def m(self) -> np.ndarray:
        """Integer weights (O, F) int64."""
        o = self.codes.shape[0]
        rows = np.arange(o) if self.lut.shape[0] > 1 else np.zeros(o, dtype=np.int64)
        return self.lut.astype(np.int64)[rows[:, None], self.codes.reshape(o, -1).astype(np.int64)]


def input_normalisation(graph: "IntGraph") -> tuple[list[float], list[float]]:
    """``(mean, std)`` per input channel from ``graph.meta["input_normalisation"]`` (what ``export_run`` records in
    the packed file); a one-line ConfigError when they are missing or do not match the input's channels."""
    norm = (graph.meta or {}).get("input_normalisation") or {}
    mean, std = norm.get("mean"), norm.get("std")
    c = graph.input_shape[0] if graph.input_shape else 0
    if mean is None or std is None:
        raise ConfigError("integer graph: no input normalisation recorded (meta['input_normalisation'] with mean "
                          "and std, as export_run writes it): pixels cannot be mapped to input codes")
    if len(mean) != c or len(std) != c:
        raise ConfigError(f"integer graph: input normalisation has {len(mean)} means / {len(std)} stds for "
                          f"{c} input channels")
    return list(mean), list(std)


def pixel_table(graph: "IntGraph") -> np.ndarray:
    """``(C, 256)`` uint8: the input code (``k − qmin``) of every pixel value 0..255 of every channel, i.e. the
    network input ``x = (pixel / 255 − mean) / std`` (:func:`lowbit.data.transforms.normalize`, the data
    pipeline's own float32 op) quantized by the graph's input rule. With it a device feeds raw 8-bit pixels: no
    float at the input (:func:`lowbit.export.int_c.write_int_c`'s ``lowbit_predict_pixels``). The mean and std
    come from ``graph.meta["input_normalisation"]``, which ``export_run`` records in the packed file."""
    from ..data.transforms import normalize

    mean, std = input_normalisation(graph)
    c = len(mean)
    px = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, c, 256, 1)
    x = normalize(px, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))
    a = graph.ops[0].act
    k = a.codes(x.reshape(c, 256).numpy()) - a.qmin
    if k.min() < 0 or k.max() > 255:  # pragma: no cover - input codes are at most 8 bits (tensor_q)
        raise ConfigError("integer graph: input codes outside 0..255")
    return k.astype(np.uint8)


def pixel_codes(graph: "IntGraph", pixels: np.ndarray) -> np.ndarray:
    """Input codes (int64, the graph's input shape) of uint8 images ``(N, C, H, W)``: :func:`pixel_table`."""
    p = np.asarray(pixels)
    if p.dtype != np.uint8:
        raise ConfigError(f"pixels must be uint8 (raw 0..255 images), got {p.dtype}")
    if p.ndim != 1 + len(graph.input_shape) or tuple(p.shape[1:]) != tuple(graph.input_shape):
        raise ConfigError(f"pixels of shape {tuple(p.shape)}: expected (N, {', '.join(map(str, graph.input_shape))})")
    t = pixel_table(graph)
    return t[np.arange(t.shape[0]).reshape(1, -1, *([1] * (p.ndim - 2))), p].astype(np.int64)


@dataclass
class IntGraph:
    ops: list[IntOp]
    tensors: dict[str, TensorQ]  # every code tensor (the graph output is float logits)
    input: str
    output: str
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------
def conv_constants(eff: np.ndarray, h: np.ndarray, s_out: float | None, s_res: float | None, where: str,
                   factors: dict[str, np.ndarray] | None = None) -> dict:
    """int32 ``bias``, ``mult``, ``shift`` (and ``res_mult``, ``res_shift``; or ``out_scale`` for a
    float output) from the per-channel real accumulator unit ``eff`` and BN shift ``h``. ``factors``: the
    per-channel factors whose product is ``eff`` (by name), for the message when a bias does not fit int32."""
    eff = np.asarray(eff, dtype=np.float64)
    if np.any(eff == 0) or not np.all(np.isfinite(eff)):
        raise ConfigError(f"integer mode: layer '{where}': a channel with a zero or non-finite scale "
                          "(BatchNorm gamma = 0?)")
    h = np.asarray(h, dtype=np.float64)
    b = np.rint(h / eff)
    if np.abs(b).max(initial=0) >= 2**30:
        i = int(np.argmax(np.abs(b) >= 2**30))
        why = "" if not factors else (" (" + " x ".join(f"{k} {np.broadcast_to(v, eff.shape)[i]:.3g}"
                                                        for k, v in factors.items())
                                      + "); a step that collapsed on a constant input, or a huge BatchNorm shift")
        raise ConfigError(f"integer mode: layer '{where}': channel {i}'s bias does not fit the int32 accumulator: "
                          f"shift {h[i]:.3g} over an accumulator unit of {eff[i]:.3g}{why}")
    out = {"bias": b.astype(np.int32)}
    if s_out is None:
        out["out_scale"] = eff.astype(_F32)
    else:
        out["mult"], out["shift"] = quantize_multiplier(eff / s_out)
    if s_res is not None:
        out["res_mult"], out["res_shift"] = quantize_multiplier(s_res / eff)
    return out


#: integer mode's fine bias (:func:`weight_prescale`): a layer's accumulator unit is made at most this
#: fraction of its output step (so the int32 bias, the folded BatchNorm shift, is within 1/128 code)
FINE_UNIT = 2.0**-6


def weight_prescale(lut: np.ndarray, eff: np.ndarray, step: float | None, fan_in: int, in_range: int,
                    in_qmax: int) -> int:
    """The ``k`` of a layer's fine bias: its integer weights become ``m·2^k`` and its accumulator unit
    ``eff/2^k``, so that the bias ``rint(h/eff)``, rounded to whole accumulator units, keeps the
    BatchNorm shift ``h`` to within ``2^−k`` of a unit (a unit of 2-bit inputs times 2-bit weights is
    often a third of an output code or more: the main difference between the integer network and the
    float graph it trained, at 2 bits). The computed network is the same up to that rounding; every
    backend runs it unchanged (the weights are still integers). ``k`` is the smallest that makes the
    unit at most ``FINE_UNIT`` output steps (``step`` None, a float output: as large as allowed),
    kept so that the weights stay in int8 (onnxruntime's integer kernels), a layer that onnxruntime's
    uint8 x int8 kernel computed exactly (``2·in_qmax·max|m| <= 32767``) stays so, and the largest
    accumulator ``fan_in·in_range·max|m|`` stays below 2^24 (exact in float32) if it was."""
    m = np.asarray(lut, dtype=np.int64)
    top = int(np.abs(m).max(initial=0))
    if top == 0:
        return 0
    k = 0
    while True:
        nxt = m * 2 ** (k + 1)
        if nxt.max() > 127 or nxt.min() < -128:
            break
        if 2 * in_qmax * top <= 32767 < 2 * in_qmax * top * 2 ** (k + 1):
            break
        if fan_in * in_range * top < 2**24 <= fan_in * in_range * top * 2 ** (k + 1):
            break
        k += 1
    if step is None:
        return k
    unit = float(np.abs(np.asarray(eff, dtype=np.float64)).max(initial=0)) / step
    need = max(0, int(np.ceil(np.log2(unit / FINE_UNIT)))) if unit > 0 else 0
    return min(k, need)


def residual_output_constants(t_out: TensorQ, relu: bool, t_res: TensorQ, where: str,
                              v_range: tuple[float, float] | None = None) -> dict:
    """The ``residual: output`` form of a residual add (TFLite's int8 ADD, onnxruntime's
    ``QLinearConv`` + ``QLinearAdd`` bit for bit): the conv is requantized to an 8-bit intermediate
    ``mid`` at step ``s_mid = s_out·2^−p`` with zero ``mid_zero``, then added to the residual codes
    at the output: ``rne((mid − mid_zero)·mid_mult + (q_res − zero_res)·res_mult, res_shift)``.

    * ``p`` and ``mid_zero`` make ``mid``'s range cover every conv value whose sum with some
      residual lands inside the output range, so clamping ``mid`` never changes an output (the
      only extra error is ``mid``'s rounding, ``s_mid/2``);
    * ``mid_mult = 2^(S−p)``, ``res_mult = rint(s_res/s_out·2^S)``: every value the add computes
      is a multiple of ``2^−S`` below ``2^(24−S)``, so onnxruntime's float32 ``QLinearAdd``
      (scales ``2^−p``, ``res_mult·2^−S``, ``1``) computes it exactly and rounds half to even.

    ``v_range`` (``plan.integer_mid_range: observed``, :class:`lowbit.intmode.MidRound`): the conv
    values seen in training (a moving average of each batch's min and max); ``mid`` then covers only
    their part of that range, a finer grid, and clamps the rest, as training did.

    Returns ``{"s_mid", "attrs": {"residual", "mid_zero", "mid_mult"}, "res_mult", "res_shift"}``."""
    s_out, lo = t_out.scale, (t_out.zero if relu else 0)
    y_lo, y_hi = (lo - t_out.zero) * s_out, (t_out.qmax - t_out.zero) * s_out
    r_lo, r_hi = -t_res.zero * t_res.scale, (t_res.qmax - t_res.zero) * t_res.scale
    need_lo, need_hi = r_hi - y_lo, y_hi - r_lo  # mid must reach down to -need_lo and up to need_hi
    if v_range is not None:
        lo_v, hi_v = min(max(-float(v_range[0]), 0.0), need_lo), min(max(float(v_range[1]), 0.0), need_hi)
        if lo_v + hi_v > 0:
            need_lo, need_hi = lo_v, hi_v
    p = int(np.floor(np.log2(254 * s_out / (need_lo + need_hi))))
    ratio = t_res.scale / s_out
    bound = 255 * (1 + 2.0**-min(p, 0) + ratio)  # |zero_out|, |mid term|, |residual term|: each at most
    big_s = 23 - int(np.ceil(np.log2(bound)))
    p = min(p, big_s)
    if big_s < 0 or p < -8:
        raise ConfigError(f"integer mode: layer '{where}': residual scale ratio {ratio:.3g} is out of range for an "
                          "output residual add")
    s_mid = s_out * 2.0**-p
    z_mid = int(np.ceil(need_lo / s_mid - 1e-9))
    res_mult = int(np.rint(ratio * 2.0**big_s))
    return {"s_mid": s_mid, "attrs": {"residual": "output", "mid_zero": z_mid, "mid_mult": 2 ** (big_s - p)},
            "res_mult": np.int32(res_mult), "res_shift": np.int32(big_s)}


def mid_step(op: IntOp, t_out: TensorQ) -> float:
    """``s_mid`` of an output-form residual conv (:func:`residual_output_constants`), from its stored
    integers: ``s_out·mid_mult·2^−res_shift``."""
    return t_out.scale * op.attrs["mid_mult"] * 2.0 ** -int(op.res_shift[0])


def accumulator_bound(op: IntOp, t_in: TensorQ, t_res: TensorQ | None) -> int:
    """A bound of the layer's int32 accumulator (bias and an accumulator-form residual included):
    F·max|m|·max|q − zero| + |bias| + residual."""
    f = op.codes[0].size
    bound = f * int(np.abs(op.lut).max(initial=0)) * max(t_in.zero, t_in.qmax - t_in.zero)
    bound += int(np.abs(op.bias.astype(np.int64)).max(initial=0))
    if t_res is not None and op.attrs.get("residual") != "output":
        r = max(t_res.zero, t_res.qmax - t_res.zero)
        bound += int(np.abs(requantize(np.array(r), op.res_mult, op.res_shift)).max(initial=0)) + 1
    return bound


def check_accumulator(op: IntOp, t_in: TensorQ, t_res: TensorQ | None) -> None:
    """The int32 accumulator cannot overflow: :func:`accumulator_bound` < 2^31."""
    bound = accumulator_bound(op, t_in, t_res)
    if bound >= 2**31:
        raise ConfigError(f"integer mode: layer '{op.name}' could overflow its int32 accumulator (bound {bound})")


# ---------------------------------------------------------------------------------------------
# the integer reference
# ---------------------------------------------------------------------------------------------
# Integers are held in torch float tensors (CPU): codes in float32, a layer's accumulators in float32
# where every partial sum of the layer (conv taps, plus the bias) stays below 2^24, else in float64
# (int32 accumulators, and the output add's sums below 2^40, all below 2^53). Every product and partial
# sum is then an integer the type holds exactly, so any summation order gives the exact integer sums,
# and the requantization's float32 multiply is the definition itself
# (:func:`lowbit.export.requant.requantize`). Float32 convolutions run oneDNN's direct/GEMM kernels
# (3-4x faster than the int64 NumPy of sessions 5-17); they are used only on x86 with oneDNN enabled at
# full float32 precision: elsewhere PyTorch may pick a Winograd or FFT kernel (NNPACK; ATen's depthwise
# 3x3 on ARM), whose transforms are not integer, so there every layer sums in float64.
_ARM = platform.machine().lower() in ("arm64", "aarch64") or platform.machine().lower().startswith("arm")


def _geom(op: IntOp) -> tuple:
    if op.attrs["layer"] == "linear":
        (c,), (o,) = op.in_shape, op.out_shape
        return c, 1, 1, o, 1, 1, 1, 1, 1, 1, 0, 0
    c, h, w = op.in_shape
    o, oh, ow = op.out_shape
    (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    return c, h, w, o, oh, ow, kh, kw, sh, sw, ph, pw


def _f32_exact(bound: int) -> bool:
    """Whether float32 convs sum integers whose partial sums stay below ``bound`` exactly: below 2^24, on
    x86, with oneDNN enabled (else NNPACK's Winograd may run) at full float32 precision (not TF32/BF16)."""
    mk = torch.backends.mkldnn
    return (bound < 2**24 and not _ARM and mk.is_available() and mk.enabled
            and mk.conv.fp32_precision in ("none", "ieee"))


def partial_sum_bound(m: np.ndarray, t_in: TensorQ) -> int:
    """A bound of every partial sum of ``Σ m·(q − zero_in)`` over the input's code range, for integer weights ``m``
    (O, ...): the worst output channel's ``Σ|m|`` times the largest ``|q − zero_in|``."""
    return max(t_in.zero, t_in.qmax - t_in.zero) * int(np.abs(m).reshape(len(m), -1).sum(1).max(initial=0))


def conv_weights(op: IntOp, t_in: TensorQ) -> torch.Tensor:
    """The integer weights ``m`` of a conv/linear op as the float tensor :func:`conv_sums` multiplies
    with: (O, C/g, KH, KW) (linear: (O, F)); float32 where every partial sum of its accumulator
    (``Σ m·(q − zero_in)`` from the input's code range, plus the bias; no residual into the
    accumulator) stays below 2^24, else float64. The accumulator is computed in this type."""
    c, h, w, o, oh, ow, kh, kw, sh, sw, ph, pw = _geom(op)
    g = int(op.attrs.get("groups", 1))
    m = op.m()
    bound = partial_sum_bound(m, t_in) + int(np.abs(op.bias.astype(np.int64)).max(initial=0))
    if op.res_mult is not None and op.attrs.get("residual") != "output":
        bound = 2**24  # a residual requantized into the accumulator: float64
    dt = torch.float32 if _f32_exact(bound) else torch.float64
    shape = (o, -1) if op.attrs["layer"] == "linear" else (o, c // g, kh, kw)
    return torch.from_numpy(m).to(dt).reshape(shape)


def conv_sums(x: torch.Tensor, w: torch.Tensor, op: IntOp) -> torch.Tensor:
    """``A = Σ m·x`` of integer inputs ``x`` (N, C, H, W) (``q − zero``, float; padding is a real 0) and the
    integer weights ``w`` of :func:`conv_weights`: exact, in ``w``'s type (N, O, OH, OW) (linear: (N, O))."""
    c, h, w_, o, oh, ow, kh, kw, sh, sw, ph, pw = _geom(op)
    x = x.to(w.dtype)
    # autocast off: under a caller's torch.autocast the conv ran in bfloat16 (before session 29: integer-mode eval,
    # the integer reference and the export's checks computed another network, without a word)
    with torch.autocast(x.device.type, enabled=False):
        if op.attrs["layer"] == "linear":
            a = F.linear(x.reshape(x.shape[0], -1), w)
        else:
            a = F.conv2d(x.reshape(-1, c, h, w_), w, None, (sh, sw), (ph, pw), 1, int(op.attrs.get("groups", 1)))
    return a


def _chan(v: np.ndarray, ndim: int, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v)).to(dtype).reshape((-1,) + (1,) * (ndim - 2))


def out_range(op: IntOp, t_out: TensorQ) -> tuple[int, int]:
    """The codes ``op`` may write to ``t_out``: from its zero after a ReLU (else 0) up to ``qmax``."""
    return (t_out.zero if op.attrs.get("relu") else 0), t_out.qmax


def run_conv(op: IntOp, q: torch.Tensor, t_in: TensorQ, res: torch.Tensor | None, t_res: TensorQ | None,
             t_out: TensorQ | None, w: torch.Tensor | None = None) -> torch.Tensor:
    """Output codes (float32; the classifier: float32 logits) of a conv op on input codes ``q`` (``w``:
    its :func:`conv_weights`, computed here when not given)."""
    n = q.shape[0]
    w = conv_weights(op, t_in) if w is None else w
    q = q.to(torch.float32)  # codes of any integer type (e.g. onnxruntime's uint8): no wrap-around below
    acc = conv_sums(q - t_in.zero if t_in.zero else q, w, op)
    nd = acc.dim()
    acc.add_(_chan(op.bias, nd, acc.dtype))  # exact: conv_weights chose the type for conv + bias
    if op.attrs.get("residual") == "output":
        a = op.attrs
        mid = torch.clamp(requantize(acc, _chan(op.mult, nd), _chan(op.shift, nd)) + a["mid_zero"], 0, 255)
        r = res.reshape(acc.shape).to(torch.float64) - t_res.zero
        v = (mid.to(torch.float64) - a["mid_zero"]) * a["mid_mult"] + r * _chan(op.res_mult, nd)
        v = rne_shift(v, _chan(op.res_shift, nd)) + t_out.zero
        y = torch.clamp(v, *out_range(op, t_out)).to(torch.float32)
        return y.reshape((n,) + tuple(op.out_shape))
    if op.res_mult is not None:
        r = res.reshape(acc.shape).to(torch.float64) - t_res.zero
        acc = acc + requantize(r, _chan(op.res_mult, nd), _chan(op.res_shift, nd))
    if op.out_scale is not None:
        y = acc.to(torch.float32) * _chan(op.out_scale, nd, torch.float32)
    else:
        y = requantize(acc, _chan(op.mult, nd), _chan(op.shift, nd)).add_(t_out.zero).clamp_(*out_range(op, t_out))
    return y.reshape((n,) + tuple(op.out_shape))


def run_gap(op: IntOp, q: torch.Tensor, t_in: TensorQ, t_out: TensorQ) -> torch.Tensor:
    n, c = q.shape[:2]
    s = (q.reshape(n, c, -1).to(torch.float64) - t_in.zero).sum(2)  # integers below 2^53: exact in any order
    v = requantize(s, op.mult[0], op.shift[0]) + t_out.zero
    return torch.clamp(v, 0, t_out.qmax).reshape((n,) + tuple(op.out_shape))


def run_maxpool(op: IntOp, q: torch.Tensor) -> torch.Tensor:
    # padding is skipped (max_pool2d pads with −inf; every window holds at least one code)
    (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    return F.max_pool2d(q.to(torch.float32), (kh, kw), (sh, sw), (ph, pw))


class IntReference:
    """Runs an :class:`IntGraph` (e.g. from :func:`load_int_package`) on float32 inputs: exact integer
    arithmetic (section comment above), on the CPU, NumPy in and out."""

    def __init__(self, graph: IntGraph):
        self.graph = graph
        self._w: dict[str, torch.Tensor] = {}

    def run(self, x: np.ndarray, batch: int = 250, codes: bool = False) -> np.ndarray:
        """Float32 logits of a (N, *input_shape) batch (``codes=True``: ``x`` are input codes)."""
        x = np.asarray(x)
        want = tuple(self.graph.input_shape)
        if tuple(x.shape) == want:
            raise ConfigError(f"input shape {tuple(x.shape)} is one image: give a batch (N, {', '.join(map(str, want))}),"
                              " e.g. x[None]")
        if tuple(x.shape[1:]) != want:
            raise ConfigError(f"input shape {tuple(x.shape)}: expected a batch (N, {', '.join(map(str, want))})")
        if len(x) == 0:
            raise ConfigError("input batch is empty: nothing to run")
        if not codes and np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ConfigError(f"input has {int((~np.isfinite(x)).sum())} NaN or infinite values")
        if codes:
            qmax = self.graph.tensors[self.graph.ops[0].output].qmax
            lo, hi = x.min(), x.max()
            if lo < 0 or hi > qmax:
                raise ConfigError(f"input codes must be in 0..{qmax}, got {lo}..{hi}")
        with torch.no_grad():
            return np.concatenate([self._run(x[i: i + batch], codes).numpy() for i in range(0, len(x), batch)])

    def input_codes(self, x: np.ndarray) -> np.ndarray:
        op = self.graph.ops[0]
        return (op.act.codes(np.asarray(x, dtype=_F32)) - op.act.qmin).astype(np.int64)

    def run_pixels(self, pixels: np.ndarray, batch: int = 250) -> np.ndarray:
        """Float32 logits of uint8 images ``(N, C, H, W)`` (raw pixels, before normalisation): their input codes
        are looked up in :func:`pixel_table` (the same logits as :meth:`run` on the normalised images)."""
        return self.run(pixel_codes(self.graph, pixels), batch, codes=True)

    def _op(self, op: IntOp, env: dict[str, torch.Tensor], x: np.ndarray | None, codes: bool) -> torch.Tensor:
        T = self.graph.tensors
        if op.kind == "quant_in":
            return torch.from_numpy(np.asarray(x) if codes else self.input_codes(x)).to(torch.float32)
        if op.kind == "conv":
            res = env[op.inputs[1]] if len(op.inputs) > 1 else None
            t_res = T[op.inputs[1]] if len(op.inputs) > 1 else None
            t_in = T[op.inputs[0]]
            if op.output not in self._w:  # by output tensor: unique, where two ops may share a name
                self._w[op.output] = conv_weights(op, t_in)
            return run_conv(op, env[op.inputs[0]], t_in, res, t_res, T.get(op.output), self._w[op.output])
        if op.kind == "gap":
            return run_gap(op, env[op.inputs[0]], T[op.inputs[0]], T[op.output])
        if op.kind == "maxpool":
            return run_maxpool(op, env[op.inputs[0]])
        if op.kind == "flatten":
            v = env[op.inputs[0]]
            return v.reshape(v.shape[0], -1)
        raise ConfigError(f"integer graph: unknown op kind '{op.kind}'")  # pragma: no cover

    @staticmethod
    def _numpy(op: IntOp, v: torch.Tensor, graph: IntGraph) -> np.ndarray:
        v = v.numpy()
        return v if op.output == graph.output else v.astype(np.int64)  # codes int64, logits float32

    def run_op(self, op: IntOp, env: dict[str, np.ndarray], x: np.ndarray | None = None,
               codes: bool = False) -> np.ndarray:
        """The output codes (int64) of ``op`` from the tensors in ``env`` (NumPy; ``x``: the network
        input, read by ``quant_in``; ``codes=True``: ``x`` are already input codes)."""
        tenv = {k: torch.as_tensor(np.asarray(v)) for k, v in env.items() if k in op.inputs}
        with torch.no_grad():
            return self._numpy(op, self._op(op, tenv, x, codes), self.graph)

    def tensors(self, x: np.ndarray, codes: bool = False) -> dict[str, np.ndarray]:
        """Every tensor of the network on one batch ``x`` (name -> codes int64; the output: float32 logits)."""
        env = self._env(x, codes)
        ops = {op.output: op for op in self.graph.ops}
        return {k: self._numpy(ops[k], v, self.graph) for k, v in env.items()}

    def _env(self, x: np.ndarray, codes: bool, free: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor of the network on ``x`` (``free``: each dropped after its last reader, the output kept)."""
        ops, out = self.graph.ops, self.graph.output
        last = {t: i for i, op in enumerate(ops) for t in op.inputs}
        env: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, op in enumerate(ops):
                env[op.output] = self._op(op, env, x, codes)
                if free:
                    for t in op.inputs:
                        if last[t] == i and t != out:
                            env.pop(t, None)
        return env

    def _run(self, x: np.ndarray, codes: bool) -> torch.Tensor:
        return self._env(x, codes, free=True)[self.graph.output]


# ---------------------------------------------------------------------------------------------
# the packed file
# ---------------------------------------------------------------------------------------------
_I32 = ("bias", "mult", "shift", "res_mult", "res_shift")


def save_int_package(graph: IntGraph, out_dir: str | Path, stem: str = "model") -> dict:
    """``{stem}.safetensors`` (every number: packed weight codes, int16 weight tables, int32
    requantization constants, float32 classifier scales, the input quantizer and every tensor's
    scale / zero / bits) and ``{stem}.json`` (the human-readable manifest, also embedded in the
    safetensors header's metadata, so the .safetensors file alone runs). Returns byte counts."""
    from .package import write_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"codes": [], "i16": [], "i32": [], "f32": []}
    n = {k: 0 for k in runs}

    def put(kind: str, arr: np.ndarray) -> list[int]:
        a = np.ascontiguousarray(arr).reshape(-1)
        runs[kind].append(a)
        n[kind] += a.size
        return [n[kind] - a.size, int(a.size)]

    tnames = sorted(graph.tensors)
    tq = np.array([[graph.tensors[t].bits, graph.tensors[t].zero] for t in tnames], dtype=np.int32).reshape(-1, 2)
    t_i32 = put("i32", tq) if tnames else [0, 0]
    t_f32 = put("f32", np.array([graph.tensors[t].scale for t in tnames], dtype=_F32)) if tnames else [0, 0]
    ops = []
    for op in graph.ops:
        d = {"kind": op.kind, "name": op.name, "inputs": op.inputs, "output": op.output,
             "in_shape": list(op.in_shape), "out_shape": list(op.out_shape)}
        if op.attrs:
            d["attrs"] = op.attrs
        if op.act is not None:
            d["act"] = op.act.to_dict()
            d["act_f32"] = put("f32", np.array([op.act.lo, op.act.step, op.act.inv], dtype=_F32))
        if op.codes is not None:
            packed = pack_codes(op.codes, op.wbits)
            d["weight"] = {"quantizer": op.wquant, "bits": op.wbits, "shape": list(op.codes.shape),
                           "codes": put("codes", packed), "lut": put("i16", op.lut.astype(np.int16)),
                           "lut_shape": list(op.lut.shape)}
        arrays = {k: put("i32", getattr(op, k).astype(np.int32)) for k in _I32 if getattr(op, k) is not None}
        if op.out_scale is not None:
            arrays["out_scale"] = put("f32", op.out_scale.astype(_F32))
        if arrays:
            d["arrays"] = arrays
        ops.append(d)
    dtypes = {"codes": np.uint8, "i16": np.int16, "i32": np.int32, "f32": _F32}
    tensors = {k: (np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtypes[k])) for k, v in runs.items()}
    manifest = {"format": FORMAT, "version": VERSION,
                "note": "real = scale * (q - zero); requantize(x, mult, shift) = rint(f32(x) * f32(mult * "
                        "2^(shift-31))) in float32, ties to even; arrays: [offset, count] into the safetensors tensor "
                        "of their type",
                "input": {"name": graph.input, "shape": list(graph.input_shape)},
                "output": {"name": graph.output, "shape": list(graph.output_shape), "type": "float32 logits"},
                "tensors": {t: {**graph.tensors[t].to_dict(), "index": i} for i, t in enumerate(tnames)},
                "tensor_arrays": {"bits_zero": t_i32, "scale": t_f32},
                "meta": graph.meta, "ops": ops, "sha256": digests(tensors)}
    manifest = sealed(manifest)
    text = json.dumps(manifest, indent=1) + "\n"
    st = out / f"{stem}.safetensors"
    write_safetensors(tensors, st, metadata={"manifest": json.dumps(manifest, separators=(",", ":"))})
    (out / f"{stem}.json").write_text(text)
    numbers = sum(int(t.nbytes) for t in tensors.values())
    return {"file_bytes": st.stat().st_size, "numbers_bytes": numbers, "codes_bytes": int(tensors["codes"].nbytes),
            "manifest_bytes": len(text), "header_bytes": st.stat().st_size - numbers}


def load_int_package(path: str | Path) -> IntGraph:
    """Load an integer package: ``model.safetensors`` alone (its embedded manifest), ``model.json``
    (next to its .safetensors) or the folder holding them."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.is_file():
        raise ConfigError(f"no integer package at {p}")
    with reading(p):
        with safe_open(str(p), framework="numpy") as f:
            md = f.metadata() or {}
        if "manifest" not in md:
            raise ConfigError(f"{p}: no embedded manifest; not a {FORMAT} file")
        m = json.loads(md["manifest"])
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") not in (1, VERSION):
            raise ConfigError(f"{p}: not a {FORMAT} v{VERSION} file")
        check_manifest(p, m)
        b = load_file(str(p))
    check_digests(p, b, m)
    readable = p.with_suffix(".json")
    if readable.is_file():  # the human-readable copy: what runs is the manifest inside the .safetensors
        with reading(readable):
            same = json.loads(readable.read_text()) == m
        if not same:
            raise ConfigError(f"{readable} differs from the manifest inside {p.name}, which is what runs: the .json "
                              "was edited or is from another export (export again, or delete the .json)")
    with reading(p):
        return _int_graph_of(m, b, p)


def _int_graph_of(m: dict, b: dict, where: Path | str = "package") -> IntGraph:

    def get(kind, ref):
        return b[kind][ref[0]: ref[0] + ref[1]].copy()

    tnames = sorted(m["tensors"])
    bz = get("i32", m["tensor_arrays"]["bits_zero"]).reshape(-1, 2)
    sc = get("f32", m["tensor_arrays"]["scale"])
    tensors = {t: TensorQ(int(bz[i, 0]), int(bz[i, 1]), float(m["tensors"][t]["scale"])) for i, t in enumerate(tnames)}
    ops = []
    for d in m["ops"]:
        op = IntOp(d["kind"], d["name"], list(d["inputs"]), d["output"], tuple(d["in_shape"]), tuple(d["out_shape"]),
                   attrs=d.get("attrs", {}))
        if "act" in d:
            lo, step, inv = (float(v) for v in get("f32", d["act_f32"]))
            op.act = ActQuant(**{**d["act"], "lo": lo, "step": step, "inv": inv})
        if "weight" in d:
            w = d["weight"]
            cnt = int(np.prod(w["shape"]))
            op.lut = get("i16", w["lut"]).reshape(w["lut_shape"])
            op.codes = read_codes(get("codes", w["codes"]), w["bits"], cnt, int(op.lut.shape[-1]),
                                  f"{where}: layer {d['name']}").reshape(w["shape"]).astype(np.uint8)
            op.wbits, op.wquant = int(w["bits"]), w["quantizer"]
        for k, ref in d.get("arrays", {}).items():
            setattr(op, k, get("f32" if k == "out_scale" else "i32", ref))
        ops.append(op)
    del sc  # the float scales are documentation: the integers above are what runs
    return IntGraph(ops, tensors, m["input"]["name"], m["output"]["name"], tuple(m["input"]["shape"]),
                    tuple(m["output"]["shape"]), meta=m.get("meta", {}))


def packed_weight_bytes(graph: IntGraph) -> int:
    return sum(packed_nbytes(op.codes.size, op.wbits) for op in graph.ops if op.codes is not None)
