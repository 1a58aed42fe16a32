"""C99 code for a microcontroller: ``model.h``, ``model.c`` (weights + kernels + network) and a
test ``main.c``.

The generated code is self-contained (``stdint.h``, ``string.h``, ``math.h`` for ``rintf``; no
``malloc``), runs one image per call, ``void lowbit_predict(const float *input, float *logits)``,
and computes exactly what :class:`lowbit.export.numpy_ref.IntegerReference` computes, bit for bit:
both come from :func:`lowbit.export.numpy_ref.prepare` (same kernel choice, same float32
constants, same order of every float operation).

* Weights are ``static const`` arrays (flash): quantized layers as their packed codes (the bit
  stream of :mod:`lowbit.export.pack`, decoded one output channel at a time into a small scratch
  row), a code -> integer table (int16) and the per-channel float32 rescale; full-precision layers
  as float32. Float constants are printed as C99 hex literals, so they are exact.
* Kernels: activation quantization to uint8 codes, the integer conv/linear (int32 MACs on codes,
  then the per-channel float32 rescale with BatchNorm merged in), the float conv/linear (for the
  FP32 first/last layers and layers with a float input), ReLU, residual add, max-pool and global
  average pooling. Linear layers run as 1x1 convs on a (F, 1, 1) input.
* RAM: one static float32 arena whose tensors are placed at offsets by a liveness plan
  (:mod:`lowbit.export.memplan`; ReLU/add/affine run in place when their input dies), plus the uint8 code buffer of one
  layer input and one decoded weight row. ``LOWBIT_RAM_BYTES`` is their sum, ``LOWBIT_FLASH_BYTES``
  the size of all constant arrays.

Compile with C99 and without floating-point contraction (``gcc -std=c99 -O2 -ffp-contract=off``;
no ``-ffast-math``), so every ``a*b + c`` is rounded twice as in NumPy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .graph import Graph, Op, WeightQ
from .memplan import place
from .numpy_ref import ConvKernel, prepare
from .pack import pack_codes

CFLAGS = ["-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra"]


#: the default prefix of the generated C's public names (``lowbit_predict``, ``LOWBIT_IN_SIZE``, ...)
C_PREFIX = "lowbit"


def check_c_prefix(prefix: str) -> str:
    """``prefix`` if it can name a model's C API (a C identifier that does not take the runtime's ``lb_``), else a
    one-line ConfigError."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,31}", prefix) or \
            prefix.lower() == "lb" or prefix.lower().startswith("lb_"):
        raise ConfigError(f"C prefix {prefix!r}: give a C identifier of at most 32 letters, digits and _ (not starting "
                          "with a digit or lb_, the runtime's own), e.g. kws")
    return prefix


def with_c_prefix(text: str, prefix: str) -> str:
    """Generated C with ``prefix`` in its public names instead of ``lowbit``: ``lowbit_predict*`` becomes
    ``PREFIX_predict*`` and the macros ``LOWBIT_*`` (the include guard too) ``UPPERCASE_PREFIX_*``, so that two
    exported models link into one firmware. The runtime's ``lb_*`` functions and ``LOWBIT_RT_*`` stay: one copy of
    the runtime serves both (everything else in model.c is ``static``)."""
    if prefix == C_PREFIX:
        return text
    text = re.sub(r"\blowbit_predict", f"{prefix}_predict", text)
    return re.sub(r"\bLOWBIT_(?!RT_)", f"{prefix.upper()}_", text)


def extern_c(decls: str) -> str:
    """``decls`` wrapped in ``extern "C"`` for a C++ includer."""
    return f'#ifdef __cplusplus\nextern "C" {{\n#endif\n\n{decls}\n#ifdef __cplusplus\n}}\n#endif\n'


def host_cflags() -> list[str]:
    """The flags of the host builds that check an export: :data:`CFLAGS` and the environment's ``LOWBIT_CFLAGS``
    (e.g. ``-fsanitize=address,undefined``, as the tests build some of them)."""
    return [*CFLAGS, *shlex.split(os.environ.get("LOWBIT_CFLAGS", ""))]


@dataclass
class CExport:
    """What :func:`write_c` wrote and what the code needs."""

    dir: Path
    files: list[Path]
    flash_bytes: int  # all constant arrays
    ram_bytes: int  # arena + code buffer + weight row scratch
    arena_bytes: int
    scratch_bytes: int
    largest_activation: int  # elements of the largest tensor

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "files": [p.name for p in self.files], "flash_bytes": self.flash_bytes,
                "ram_bytes": self.ram_bytes, "arena_bytes": self.arena_bytes, "scratch_bytes": self.scratch_bytes,
                "largest_activation": self.largest_activation}


# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------
def _cfloat(v: float) -> str:
    v = float(np.float32(v))
    if not np.isfinite(v):
        raise ConfigError(f"export: non-finite constant {v} cannot be written to C")
    return float.hex(v) + "f"


class _Consts:
    def __init__(self):
        self.lines: list[str] = []
        self.bytes = 0

    def _emit(self, ctype: str, name: str, items: list[str], nbytes: int, per_line: int) -> str:
        if not items:
            items = ["0"]
        body = ",\n".join("  " + ", ".join(items[i: i + per_line]) for i in range(0, len(items), per_line))
        self.lines.append(f"static const {ctype} {name}[{len(items)}] = {{\n{body}\n}};")
        self.bytes += nbytes
        return name

    def f32(self, name: str, a) -> str:
        a = np.asarray(a, dtype=np.float32).reshape(-1)
        return self._emit("float", name, [_cfloat(v) for v in a], 4 * a.size, 6)

    def u8(self, name: str, a) -> str:
        a = np.asarray(a, dtype=np.uint8).reshape(-1)
        return self._emit("uint8_t", name, [f"0x{v:02x}" for v in a], a.size, 16)

    def u32(self, name: str, a) -> str:
        a = np.asarray(a, dtype=np.uint32).reshape(-1)
        return self._emit("uint32_t", name, [f"0x{v:08x}u" for v in a], 4 * a.size, 8)

    def i16(self, name: str, a) -> str:
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        if a.size and (a.min() < -32768 or a.max() > 32767):
            raise ConfigError(f"export: integer weight table '{name}' does not fit int16")
        return self._emit("int16_t", name, [str(int(v)) for v in a], 2 * a.size, 16)


def _ident(name: str) -> str:
    """A C identifier for a layer name (a top-level ``nn.Sequential`` names its layers ``0``, ``1``, ...)."""
    s = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"m_{s}" if not s or s[0].isdigit() else s


# ---------------------------------------------------------------------------------------------
# memory plan
# ---------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def plan_memory(graph: Graph) -> tuple[dict[str, int], int]:
    """Float offset of every tensor in one arena, and the arena size (floats).

    A tensor's buffer lives from the op that writes it to its last reader (the graph output to the end);
    ``flatten`` aliases its input; relu/add/affine write over their first input when that input dies at them.
    The buffers are placed by :func:`lowbit.export.memplan.place` (buffers whose lives overlap share no float).
    """
    last: dict[str, int] = {graph.output: len(graph.ops)}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            last[t] = max(last.get(t, -1), i)
    buf: dict[str, int] = {graph.input: 0}  # tensor -> buffer id
    lives: dict[int, list[int]] = {0: [-1, last.get(graph.input, -1)]}  # buffer id -> [first op, last op]
    sizes: dict[int, int] = {0: _numel(graph.input_shape)}
    for i, op in enumerate(graph.ops):
        size = _numel(op.out_shape)
        src = buf[op.inputs[0]]
        if op.kind == "flatten" or (op.kind in ("relu", "add", "affine") and lives[src][1] == i
                                    and sizes[src] == size and op.inputs[0] != graph.input):
            buf[op.output] = src
            lives[src][1] = max(i, lives[src][1] if op.kind == "flatten" else -1, last.get(op.output, -1))
        else:
            buf[op.output] = len(sizes)
            lives[len(sizes)] = [i, max(i, last.get(op.output, -1))]
            sizes[len(sizes)] = size
    offsets, arena = place({b: (lo, hi) for b, (lo, hi) in lives.items()}, sizes)
    return {t: offsets[b] for t, b in buf.items()}, arena


