"""Bit-packed integer conv kernels for the C export (``lb_packed.c``) and how the generator uses them.

:func:`choose` picks a conv layer's kernel from its bits: ``xnor`` (1-bit weights and activations:
AND/xnor-popcount over 32 channels per word), ``bitserial`` (weights and activations of at most 2 bits:
popcounts over every pair of bit planes, 2-bit x 2-bit with byte-lane partial counts), else the plain
integer kernel ``int`` of :mod:`lowbit.export.c_export`. The packed kernels need a weight whose integer
form is affine in its code (``m = a*c + b`` per row: every uniform grid or lattice); a layer whose
integer form is not (power-of-two levels) keeps the plain kernel. They compute the same integer sums as
the plain kernel, so the outputs are bit-identical (``tests/test_mcu.py`` checks every bitwidth on random
layers with odd channel counts).

:class:`PackedKernels` is the ``conv_hook`` of :func:`lowbit.export.c_export.write_c`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..graph import WeightQ
from ..numpy_ref import ConvKernel

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "lb_packed.c", HERE / "lb_packed.h")
KERNELS = ("int", "xnor", "bitserial")
#: largest weight and activation bits of the bit-serial kernel when chosen automatically (its cost
#: grows with wbits * abits; at W4A4 the plain kernel is cheaper on Cortex-M4, docs/deploy-mcu.md)
AUTO_MAX_BITS = 2


def act_bits(k: ConvKernel) -> int:
    return int(k.act.qmax - k.act.qmin).bit_length()


def affine_form(lut: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, b)`` per row with ``lut[r, c] == a[r]*c + b[r]`` for every code, or None."""
    lut = np.asarray(lut, dtype=np.int64)
    c = np.arange(lut.shape[1])
    b = lut[:, 0]
    a = lut[:, 1] - lut[:, 0] if lut.shape[1] > 1 else np.zeros_like(b)
    if not np.array_equal(lut, a[:, None] * c[None, :] + b[:, None]):
        return None
    if np.abs(np.concatenate([a, b])).max(initial=0) > 32767:
        return None
    return a, b


def choose(k: ConvKernel, allow: str = "auto") -> str:
    """Kernel of a conv layer: ``int``, ``xnor`` or ``bitserial`` (module docstring).

    ``allow``: "auto" (by bits), "int" (plain kernel everywhere), "packed" (a packed kernel wherever
    the weight form allows, at any bits: for tests and measurements)."""
    if allow not in ("auto", "int", "packed"):
        raise ConfigError(f"packed kernels: unknown choice {allow!r}; allowed: auto, int, packed")
    if k.mode != "int" or allow == "int" or affine_form(k.lut) is None:
        return "int"
    wb, ab = k.op.weight.bits, act_bits(k)
    if allow == "auto" and max(wb, ab) > AUTO_MAX_BITS:
        return "int"
    return "xnor" if wb == 1 and ab == 1 else "bitserial"


