"""Integer reference inference in NumPy, from the packed model alone.

Every conv/linear runs one of two kernels (:func:`prepare` picks, the C code uses the same choice
and the same float32 constants, so the two agree bit for bit):

**Integer kernel** (input quantized onto a uniform grid, weight levels with an integer form;
``levels.integer_form``).
With weights ``w = off + s_w·m`` (m integer) and input activations ``a = lo_a + s_a·k`` (k integer
code; padding is a real 0 and contributes nothing), a conv output is exactly

    y = s_w s_a·A + s_w lo_a·M + off s_a·K + off lo_a·n,
    A = Σ m·k,   M = Σ m,   K = Σ k,   n = #taps   (sums over the in-bounds taps)

A, M, K, n are integers, accumulated exactly (NumPy: float64 BLAS on integers < 2^53, C: int32;
their order does not matter). Only the per-channel rescale is float32, in this fixed order, with
the BatchNorm ``g, h`` (kept after the accumulator, :mod:`lowbit.export.fold`) merged into the
coefficients (computed in float64, rounded once to float32):

    t = f32(A)·ca;  t += f32(M)·cb;  t += f32(K)·cc;  t += f32(n)·cd;  t += bias
    ca = g s_w s_a,  cb = g s_w lo_a,  cc = g off s_a,  cd = g off lo_a,  bias = h

(the M, K, n terms only when ``lo_a != 0`` resp. ``off != 0``; post-ReLU activations and
symmetric/LSQ/power-of-two weights need neither).

**Float kernel** (a full-precision layer such as the FP32 first conv and last linear, a
weight-only-quantized layer whose input is float, an input quantized onto non-uniform levels, or a
value set with no integer form): float32
MACs over the (decoded) weights, accumulated one tap at a time in the order (c_in, kh, kw), as the
C loop does, then ``y = acc·scale + shift`` (BN kept) or ``acc + bias`` (BN folded). NumPy sums
that need a fixed order are written as such loops (never ``np.sum``, which sums pairwise).

Activation codes are computed with the quantizer's own float32 operations
(:class:`lowbit.export.levels.ActQuant`), so they are those of the PyTorch fake-quantized model
whenever the layer input is the same; the reference then predicts what the PyTorch model
predicts (checked on the whole test set by :func:`lowbit.export.export_run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .graph import Graph, Op, WeightQ
from .levels import ActQuant, integer_form

_F32 = np.float32
#: float64 elements of one im2col chunk (bounds the memory of the integer kernel)
_CHUNK = 4_000_000
#: float32 elements of the float kernel's accumulator (fits a core's L2 cache)
_FLOAT_CHUNK = 100_000


@dataclass
class ConvKernel:
    """A prepared conv/linear: geometry, mode and the exact constants both NumPy and C use."""

    op: Op
    mode: str  # "int" | "float"
    C: int
    H: int
    W: int
    O: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int
    OH: int
    OW: int
    act: ActQuant | None
    # int mode
    m: np.ndarray | None = None  # (O, C*KH*KW) int64: integer weight of every tap
    lut: np.ndarray | None = None  # (R, L) int64: code -> m (per row)
    ca: np.ndarray | None = None
    cb: np.ndarray | None = None
    cc: np.ndarray | None = None
    cd: np.ndarray | None = None
    bias: np.ndarray | None = None  # int mode: always set (h)
    # float mode
    w: np.ndarray | None = None  # (O, C/G, KH, KW) float32 (decoded)
    mul: np.ndarray | None = None
    add: np.ndarray | None = None
    G: int = 1  # groups: output channel o reads input channels (o // (O/G)) * C/G ... + C/G - 1

    @property
    def F(self) -> int:
        """Taps per output (one group's input channels)."""
        return self.C // self.G * self.KH * self.KW


def _geometry(op: Op) -> dict:
    if op.attrs["layer"] == "linear":
        (f,) = op.in_shape
        (o,) = op.out_shape
        return dict(C=f, H=1, W=1, O=o, KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, OH=1, OW=1, G=1)
    c, h, w = op.in_shape
    o, oh, ow = op.out_shape
    (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    return dict(C=c, H=h, W=w, O=o, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=oh, OW=ow,
                G=int(op.attrs.get("groups", 1)))


def prepare_conv(op: Op) -> ConvKernel:
    """Choose the kernel of a conv op and compute its constants (module docstring)."""
    k = ConvKernel(op, "float", act=op.act, **_geometry(op))
    wq = op.weight if isinstance(op.weight, WeightQ) else None
    form = integer_form(wq.levels.levels64()) if wq is not None else None
    # the integer kernel is groups=1; a grouped (depthwise) conv runs the float kernel, and so does a layer whose
    # int32 accumulator could overflow (e.g. po2 5-bit weights, |m| up to 2^14, over 8-bit codes and 576 taps)
    fits = form is not None and op.act is not None and (
        k.F * max(int(np.abs(form[0]).max()), 1) * max(abs(op.act.qmin), abs(op.act.qmax), 1) < 2**31)
    if k.G == 1 and wq is not None and op.act is not None and op.act.uniform and form is not None and fits:
        m_lut, s_w, off = form
        rows = wq.row_index()
        codes = wq.codes.reshape(k.O, -1).astype(np.int64)
        k.mode, k.lut = "int", m_lut
        k.m = m_lut[rows[:, None], codes]
        a = op.act
        s_a, lo_a = float(a.step), float(a.real_lo)
        g = np.ones(k.O) if op.scale is None else op.scale.astype(np.float64)
        h = np.zeros(k.O) if op.shift is None else op.shift.astype(np.float64)
        sw, of = s_w[rows], off[rows]
        k.ca = (g * sw * s_a).astype(_F32)
        if lo_a != 0.0:
            k.cb = (g * sw * lo_a).astype(_F32)
        if np.any(of != 0.0):
            k.cc = (g * of * s_a).astype(_F32)
            if lo_a != 0.0:
                k.cd = (g * of * lo_a).astype(_F32)
        k.bias = h.astype(_F32)
        return k
    k.w = (wq.dequantize() if wq is not None else op.weight).astype(_F32).reshape(k.O, k.C // k.G, k.KH, k.KW)
    if op.scale is not None:
        k.mul, k.add = op.scale.astype(_F32), op.shift.astype(_F32)
    elif op.shift is not None:
        k.add = op.shift.astype(_F32)
    elif op.bias is not None:
        k.add = op.bias.astype(_F32)
    return k


def prepare(graph: Graph) -> list[ConvKernel | Op]:
    """One entry per op: a :class:`ConvKernel` for conv/linear ops, the op itself otherwise."""
    if not graph.input_shape:
        raise ConfigError("export: the graph has no shapes; lower the model with an example input")
    return [prepare_conv(op) if op.kind == "conv" else op for op in graph.ops]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def _pad(x: np.ndarray, ph: int, pw: int, value=0) -> np.ndarray:
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _cols(xp: np.ndarray, k: ConvKernel) -> np.ndarray:
    """im2col of a padded (N, C, Hp, Wp) array: (N, OH*OW, C*KH*KW), taps in (c, kh, kw) order."""
    win = np.lib.stride_tricks.sliding_window_view(xp, (k.KH, k.KW), axis=(2, 3))
    win = win[:, :, : k.SH * (k.OH - 1) + 1: k.SH, : k.SW * (k.OW - 1) + 1: k.SW]  # (N, C, OH, OW, KH, KW)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(xp.shape[0], k.OH * k.OW, k.F)


def conv_int(x: np.ndarray, k: ConvKernel) -> np.ndarray:
    """Integer kernel: quantize the input, exact integer sums, float32 rescale."""
    n = x.shape[0]
    codes = k.act.codes(x.reshape(n, k.C, k.H, k.W))
    mt = k.m.T.astype(np.float64)  # integers: float64 BLAS sums them exactly
    need_mk = k.cb is not None or k.cd is not None
    if need_mk or k.cc is not None:
        mask = _cols(_pad(np.ones((1, 1, k.H, k.W)), k.PH, k.PW).repeat(k.C, 1), k)[0]  # (P, F)
        msum = (mask @ mt).astype(np.int64)  # M: (P, O)
        count = mask.sum(1).astype(np.int64)  # n: (P,)
    out = np.empty((n, k.OH * k.OW, k.O), dtype=_F32)
    step = max(1, _CHUNK // max(1, k.OH * k.OW * k.F))
    for i in range(0, n, step):
        cols = _cols(_pad(codes[i: i + step].astype(np.float64), k.PH, k.PW), k)
        acc = (cols @ mt).astype(np.int64)  # A: (b, P, O)
        t = acc.astype(_F32) * k.ca
        if k.cb is not None:
            t = t + msum.astype(_F32) * k.cb
        if k.cc is not None:
            ksum = cols.sum(2).astype(np.int64)  # K: (b, P); exact
            t = t + ksum.astype(_F32)[:, :, None] * k.cc
        if k.cd is not None:
            t = t + count.astype(_F32)[:, None] * k.cd
        out[i: i + step] = t + k.bias
    return out.transpose(0, 2, 1).reshape((n,) + tuple(k.op.out_shape))


def conv_float(x: np.ndarray, k: ConvKernel) -> np.ndarray:
    """Float kernel: float32 MACs accumulated tap by tap in (c, kh, kw) order (as the C loop)."""
    n = x.shape[0]
    x = x.reshape(n, k.C, k.H, k.W).astype(_F32)
    if k.act is not None:
        x = k.act.values(k.act.codes(x))
    xp = _pad(x, k.PH, k.PW, _F32(0))
    out = np.empty((n, k.O, k.OH, k.OW), dtype=_F32)
    step = max(1, _FLOAT_CHUNK // (k.O * k.OH * k.OW))  # keep the accumulator in cache
    hs, ws = k.SH * (k.OH - 1) + 1, k.SW * (k.OW - 1) + 1
    for b in range(0, n, step):
        xb = xp[b: b + step]
        # accumulator laid out (O, images*OH*OW) so that every tap is one long contiguous op
        acc = np.zeros((k.O, len(xb) * k.OH * k.OW), dtype=_F32)
        tmp = np.empty_like(acc)
        # groups: output o (group o // og) reads input channels c0 + c, c0 = (o // og) * cg, c < cg
        cg, og = k.C // k.G, k.O // k.G
        for c in range(cg):
            for i in range(k.KH):
                for j in range(k.KW):
                    patch = np.ascontiguousarray(xb[:, c:: cg, i: i + hs: k.SH, j: j + ws: k.SW]
                                                 .transpose(1, 0, 2, 3)).reshape(k.G, 1, -1)  # (G, 1, imgs*P)
                    np.multiply(k.w[:, c, i, j].reshape(k.G, og, 1), patch, out=tmp.reshape(k.G, og, -1))
                    np.add(acc, tmp, out=acc)
        if k.mul is not None:
            acc = acc * k.mul[:, None]
        if k.add is not None:
            acc = acc + k.add[:, None]
        out[b: b + step] = acc.reshape(k.O, len(xb), k.OH, k.OW).transpose(1, 0, 2, 3)
    return out.reshape((n,) + tuple(k.op.out_shape))


def _channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def gap(x: np.ndarray) -> np.ndarray:
    """Global average pooling: a running float32 sum over positions (row-major), then / (H*W)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    s = np.zeros((n, c), dtype=_F32)
    for p in range(h * w):
        s = s + flat[:, :, p]
    return (s / _F32(h * w)).reshape(n, c, 1, 1)


def maxpool(x: np.ndarray, op: Op) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    oc, oh, ow = op.out_shape
    xp = _pad(x, ph, pw, _F32(-np.inf))
    out = np.full((x.shape[0], oc, oh, ow), -np.inf, dtype=_F32)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, xp[:, :, i: i + sh * (oh - 1) + 1: sh, j: j + sw * (ow - 1) + 1: sw])
    return out


def run_op(k: ConvKernel | Op, xs: list[np.ndarray]) -> np.ndarray:
    if isinstance(k, ConvKernel):
        return conv_int(xs[0], k) if k.mode == "int" else conv_float(xs[0], k)
    x = xs[0]
    if k.kind == "relu":
        return np.where(x > 0, x, _F32(0))
    if k.kind == "add":
        return x + xs[1]
    if k.kind == "affine":
        return x * _channel(k.scale, x) + _channel(k.shift, x)
    if k.kind == "gap":
        return gap(x)
    if k.kind == "maxpool":
        return maxpool(x, k)
    if k.kind == "flatten":
        return x.reshape(x.shape[0], -1)
    raise ConfigError(f"export: unknown op kind '{k.kind}'")  # pragma: no cover


class IntegerReference:
    """Runs a packed model (a :class:`Graph`, e.g. from :func:`lowbit.export.load_package`)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.kernels = prepare(graph)
        last: dict[str, int] = {}
        for i, op in enumerate(graph.ops):
            for t in op.inputs:
                last[t] = i
        self._last = last

    def modes(self) -> dict[str, str]:
        """Kernel of every conv/linear: "int" (integer accumulation) or "float"."""
        return {k.op.name: k.mode for k in self.kernels if isinstance(k, ConvKernel)}

    def run(self, x: np.ndarray, batch: int = 250) -> np.ndarray:
        """Logits (float32) of a (N, *input_shape) float32 batch, processed ``batch`` at a time."""
        x = np.asarray(x, dtype=_F32)
        if tuple(x.shape[1:]) != tuple(self.graph.input_shape):
            raise ConfigError(f"input shape {tuple(x.shape[1:])} != model input {self.graph.input_shape}")
        if np.isnan(x).any():  # an activation code of NaN is undefined (int32 cast); as the integer reference does
            raise ConfigError(f"input has {int(np.isnan(x).sum())} NaN values")
        return np.concatenate([self._run(x[i: i + batch]) for i in range(0, len(x), batch)])

    def _run(self, x: np.ndarray) -> np.ndarray:
        env = {self.graph.input: x}
        for i, (op, k) in enumerate(zip(self.graph.ops, self.kernels)):
            env[op.output] = run_op(k, [env[t] for t in op.inputs])
            for t in op.inputs:
                if self._last.get(t) == i and t != self.graph.output:
                    env.pop(t, None)
        return env[self.graph.output]