# ---------------------------------------------------------------------------------------------
# the kernels (C99), written once
# ---------------------------------------------------------------------------------------------
KERNELS = r"""
/* code idx of a packed LSB-first bit stream (bits <= 8: at most two bytes) */
static uint32_t lb_code(const uint8_t *p, uint32_t idx, uint32_t bits)
{
    uint32_t bit = idx * bits, byte = bit >> 3, sh = bit & 7u;
    uint32_t v = p[byte];
    if (sh + bits > 8u) v |= (uint32_t)p[byte + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1u);
}

/* activation quantization; codes are stored as k - qmin (0..2^bits-1)
   rule 0 (clip_div): k = min(rint((max(x, lo) - lo) / step), qmax)
   rule 1 (mul_clip): k = rint(min(max(x * inv, qmin), qmax))
   rule 2 (nearest):  k = qmin + #{j : x >= th[j]}, th the qmax - qmin sorted midpoints */
static void lb_quantize(const float *x, uint8_t *q, int32_t n, int rule, float lo, float step, float inv,
                        int32_t qmin, int32_t qmax, const float *th)
{
    int32_t i, j;
    for (i = 0; i < n; i++) {
        float v = x[i];
        if (v != v) { /* NaN: code 0, as onnxruntime's QuantizeLinear gives (a float-to-int cast of NaN is undefined) */
            q[i] = 0;
            continue;
        }
        if (rule == 2) {
            for (j = 0; j < qmax - qmin && v >= th[j]; j++) {}
            q[i] = (uint8_t)j;
            continue;
        }
        if (rule == 0) {
            if (v < lo) v = lo;
            if (lo != 0.0f) v = v - lo;
            v = rintf(v / step);
            if (v > (float)qmax) v = (float)qmax;
        } else {
            v = v * inv;
            if (v < (float)qmin) v = (float)qmin;
            if (v > (float)qmax) v = (float)qmax;
            v = rintf(v);
        }
        q[i] = (uint8_t)((int32_t)v - qmin);
    }
}

/* integer conv: A = sum m*k, M = sum m, K = sum k, n = taps (int32, over the in-bounds taps; integer
   sums are exact, so their order is free), then
   y = f(A)*ca + f(M)*cb + f(K)*cc + f(n)*cd + bias (float32, in this order; NULL terms skipped) */
static void lb_conv_int(const lb_geom *g, const uint8_t *xq, int32_t zero, const uint8_t *wc, uint32_t bits,
                        const int16_t *lut, int32_t lut_rows, int32_t L, const float *ca, const float *cb,
                        const float *cc, const float *cd, const float *bias, float *y, int16_t *wrow)
{
    const int32_t F = g->C * g->KH * g->KW, HW = g->H * g->W, KK = g->KH * g->KW;
    int32_t o, j, oy, ox, c, kh, kw;
    for (o = 0; o < g->O; o++) {
        const int16_t *lt = lut + (lut_rows > 1 ? o * L : 0);
        for (j = 0; j < F; j++) wrow[j] = lt[lb_code(wc, (uint32_t)(o * F + j), bits)];
        for (oy = 0; oy < g->OH; oy++) {
            const int32_t y0 = oy * g->SH - g->PH;
            const int32_t kh0 = y0 < 0 ? -y0 : 0, kh1 = g->H - y0 < g->KH ? g->H - y0 : g->KH;
            for (ox = 0; ox < g->OW; ox++) {
                const int32_t x0 = ox * g->SW - g->PW;
                const int32_t kw0 = x0 < 0 ? -x0 : 0, kw1 = g->W - x0 < g->KW ? g->W - x0 : g->KW;
                int32_t acc = 0, ks = 0, ms = 0, cnt = g->C * (kh1 - kh0) * (kw1 - kw0);
                float t;
                for (c = 0; c < g->C; c++) {
                    for (kh = kh0; kh < kh1; kh++) {
                        const uint8_t *xr = xq + c * HW + (y0 + kh) * g->W;
                        const int16_t *wr = wrow + c * KK + kh * g->KW;
                        for (kw = kw0; kw < kw1; kw++) acc += (int32_t)wr[kw] * ((int32_t)xr[x0 + kw] - zero);
                        if (cb || cc) {
                            for (kw = kw0; kw < kw1; kw++) {
                                ks += (int32_t)xr[x0 + kw] - zero;
                                ms += wr[kw];
                            }
                        }
                    }
                }
                t = (float)acc * ca[o];
                if (cb) t = t + (float)ms * cb[o];
                if (cc) t = t + (float)ks * cc[o];
                if (cd) t = t + (float)cnt * cd[o];
                t = t + bias[o];
                y[(o * g->OH + oy) * g->OW + ox] = t;
            }
        }
    }
}

/* float conv: acc += w * x one tap at a time in (c, kh, kw) order (padding taps add w * 0),
   then acc * mul + add. Groups: output o reads the C/G input channels of its group (o / (O/G)).
   Input: float x, or codes xq dequantized as k*step (+ lo), or through the level table a_tab when
   one is given. Weights: float w, or packed codes decoded through the level table lev. */
static void lb_conv_float(const lb_geom *g, const float *x, const uint8_t *xq, int32_t zero, float a_lo,
                          float a_step, const float *a_tab, const float *w, const uint8_t *wc, uint32_t bits, const float *lev,
                          int32_t lev_rows, int32_t L, const float *mul, const float *add, float *y, float *wrow)
{
    const int32_t Cg = g->C / g->G, Og = g->O / g->G, F = Cg * g->KH * g->KW;
    int32_t o, j, oy, ox, c, kh, kw;
    const float *x0p = x;
    const uint8_t *xq0 = xq;
    for (o = 0; o < g->O; o++) {
        const float *wr;
        if (x0p) x = x0p + (o / Og) * Cg * g->H * g->W;
        if (xq0) xq = xq0 + (o / Og) * Cg * g->H * g->W;
        if (w) {
            wr = w + o * F;
        } else {
            const float *lt = lev + (lev_rows > 1 ? o * L : 0);
            for (j = 0; j < F; j++) wrow[j] = lt[lb_code(wc, (uint32_t)(o * F + j), bits)];
            wr = wrow;
        }
        for (oy = 0; oy < g->OH; oy++) {
            const int32_t y0 = oy * g->SH - g->PH;
            for (ox = 0; ox < g->OW; ox++) {
                const int32_t x0 = ox * g->SW - g->PW;
                const int inside = y0 >= 0 && y0 + g->KH <= g->H && x0 >= 0 && x0 + g->KW <= g->W;
                float acc = 0.0f;
                if (inside && !xq) {  /* the common case, same operations without the checks */
                    const float *wk = wr;
                    for (c = 0; c < Cg; c++)
                        for (kh = 0; kh < g->KH; kh++) {
                            const float *xr = x + (c * g->H + y0 + kh) * g->W + x0;
                            for (kw = 0; kw < g->KW; kw++) acc = acc + *wk++ * xr[kw];
                        }
                } else {
                    for (c = 0; c < Cg; c++) {
                        for (kh = 0; kh < g->KH; kh++) {
                            int32_t iy = y0 + kh;
                            for (kw = 0; kw < g->KW; kw++) {
                                int32_t ix = x0 + kw;
                                float v = 0.0f;
                                if (iy >= 0 && iy < g->H && ix >= 0 && ix < g->W) {
                                    int32_t at = (c * g->H + iy) * g->W + ix;
                                    if (xq && a_tab) {
                                        v = a_tab[xq[at]];
                                    } else if (xq) {
                                        v = (float)((int32_t)xq[at] - zero) * a_step;
                                        if (a_lo != 0.0f) v = v + a_lo;
                                    } else {
                                        v = x[at];
                                    }
                                }
                                acc = acc + wr[(c * g->KH + kh) * g->KW + kw] * v;
                            }
                        }
                    }
                }
                if (mul) acc = acc * mul[o];
                if (add) acc = acc + add[o];
                y[(o * g->OH + oy) * g->OW + ox] = acc;
            }
        }
    }
}

static void lb_relu(const float *x, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

static void lb_add(const float *a, const float *b, float *y, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) y[i] = a[i] + b[i];
}

static void lb_affine(const float *x, const float *s, const float *h, float *y, int32_t C, int32_t HW)
{
    int32_t c, p;
    for (c = 0; c < C; c++)
        for (p = 0; p < HW; p++) y[c * HW + p] = x[c * HW + p] * s[c] + h[c];
}

static void lb_gap(const float *x, float *y, int32_t C, int32_t HW)
{
    int32_t c, p;
    for (c = 0; c < C; c++) {
        float s = 0.0f;
        for (p = 0; p < HW; p++) s = s + x[c * HW + p];
        y[c] = s / (float)HW;
    }
}

static void lb_maxpool(const lb_geom *g, const float *x, float *y)
{
    int32_t c, oy, ox, kh, kw;
    for (c = 0; c < g->C; c++)
        for (oy = 0; oy < g->OH; oy++)
            for (ox = 0; ox < g->OW; ox++) {
                float m = -INFINITY;
                for (kh = 0; kh < g->KH; kh++) {
                    int32_t iy = oy * g->SH - g->PH + kh;
                    if (iy < 0 || iy >= g->H) continue;
                    for (kw = 0; kw < g->KW; kw++) {
                        int32_t ix = ox * g->SW - g->PW + kw;
                        float v;
                        if (ix < 0 || ix >= g->W) continue;
                        v = x[(c * g->H + iy) * g->W + ix];
                        if (v > m) m = v;
                    }
                }
                y[(c * g->OH + oy) * g->OW + ox] = m;
            }
}
"""