def pack_weight_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint32 bit planes of weight codes (O, C, KH, KW): [O][KH][KW][bits][ceil(C/32)] (lb_packed.h)."""
    codes = np.asarray(codes, dtype=np.uint32)
    if codes.ndim == 2:  # linear: (O, F) as a 1x1 conv
        codes = codes[:, :, None, None]
    o, c, kh, kw = codes.shape
    nw = (c + 31) // 32
    planes = np.zeros((o, kh, kw, bits, nw), dtype=np.uint32)
    for ch in range(c):
        w, sh = divmod(ch, 32)
        for i in range(bits):
            planes[:, :, :, i, w] |= ((codes[:, ch] >> i) & 1).astype(np.uint32) << np.uint32(sh)
    return planes


def pack_act_planes(u: np.ndarray, bits: int, ph: int, pw: int) -> np.ndarray:
    """NumPy twin of ``lb_pk_pack_act`` (for tests): codes (C, H, W) -> padded HWC bit planes."""
    c, h, w = u.shape
    nw = (c + 31) // 32
    out = np.zeros((h + 2 * ph, w + 2 * pw, bits, nw), dtype=np.uint32)
    for ch in range(c):
        wd, sh = divmod(ch, 32)
        for j in range(bits):
            out[ph: ph + h, pw: pw + w, j, wd] |= ((u[ch].astype(np.uint32) >> j) & 1) << np.uint32(sh)
    return out


class PackedKernels:
    """``conv_hook`` of :func:`write_c`: emits ``lb_pk_pack_act`` + ``lb_pk_conv`` for the layers
    :func:`choose` gives a packed kernel, and records the choice of every conv layer."""

    def __init__(self, allow: str = "auto"):
        if allow not in ("auto", "int", "packed"):
            raise ConfigError(f"packed kernels: unknown choice {allow!r}; allowed: auto, int, packed")
        self.allow = allow
        self.chosen: dict[str, str] = {}
        self.plane_words = 0  # activation plane scratch (uint32 words)
        self.acc_words = 0  # int32 sums of one pixel (2 per output channel)

    # hooks used by write_c
    includes = ['#include "lb_packed.h"']

    def decls(self) -> list[str]:
        if not self.plane_words:
            return []
        return [f"static uint32_t lb_xplanes[{self.plane_words}];  /* bit planes of a packed layer's input */",
                f"static int32_t lb_pk_acc[{self.acc_words}];  /* integer sums of one output pixel */"]

    @property
    def ram_bytes(self) -> int:
        return 4 * (self.plane_words + self.acc_words)

    sources = SOURCES  # always (the header is included); unused kernels cost no flash (--gc-sections)

    def __call__(self, k, cs, offsets: dict[str, int], geoms: list[str], ident) -> list[str] | None:
        if not isinstance(k, ConvKernel):
            return None
        kind = choose(k, self.allow)
        self.chosen[k.op.name] = kind if k.mode == "int" else "float"
        if kind == "int":
            return None
        wq: WeightQ = k.op.weight
        a, b = affine_form(k.lut)
        ab, n = act_bits(k), ident(k.op.name)
        nw = (k.C + 31) // 32
        self.plane_words = max(self.plane_words, (k.H + 2 * k.PH) * (k.W + 2 * k.PW) * ab * nw)
        self.acc_words = max(self.acc_words, 2 * k.O)
        gname = f"pg_{n}"
        geoms.append(f"static const lb_pk_geom {gname} = {{{', '.join(str(int(getattr(k, f))) for f in ('C', 'H', 'W', 'O', 'KH', 'KW', 'SH', 'SW', 'PH', 'PW', 'OH', 'OW'))}}};")
        wp = pack_weight_planes(wq.codes.reshape(k.O, k.C, k.KH, k.KW), wq.bits).reshape(-1)
        wpn = cs.u32(f"{n}_planes", wp)
        wan, wbn = cs.i16(f"{n}_wa", a), cs.i16(f"{n}_wb", b)
        coef = {c: (cs.f32(f"{n}_{c}", getattr(k, c)) if getattr(k, c) is not None else "NULL")
                for c in ("ca", "cb", "cc", "cd", "bias")}
        from ..c_export import quantize_code

        x, y = f"A + {offsets[k.op.inputs[0]]}", f"A + {offsets[k.op.output]}"
        return [
            *quantize_code(k, cs, x),
            f"    lb_pk_pack_act(&{gname}, lb_codes, {ab}, lb_xplanes);  /* {kind} kernel */",
            f"    lb_pk_conv(&{gname}, lb_xplanes, {ab}, {k.act.zero}, {wpn}, {wq.bits}, {wan}, {wbn}, {len(a)}, "
            f"{coef['ca']}, {coef['cb']}, {coef['cc']}, {coef['cd']}, {coef['bias']}, {y}, lb_pk_acc);",
        ]


# ---------------------------------------------------------------------------------------------
# the integer runtime of issue 17 (lowbit.export.int_c): the same kernels behind lb_conv's interface
# ---------------------------------------------------------------------------------------------
RT_SOURCES = (HERE / "lb_packed_rt.c", HERE / "lb_packed_rt.h")


def choose_bits(wbits: int, abits: int, lut: np.ndarray, groups: int = 1, allow: str = "auto") -> str:
    """:func:`choose` from the bits alone (integer graphs): ``int``, ``xnor`` or ``bitserial``."""
    if allow not in ("auto", "int", "packed"):
        raise ConfigError(f"packed kernels: unknown choice {allow!r}; allowed: auto, int, packed")
    if allow == "int" or groups != 1 or affine_form(lut) is None:
        return "int"
    if allow == "auto" and max(wbits, abits) > AUTO_MAX_BITS:
        return "int"
    return "xnor" if wbits == 1 and abits == 1 else "bitserial"


#: the bit planes of a band of input rows take at most this share of the layer's packed input (bytes)
PK_BAND_SHARE = 0.5


def pk_band(cin: int, hin: int, win: int, hout: int, kh: int, sh: int, pw: int, abits: int) -> tuple[int, int]:
    """``(band, words)``: output rows whose input rows ``lb_pk_conv_rt`` turns into bit planes at a time (0: all
    of them), and the planes' uint32 words. The most rows whose planes take at most :data:`PK_BAND_SHARE` of the
    layer's packed input (at least one output row): the whole padded input's planes cost 32 bits per channel word
    of each pixel, twice a 16-channel 2-bit input and more with its padding ring, the largest scratch of a 2-bit
    network (7,200 bytes on the W2A2 ResNet-8's first stage, against its 10,976-byte arena)."""
    row = (win + 2 * pw) * abits * ((cin + 31) // 32)  # words per padded input row
    budget = PK_BAND_SHARE * cin * hin * win * abits / 8
    r = hout
    while r > 1 and 4 * ((r - 1) * sh + kh) * row > budget:
        r -= 1
    return (0, ((hout - 1) * sh + kh) * row) if r == hout else (r, ((r - 1) * sh + kh) * row)


def patch_int_c(graph, out_dir: str | Path, allow: str = "auto") -> dict[str, str]:
    """Switch the layers of :func:`lowbit.export.int_c.write_int_c`'s ``model.c`` that :func:`choose_bits`
    gives a packed kernel from ``lb_conv`` to ``lb_pk_conv_rt`` (weight planes + affine form as extra
    constants, plane and sum scratch as static buffers); returns the kernel of every conv layer."""
    import shutil

    from ..c_export import _Consts, _ident
    from ..int_c import conv_geometry

    out = Path(out_dir)
    src = (out / "model.c").read_text()
    cs = _Consts()
    chosen: dict[str, str] = {}
    planes = accw = 0
    T = graph.tensors
    for op in graph.ops:
        if op.kind != "conv":
            continue
        abits = T[op.inputs[0]].bits
        groups = int(op.attrs.get("groups", 1))
        kind = choose_bits(op.wbits, abits, op.lut, groups, allow)  # either residual form: lb_conv_out
        chosen[op.name] = kind
        if kind == "int":
            continue
        nm = _ident(op.name)
        call = f"    lb_conv(&L_{nm}, "
        if src.count(call) != 1:
            raise ConfigError(f"packed kernels: cannot find layer '{op.name}' in the integer C code")
        cin, hin, win, cout, hout, _ = conv_geometry(op)  # a linear layer: a 1x1 conv on a 1x1 image
        (kh, kw), sh, pw = op.attrs["kernel"], op.attrs["stride"][0], op.attrs["padding"][1]
        a, b = affine_form(op.lut)
        wp = cs.u32(f"{nm}_planes", pack_weight_planes(op.codes.reshape(cout, cin, kh, kw), op.wbits).reshape(-1))
        wa, wb = cs.i16(f"{nm}_wa", a), cs.i16(f"{nm}_wb", b)
        band, words = pk_band(cin, hin, win, hout, kh, sh, pw, abits)
        planes = max(planes, words)
        accw = max(accw, 2 * cout)
        line_start = src.index(call)
        line_end = src.index(");", line_start)
        args = src[line_start + len(call): line_end]
        src = (src[:line_start] + f"    lb_pk_conv_rt(&L_{nm}, {args.replace(', lb_wrow', '')}, {wp}, {wa}, {wb}, "
               f"{band}, lb_xplanes, lb_pk_acc" + src[line_end:])
        src = src.replace(f"/* {op.name} */", f"/* {op.name}: {kind} kernel */", 1)
        # the planes replace the packed codes: drop the code array (lb_pk_conv_rt never reads w_codes)
        arr = f"static const uint8_t {nm}_w["
        if src.count(arr) == 1 and src.count(f".w_codes = {nm}_w,") == 1:
            i = src.index(arr)
            src = src[:i] + src[src.index("};\n", i) + 3:]
            src = src.replace(f".w_codes = {nm}_w,", ".w_codes = NULL,  /* packed kernel: planes */", 1)
    # lb_conv's scratch, for the layers that still call it (a packed layer unpacks into its planes)
    from ..int_c import SCRATCH_COMMENT, conv_scratch

    n = max([conv_scratch(op, T[op.inputs[0]]) for op in graph.ops if chosen.get(op.name) == "int"] + [1])
    decl_at = src.index("static int16_t lb_wrow[")
    src = (src[:decl_at] + f"static int16_t lb_wrow[{n}];     {SCRATCH_COMMENT}" +
           src[src.index("\n", decl_at):])
    if planes:
        decl = [*cs.lines, f"static uint32_t lb_xplanes[{planes}];  /* bit planes of a packed layer's input */",
                f"static int32_t lb_pk_acc[{accw}];  /* integer sums of one output pixel */", ""]
        src = src.replace('#include "model.h"', '#include "model.h"\n#include "lb_packed_rt.h"', 1)
        src = src.replace("static void lb_network(", "\n".join(decl) + "\nstatic void lb_network(", 1)
        for f in (*SOURCES, *RT_SOURCES):
            shutil.copyfile(f, out / f.name)
        (out / "model.c").write_text(src)
    return chosen