def _geom(k: ConvKernel | None = None, **kw) -> str:
    fields = ("C", "H", "W", "O", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW", "G")
    vals = {f: getattr(k, f) for f in fields} if k is not None else {"G": 1, **kw}
    return "{" + ", ".join(str(int(vals[f])) for f in fields) + "}"


def quantize_code(k: ConvKernel, cs: _Consts, x: str) -> list[str]:
    """The ``lb_quantize`` call of a conv layer's quantized input (codes into ``lb_codes``)."""
    act = k.act
    if act is None:
        return []
    rule = ("clip_div", "mul_clip", "nearest").index(act.rule)
    th = cs.f32(f"{_ident(k.op.name)}_act_th", act.thresholds) if act.rule == "nearest" else "NULL"
    return [f"    lb_quantize({x}, lb_codes, {k.C * k.H * k.W}, {rule}, {_cfloat(act.lo)}, "
            f"{_cfloat(act.step)}, {_cfloat(act.inv)}, {act.qmin}, {act.qmax}, {th});"]


def _conv_code(k: ConvKernel, cs: _Consts, a: dict[str, int], geoms: list[str]) -> list[str]:
    op = k.op
    n = _ident(op.name)
    gname = f"g_{n}"
    geoms.append(f"static const lb_geom {gname} = {_geom(k)};")
    x, y = f"A + {a[op.inputs[0]]}", f"A + {a[op.output]}"
    act = k.act
    lines = quantize_code(k, cs, x)
    wq = op.weight if isinstance(op.weight, WeightQ) else None
    if k.mode == "int":
        codes = cs.u8(f"{n}_codes", pack_codes(wq.codes, wq.bits))
        lut = k.lut if np.any(k.lut != k.lut[:1]) else k.lut[:1]
        lutn = cs.i16(f"{n}_lut", lut)
        coef = {c: (cs.f32(f"{n}_{c}", getattr(k, c)) if getattr(k, c) is not None else "NULL")
                for c in ("ca", "cb", "cc", "cd", "bias")}
        lines.append(f"    lb_conv_int(&{gname}, lb_codes, {act.zero}, {codes}, {wq.bits}, {lutn}, {lut.shape[0]}, "
                     f"{lut.shape[1]}, {coef['ca']}, {coef['cb']}, {coef['cc']}, {coef['cd']}, {coef['bias']}, "
                     f"{y}, lb_wrow_i);")
        return lines
    if wq is not None:
        codes = cs.u8(f"{n}_codes", pack_codes(wq.codes, wq.bits))
        lev = cs.f32(f"{n}_levels", wq.levels.levels32())
        wargs = f"NULL, {codes}, {wq.bits}, {lev}, {wq.levels.rows}, {wq.levels.n}"
    else:
        wargs = f"{cs.f32(n + '_w', k.w)}, NULL, 0, NULL, 0, 0"
    mul = cs.f32(f"{n}_mul", k.mul) if k.mul is not None else "NULL"
    add = cs.f32(f"{n}_add", k.add) if k.add is not None else "NULL"
    if act is not None:
        tab = "NULL" if act.uniform else cs.f32(f"{n}_act_levels", np.asarray(act.table, np.float32))
        xin = f"NULL, lb_codes, {act.zero}, {_cfloat(act.real_lo)}, {_cfloat(act.step)}, {tab}"
    else:
        xin = f"{x}, NULL, 0, 0.0f, 0.0f, NULL"
    lines.append(f"    lb_conv_float(&{gname}, {xin}, {wargs}, {mul}, {add}, {y}, lb_wrow_f);")
    return lines


def write_c(graph: Graph, out_dir: str | Path, samples: np.ndarray | None = None,
            expected: np.ndarray | None = None, conv_hook=None, prefix: str = C_PREFIX) -> CExport:
    """Write ``model.h``, ``model.c`` and ``main.c`` for ``graph`` into ``out_dir`` (public names with ``prefix``:
    :func:`with_c_prefix`).

    ``samples`` (a few inputs) and ``expected`` (their logits from the NumPy reference) are
    embedded in ``main.c``: run without arguments it checks them bit for bit on the device.
    ``conv_hook`` (e.g. :class:`lowbit.export.mcu.packed.PackedKernels`) may emit a conv layer's code
    itself (``hook(kernel, consts, offsets, geoms, ident)`` returns lines, or None for the default);
    its ``includes``, ``decls()``, ``ram_bytes`` and ``sources`` (copied next to model.c) are added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kernels = prepare(graph)
    offsets, arena = plan_memory(graph)
    cs = _Consts()
    geoms: list[str] = []
    body: list[str] = []
    max_codes = max_row_i = max_row_f = 0
    for k in kernels:
        if isinstance(k, ConvKernel):
            op = k.op
            body.append(f"    /* {op.name}: {op.attrs['layer']} {k.mode} {k.C}x{k.H}x{k.W} -> {k.O}x{k.OH}x{k.OW}"
                        f"{', BN ' + op.bn if op.bn else ''} */")
            hooked = conv_hook(k, cs, offsets, geoms, _ident) if conv_hook is not None else None
            body += hooked or _conv_code(k, cs, offsets, geoms)
            if k.act is not None:
                max_codes = max(max_codes, k.C * k.H * k.W)
            if hooked:
                continue
            if k.mode == "int":
                max_row_i = max(max_row_i, k.F)
            elif isinstance(op.weight, WeightQ):
                max_row_f = max(max_row_f, k.F)
            continue
        op: Op = k
        x, y = f"A + {offsets[op.inputs[0]]}", f"A + {offsets[op.output]}"
        n = _numel(op.out_shape)
        body.append(f"    /* {op.name}: {op.kind} */")
        if op.kind == "relu":
            body.append(f"    lb_relu({x}, {y}, {n});")
        elif op.kind == "add":
            body.append(f"    lb_add({x}, A + {offsets[op.inputs[1]]}, {y}, {n});")
        elif op.kind == "affine":
            c = op.in_shape[0]
            s, h = cs.f32(_ident(op.name) + "_scale", op.scale), cs.f32(_ident(op.name) + "_shift", op.shift)
            body.append(f"    lb_affine({x}, {s}, {h}, {y}, {c}, {_numel(op.in_shape) // c});")
        elif op.kind == "gap":
            c, h, w = op.in_shape
            body.append(f"    lb_gap({x}, {y}, {c}, {h * w});")
        elif op.kind == "maxpool":
            c, h, w = op.in_shape
            _, oh, ow = op.out_shape
            (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
            gname = f"g_{_ident(op.name)}"
            geoms.append(f"static const lb_geom {gname} = "
                         f"{_geom(C=c, H=h, W=w, O=c, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, OH=oh, OW=ow)};")
            body.append(f"    lb_maxpool(&{gname}, {x}, {y});")
        elif op.kind == "flatten":
            body.append("    /* a reshape: same buffer */")
    n_in, n_out = _numel(graph.input_shape), _numel(graph.output_shape)
    scratch = max(max_codes, 1) + 2 * max(max_row_i, 1) + 4 * max(max_row_f, 1)
    if conv_hook is not None:
        scratch += conv_hook.ram_bytes
    ram = 4 * arena + scratch
    flash = cs.bytes
    largest = max([_numel(graph.input_shape)] + [_numel(op.out_shape) for op in graph.ops])
    header = f"""/* Generated by lowbit.export (C99). Integer reference of a quantized network.
   Build: gcc {' '.join(CFLAGS)} model.c main.c -lm
   Flash (constant arrays): {flash} bytes; RAM (arena + scratch): {ram} bytes. */
#ifndef LOWBIT_MODEL_H
#define LOWBIT_MODEL_H

#define LOWBIT_IN_SIZE {n_in}    /* input {'x'.join(map(str, graph.input_shape))}, float32, normalised */
#define LOWBIT_OUT_SIZE {n_out}  /* logits */
#define LOWBIT_FLASH_BYTES {flash}
#define LOWBIT_RAM_BYTES {ram}

""" + extern_c("""/* logits of one image (C, H, W order); not reentrant (static buffers) */
void lowbit_predict(const float *input, float *logits);
""") + """
#endif
"""
    src = "\n".join([
        "/* Generated by lowbit.export: weights, kernels and network. See model.h. */",
        "#include <math.h>", "#include <stdint.h>", "#include <stddef.h>", "#include <string.h>",
        '#include "model.h"', *(conv_hook.includes if conv_hook is not None else []), "",
        *cs.lines, "",
        "typedef struct {  /* conv / pool geometry: in C x H x W, out O x OH x OW, kernel, stride, padding, groups */",
        "    int32_t C, H, W, O, KH, KW, SH, SW, PH, PW, OH, OW, G;",
        "} lb_geom;", "",
        *geoms, "",
        f"static float lb_arena[{arena}];            /* activations ({4 * arena} bytes) */",
        f"static uint8_t lb_codes[{max(max_codes, 1)}];   /* quantized layer input */",
        f"static int16_t lb_wrow_i[{max(max_row_i, 1)}];  /* one decoded integer weight row */",
        f"static float lb_wrow_f[{max(max_row_f, 1)}];    /* one decoded float weight row */",
        *(conv_hook.decls() if conv_hook is not None else []),
        KERNELS,
        "void lowbit_predict(const float *input, float *logits)",
        "{",
        "    float *A = lb_arena;",
        "    (void)lb_wrow_i; (void)lb_wrow_f; (void)lb_codes;",
        f"    memcpy(A + {offsets[graph.input]}, input, sizeof(float) * LOWBIT_IN_SIZE);",
        *body,
        f"    memcpy(logits, A + {offsets[graph.output]}, sizeof(float) * LOWBIT_OUT_SIZE);",
        "}", "",
    ])
    check_c_prefix(prefix)
    (out / "model.h").write_text(with_c_prefix(header, prefix))
    (out / "model.c").write_text(with_c_prefix(src, prefix))
    (out / "main.c").write_text(with_c_prefix(_main_c(samples, expected, n_in, n_out), prefix))
    files = [out / "model.h", out / "model.c", out / "main.c"]
    for f in (conv_hook.sources if conv_hook is not None else ()):
        shutil.copyfile(f, out / f.name)
        files.append(out / f.name)
    return CExport(out, files, flash, ram, 4 * arena, scratch, largest)


def _main_c(samples, expected, n_in: int, n_out: int, pixels: bool = False) -> str:
    s = np.zeros((0, n_in), np.float32) if samples is None else np.asarray(samples, np.float32).reshape(-1, n_in)
    e = np.zeros((0, n_out), np.float32) if expected is None else np.asarray(expected, np.float32).reshape(-1, n_out)
    if len(s) != len(e):
        raise ConfigError("export: samples and expected logits differ in number")
    cs = _Consts()
    cs.f32("samples", s)
    cs.f32("expected", e)
    return "\n".join([
        "/* Test main. No arguments: run the embedded samples and compare the logits bit for bit",
        "   with the NumPy integer reference (exit status 0 if all equal).",
        "   `main INPUT.f32 N OUTPUT.f32`: logits of N float32 images read from INPUT."
        + ("\n   `main --pixels[-hwc] INPUT.u8 N OUTPUT.f32`: the same from raw uint8 pixels "
           "(lowbit_predict_pixels[_hwc])." if pixels else "") + " */",
        "#include <stdio.h>", "#include <stdlib.h>", "#include <string.h>", '#include "model.h"', "",
        f"#define N_SAMPLES {len(s)}", *cs.lines, "",
        "/* N: a whole number above 0, else -1 */",
        "static long count_arg(const char *s)",
        "{",
        "    char *end;",
        "    long n = strtol(s, &end, 10);",
        "    return *s && !*end && n > 0 ? n : -1;",
        "}",
        "",
        "/* open INPUT, which must hold exactly n items of `item` bytes, and OUTPUT; else a message, NULL */",
        "static FILE *open_io(const char *in, long n, long item, const char *out, FILE **fo)",
        "{",
        '    FILE *fi = fopen(in, "rb");',
        "    long size;",
        '    if (n < 0) { fprintf(stderr, "N must be a whole number above 0\\n"); return NULL; }',
        '    if (!fi) { fprintf(stderr, "cannot open %s\\n", in); return NULL; }',
        "    fseek(fi, 0, SEEK_END);",
        "    size = ftell(fi);",
        "    rewind(fi);",
        "    if (size != n * item) {",
        '        fprintf(stderr, "%s holds %ld bytes, not %ld inputs of %ld bytes (wrong N or image size?)\\n", in, size, n, item);',
        "        fclose(fi);",
        "        return NULL;",
        "    }",
        '    *fo = fopen(out, "wb");',
        '    if (!*fo) { fprintf(stderr, "cannot open %s\\n", out); fclose(fi); return NULL; }',
        "    return fi;",
        "}",
        "",
        "int main(int argc, char **argv)",
        "{",
        "    static float x[LOWBIT_IN_SIZE], y[LOWBIT_OUT_SIZE];",
        "    if (argc == 1) {",
        "        int i, bad = 0;",
        "        for (i = 0; i < N_SAMPLES; i++) {",
        "            lowbit_predict(samples + i * LOWBIT_IN_SIZE, y);",
        "            if (memcmp(y, expected + i * LOWBIT_OUT_SIZE, sizeof y) != 0) bad++;",
        "        }",
        '        printf("%d/%d samples bit-exact\\n", N_SAMPLES - bad, N_SAMPLES);',
        "        return bad != 0;",
        "    }",
        '    if (argc == 4 && strncmp(argv[1], "--", 2) != 0) {',
        "        long i, n = count_arg(argv[2]);",
        "        FILE *fo, *fi = open_io(argv[1], n, (long)sizeof x, argv[3], &fo);",
        "        if (!fi) return 2;",
        "        for (i = 0; i < n; i++) {",
        '            if (fread(x, sizeof(float), LOWBIT_IN_SIZE, fi) != LOWBIT_IN_SIZE) { fprintf(stderr, "short input\\n"); return 2; }',
        "            lowbit_predict(x, y);",
        "            fwrite(y, sizeof(float), LOWBIT_OUT_SIZE, fo);",
        "        }",
        "        fclose(fi);",
        "        fclose(fo);",
        "        return 0;",
        "    }",
        *([
            '    if (argc == 5 && (strcmp(argv[1], "--pixels") == 0 || strcmp(argv[1], "--pixels-hwc") == 0)) {',
            "        static uint8_t p[LOWBIT_IN_SIZE];",
            "        long i, n = count_arg(argv[3]);",
            '        int hwc = strcmp(argv[1], "--pixels-hwc") == 0;',
            "        FILE *fo, *fi = open_io(argv[2], n, (long)sizeof p, argv[4], &fo);",
            "        if (!fi) return 2;",
            "        for (i = 0; i < n; i++) {",
            '            if (fread(p, 1, LOWBIT_IN_SIZE, fi) != LOWBIT_IN_SIZE) { fprintf(stderr, "short input\\n"); return 2; }',
            "            if (hwc) lowbit_predict_pixels_hwc(p, y); else lowbit_predict_pixels(p, y);",
            "            fwrite(y, sizeof(float), LOWBIT_OUT_SIZE, fo);",
            "        }",
            "        fclose(fi);",
            "        fclose(fo);",
            "        return 0;",
            "    }"] if pixels else []),
        '    fprintf(stderr, "usage: %s [INPUT.f32 N OUTPUT.f32]'
        + (' | [--pixels|--pixels-hwc INPUT.u8 N OUTPUT.f32]' if pixels else '') + '\\n", argv[0]);',
        "    return 2;",
        "}", "",
    ])


# ---------------------------------------------------------------------------------------------
# build and run (host, for the checks)
# ---------------------------------------------------------------------------------------------
def find_cc() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def compile_c(c_dir: str | Path, cc: str | None = None) -> Path:
    """Compile ``model.c`` + ``main.c`` into ``c_dir/model`` (raises ConfigError without a compiler)."""
    extra = sorted(p.name for p in Path(c_dir).glob("lb_*.c"))  # kernel sources copied by a conv_hook
    return build_host(c_dir, ["model.c", "main.c", *extra], cc)


#: what a compiler or linker says when it cannot write its output (not an error of the code)
_NO_ROOM = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def build_host(c_dir: str | Path, sources: list[str], cc: str | None = None, what: str = "C code") -> Path:
    """Compile ``sources`` (in ``c_dir``) with :func:`host_cflags` into ``c_dir/model``; no compiler, or code that
    does not compile, is one line (``what``: the code, as that line names it)."""
    cc = cc or find_cc()
    if cc is None:
        raise ConfigError("export: no C compiler (gcc/cc) on PATH to build the C export")
    d = Path(c_dir).resolve()  # gcc runs with cwd=d: a relative -o path would point elsewhere
    exe = d / "model"
    r = subprocess.run([cc, *host_cflags(), "-o", str(exe), *sources, "-lm"], cwd=d, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"{cc} exited with {r.returncode}"]
        full = next((ln for ln in lines if any(s in ln for s in _NO_ROOM)), None)
        if full is not None:  # before session 29: "the generated C code does not compile: collect2: error: ld ..."
            raise ConfigError(f"export: the generated {what} could not be built in {d}: {full}; is the disk full or "
                              "the folder read-only?")
        first = next((ln for ln in lines if "error" in ln), lines[0])  # the error, not a warning
        raise ConfigError(f"export: the generated {what} does not compile: {first}")
    return exe


def run_c(exe: str | Path, x: np.ndarray, n_out: int, pixels: str | None = None) -> np.ndarray:
    """Logits of the compiled model on float32 inputs ``x`` (N, ...), through files; ``pixels="chw"`` or
    ``"hwc"``: ``x`` are uint8 pixels in that layout, run by an integer build's ``lowbit_predict_pixels[_hwc]``."""
    exe = Path(exe)
    x = np.ascontiguousarray(x, dtype=np.float32 if pixels is None else np.uint8)
    fin, fout = exe.parent / "input.bin", exe.parent / "logits.f32"
    x.tofile(fin)
    mode = [] if pixels is None else [{"chw": "--pixels", "hwc": "--pixels-hwc"}[pixels]]
    try:
        r = subprocess.run([str(exe), *mode, str(fin), str(len(x)), str(fout)], capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or ["no message"]
            first = next((ln for ln in lines if "ERROR" in ln or "error" in ln), lines[0])
            raise ConfigError(f"export: the compiled C model failed on {len(x)} inputs (exit status {r.returncode}): "
                              f"{first.strip()}")
        return np.fromfile(fout, dtype=np.float32).reshape(len(x), n_out)
    finally:
        fin.unlink(missing_ok=True)
        fout.unlink(missing_ok=True)
