"""C99 for the integer-only network: generated network code on the kernels of ``runtime/``.

:func:`write_int_c` writes, into one folder,

* ``lowbit_rt.h`` / ``lowbit_rt.c``: copies of the runtime's kernels (package data,
  ``runtime/README.md`` documents the API), unchanged;
* ``model.h`` / ``model.c``: the network: its constants as ``static const`` arrays (flash:
  packed weight codes, int16 code -> integer tables, int32 bias / multiplier / shift, float32
  classifier scales), one ``lb_conv_t`` descriptor per conv, a byte arena (RAM) whose tensors are
  placed by a liveness first-fit plan at their packed sizes, and one ``lb_*`` call per op;
  ``lowbit_predict(const float *input, float *logits)`` and ``lowbit_predict_codes(const uint8_t
  *codes, float *logits)``;
* ``main.c``: embedded sample images with the NumPy reference's logits (exit status 0 when equal
  bit for bit), or ``main INPUT.f32 N OUTPUT.f32``.

Everything between the input quantization and the classifier's ``(float)acc * scale`` is integer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .c_export import (C_PREFIX, CFLAGS, _Consts, _ident, _main_c, build_host, check_c_prefix, extern_c, find_cc,
                       with_c_prefix)
from .intgraph import IntGraph, accumulator_bound, input_normalisation, out_range, pixel_table
from .memplan import place
from .pack import pack_codes, packed_nbytes
from .requant import thresholds

#: the integer runtime's kernels (package data): lowbit_rt.h, lowbit_rt.c, README.md
RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
RUNTIME_FILES = ("lowbit_rt.h", "lowbit_rt.c")


@dataclass
class IntCExport:
    dir: Path
    files: list[Path]
    flash_bytes: int  # constant arrays (weights, tables, requantization constants)
    descriptor_bytes: int  # the lb_conv_t descriptors (flash too), as the host compiler lays them out
    ram_bytes: int  # arena + lb_conv scratch (a weight row, a band of the input unpacked)
    arena_bytes: int
    scratch_bytes: int

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else [p.name for p in v] if isinstance(v, list) else v)
                for k, v in self.__dict__.items()}


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def plan_arena(graph: IntGraph) -> tuple[dict[str, int], int]:
    """Byte offset of every code tensor in one arena, and the arena size (:func:`lowbit.export.memplan.place`: a
    tensor lives from the op that writes it to its last reader; tensors whose lives overlap share no byte).
    ``flatten`` aliases its input; the classifier writes the caller's logits."""
    nbytes = {t: packed_nbytes(_numel(_shape(graph, t)), q.bits) for t, q in graph.tensors.items()}
    last: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            last[t] = i
    root: dict[str, str] = {}
    for op in graph.ops:
        if op.kind == "flatten":
            root[op.output] = root.get(op.inputs[0], op.inputs[0])
            last[root[op.output]] = max(last.get(root[op.output], -1), last.get(op.output, -1))
    lives = {op.output: (i, max(i, last.get(op.output, i))) for i, op in enumerate(graph.ops)
             if op.kind != "flatten" and op.output != graph.output}
    offsets, size = place(lives, {t: nbytes[t] for t in lives})
    for t, r in root.items():
        offsets[t] = offsets[r]
    return offsets, size


def _shape(graph: IntGraph, t: str) -> tuple[int, ...]:
    if t == graph.input:
        return tuple(graph.input_shape)
    for op in graph.ops:
        if op.output == t:
            return tuple(op.out_shape)
    raise KeyError(t)


#: output bits up to which a conv's requantization and clamp become thresholds (``lb_conv_t.thr``,
#: :func:`lowbit.export.requant.thresholds`): 2^bits − 1 int32 per output channel in flash, against the 64-bit
#: requantization per output (most of a 2-bit layer's epilogue; a libgcc call on a Cortex-M0). 4-bit outputs
#: would need 15 per channel (60 bytes): not done
THRESHOLD_BITS = 2

#: the comment of lb_conv's scratch declaration (``lb_wrow``) in ``model.c``
SCRATCH_COMMENT = "/* lb_conv's scratch: a decoded weight row, and a band of the input unpacked */"


def conv_geometry(op) -> tuple[int, int, int, int, int, int]:
    """``(cin, hin, win, cout, hout, wout)`` of a conv op as ``lb_conv`` sees it (a linear layer: a 1x1 conv on
    a 1x1 image of ``cin`` channels)."""
    if op.attrs["layer"] == "linear":
        (cin,), (cout,) = op.in_shape, op.out_shape
        return cin, 1, 1, cout, 1, 1
    return (*op.in_shape, *op.out_shape)


def _unpacked(op, t_in) -> bool:
    """Whether ``lb_conv`` unpacks the op's input (below 8 bits, or padded) rather than reading it in place: its
    test ``in_bits != 8 || ph || pw`` (runtime/lowbit_rt.c), for a linear layer too."""
    return t_in.bits < 8 or any(op.attrs["padding"])


def _band_bytes(op, rows_out: int) -> int:
    """Bytes of ``lb_conv``'s unpacked input for a band of ``rows_out`` output rows: every channel's input rows
    of the band, one byte per code, padded (runtime/lowbit_rt.c, ``lb_conv``)."""
    c, _, w = conv_geometry(op)[:3]
    pw, kh, sh = op.attrs["padding"][1], op.attrs["kernel"][0], op.attrs["stride"][0]
    return c * ((rows_out - 1) * sh + kh) * (w + 2 * pw)


def conv_band(op, t_in) -> int:
    """Output rows per band of ``lb_conv``'s unpacked input (runtime/lowbit_rt.h; 0: all rows at once): the most
    rows whose input, unpacked to one byte per code and padded, is no larger than the layer's packed input (at
    least one row), so that the scratch stays within one packed activation. 0 when the input is read in place
    (8-bit, no padding) or fits whole."""
    if not _unpacked(op, t_in):
        return 0
    hout, budget = conv_geometry(op)[4], packed_nbytes(_numel(op.in_shape), t_in.bits)
    r = hout
    while r > 1 and _band_bytes(op, r) > budget:
        r -= 1
    return 0 if r == hout else r


def conv_scratch(op, t_in) -> int:
    """int16 elements of ``lb_conv``'s scratch for a conv op (runtime/lowbit_rt.h): its decoded weight row
    (``F = cin/groups·kh·kw``; ``F/3·4`` for 3-wide kernels) and, when it unpacks its input, the input rows of one
    band of output rows (:func:`conv_band`) at one byte per code, padded, with 4 bytes of slack."""
    f = int(op.codes[0].size)
    if op.attrs["layer"] != "linear" and op.attrs["kernel"][1] == 3:
        f = f // 3 * 4  # 3-wide rows: 4 int16 per kernel row (the DSP loops' layout, lb_conv)
    if not _unpacked(op, t_in):
        return f
    return f + (_band_bytes(op, conv_band(op, t_in) or conv_geometry(op)[4]) + 4 + 1) // 2  # + 4 bytes read past


#: the fields of ``lb_conv_t`` in declaration order (lowbit_rt.h): designated initializers are written in this
#: order, which C++20 requires of a model.c built as C++
CONV_FIELDS = ("cin", "hin", "win", "cout", "hout", "wout", "kh", "kw", "sh", "sw", "ph", "pw", "groups", "in_bits",
               "in_zero", "w_codes", "w_bits", "w_lut", "lut_rows", "lut_n", "bias", "mult", "shift", "res_mult",
               "res_shift", "res_bits", "res_zero", "mid_zero", "mid_mult", "out_bits", "out_zero", "out_min",
               "out_max", "out_scale", "band", "thr")


def write_int_c(graph: IntGraph, out_dir: str | Path, samples: np.ndarray | None = None,
                expected: np.ndarray | None = None, prefix: str = C_PREFIX) -> IntCExport:
    """Write the C99 code of an integer graph (module docstring); ``prefix`` names its public API
    (``PREFIX_predict``, ``PREFIX_IN_SIZE``, ...: :func:`lowbit.export.c_export.with_c_prefix`)."""
    check_c_prefix(prefix)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / f, out / f)
    offsets, arena = plan_arena(graph)
    T = graph.tensors
    cs = _Consts()
    descs: list[str] = []
    body: list[str] = []
    max_row = 1
    n_conv = 0

    def i32(name, a):
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        return cs._emit("int32_t", name, [str(int(v)) for v in a], 4 * a.size, 10)

    q_in = graph.ops[0]
    if q_in.kind != "quant_in":
        raise ConfigError("integer C: the graph must start with the input quantization")
    a = q_in.act
    in_bits = T[graph.input].bits
    n_in = _numel(graph.input_shape)
    for op in graph.ops[1:]:
        x = f"A + {offsets[op.inputs[0]]}"
        if op.kind == "flatten":
            body.append(f"    /* {op.name}: flatten (a reshape, same bytes) */")
            continue
        if op.kind == "maxpool":
            c, h, w = op.in_shape
            _, oh, ow = op.out_shape
            (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
            body.append(f"    lb_maxpool({c}, {h}, {w}, {oh}, {ow}, {kh}, {kw}, {sh}, {sw}, {ph}, {pw}, "
                        f"{T[op.inputs[0]].bits}, {x}, A + {offsets[op.output]});")
            continue
        if op.kind == "gap":
            c = op.in_shape[0]
            hw = _numel(op.in_shape) // c
            ti, to = T[op.inputs[0]], T[op.output]
            body.append(f"    lb_avgpool_global({c}, {hw}, {ti.bits}, {ti.zero}, {int(op.mult[0])}, {int(op.shift[0])}, "
                        f"{to.bits}, {to.zero}, {x}, A + {offsets[op.output]});")
            continue
        if op.kind != "conv":
            raise ConfigError(f"integer C: op kind '{op.kind}' has no kernel")
        n_conv += 1
        nm = _ident(op.name)
        cin, hin, win, cout, hout, wout = conv_geometry(op)
        (kh, kw), (sh, sw), (ph, pw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
        groups = int(op.attrs.get("groups", 1))
        ti = T[op.inputs[0]]
        max_row = max(max_row, conv_scratch(op, ti))
        w_codes = cs.u8(f"{nm}_w", pack_codes(op.codes, op.wbits))
        lut = cs.i16(f"{nm}_lut", op.lut)
        bias = i32(f"{nm}_bias", op.bias)
        final = op.output == graph.output
        tr = T[op.inputs[1]] if len(op.inputs) > 1 else None  # the residual
        fields = [f".cin = {cin}", f".hin = {hin}", f".win = {win}", f".cout = {cout}", f".hout = {hout}",
                  f".wout = {wout}", f".kh = {kh}", f".kw = {kw}", f".sh = {sh}", f".sw = {sw}", f".ph = {ph}",
                  f".pw = {pw}", f".groups = {groups}", f".in_bits = {ti.bits}", f".in_zero = {ti.zero}",
                  f".w_codes = {w_codes}", f".w_bits = {op.wbits}", f".w_lut = {lut}",
                  f".lut_rows = {op.lut.shape[0]}", f".lut_n = {op.lut.shape[1]}", f".bias = {bias}"]
        if final:
            fields.append(f".out_scale = {cs.f32(f'{nm}_out_scale', op.out_scale)}")
        else:
            to = T[op.output]
            lo, hi = out_range(op, to)
            fields += [f".mult = {i32(f'{nm}_mult', op.mult)}",
                       f".out_bits = {to.bits}", f".out_zero = {to.zero}", f".out_min = {lo}", f".out_max = {hi}"]
            if to.bits <= THRESHOLD_BITS and op.attrs.get("residual") != "output":
                thr = thresholds(op.mult, op.shift, to.zero, lo, hi, accumulator_bound(op, ti, tr))
                fields.append(f".thr = {i32(f'{nm}_thr', thr)}")
            else:
                fields.append(f".shift = {i32(f'{nm}_shift', op.shift)}")
        res = "NULL"
        if tr is not None:
            fields += [f".res_mult = {i32(f'{nm}_res_mult', op.res_mult)}",
                       f".res_shift = {i32(f'{nm}_res_shift', op.res_shift)}",
                       f".res_bits = {tr.bits}", f".res_zero = {tr.zero}"]
            if op.attrs.get("residual") == "output":
                fields += [f".mid_zero = {op.attrs['mid_zero']}", f".mid_mult = {op.attrs['mid_mult']}"]
            res = f"A + {offsets[op.inputs[1]]}"
        fields.append(f".band = {conv_band(op, ti)}")
        fields.sort(key=lambda f: CONV_FIELDS.index(f[1:f.index(" ")]))
        descs.append(f"static const lb_conv_t L_{nm} = {{\n    " + ",\n    ".join(fields) + "\n};")
        y = "logits" if final else f"A + {offsets[op.output]}"
        body.append(f"    lb_conv(&L_{nm}, {x}, {res}, {y}, lb_wrow);  /* {op.name} */")
    n_out = _numel(graph.output_shape)
    in_bytes = packed_nbytes(n_in, in_bits)
    try:  # raw 8-bit pixels in, where the graph records its input normalisation
        table = pixel_table(graph)
    except ConfigError:
        table = None
    pixel_h = pixel_c = []
    if table is not None:
        c_in = graph.input_shape[0]
        lut = cs.u8("lb_pixel_lut", table)
        cs.bytes -= table.size  # linked only where lowbit_predict_pixels* is called (--gc-sections): not counted
        pixel_h = [
            "/* the same from raw 8-bit pixels (0..255, before normalisation), no float at the input: a table of",
            f"   256 codes per channel ({c_in} x 256 bytes of flash) folds (pixel / 255 - mean) / std and the input",
            "   quantizer; pixels C x H x W, or H x W x C (interleaved) for _hwc */",
            "#define LOWBIT_PIXEL_INPUT 1",
            "void lowbit_predict_pixels(const uint8_t *pixels, float *logits);",
            "void lowbit_predict_pixels_hwc(const uint8_t *pixels, float *logits);", ""]
        pixel_c = [
            *(f"void lowbit_predict_pixels{sfx}(const uint8_t *pixels, float *logits)\n{{\n"
              f"    lb_pixels_to_codes(pixels, {c_in}, LOWBIT_IN_SIZE / {c_in}, {hwc}, {lut}, LOWBIT_IN_BITS, "
              f"lb_arena + {offsets[graph.input]});\n    lb_network(logits);\n}}\n"
              for sfx, hwc in (("", 0), ("_hwc", 1)))]
    scratch = 2 * max_row
    ram = arena + scratch
    flash = cs.bytes
    try:
        mean, std = input_normalisation(graph)
        norm = f"x = (pixel / 255 - mean) / std per channel, mean {_floats(mean)}, std {_floats(std)}"
    except ConfigError:
        norm = "as the training data pipeline fed the model (no normalisation recorded)"
    desc_bytes = n_conv * _DESC_BYTES
    header = f"""/* Generated by lowbit.export (integer-only network on the lowbit runtime, lowbit_rt.h).
   Build: cc {' '.join(CFLAGS)} model.c lowbit_rt.c main.c -lm
   (not with -ffast-math: lowbit_rt.c refuses it; runtime README, "Build").
   Flash: {flash} bytes of constant arrays (LOWBIT_FLASH_BYTES) + {n_conv} lb_conv_t descriptors ({desc_bytes} bytes on a
   32-bit core, LOWBIT_DESC_BYTES) + the code (all of lowbit_rt.c: 8.7-9.2 KiB at -O2, 5.7-6.2 KiB at -Os on a
   Cortex-M0/M4; less with -ffunction-sections -Wl,--gc-sections).
   RAM: arena {arena} + lb_conv scratch {scratch} bytes (LOWBIT_RAM_BYTES, static) + the stack: about 0.5 KiB at
   -O2 on a Cortex-M, 1.5-2.2 KiB at -O0 (measured in session 24; `lowbit export --target` measures its build's).
   Not reentrant: one static arena. */
#ifndef LOWBIT_MODEL_H
#define LOWBIT_MODEL_H

#include <stdint.h>

#define LOWBIT_IN_SIZE {n_in}     /* input {'x'.join(map(str, graph.input_shape))}, float32, CHW, normalised: {norm} */
#define LOWBIT_IN_BITS {in_bits}      /* input codes: bits per code, packed */
#define LOWBIT_IN_BYTES {in_bytes}
#define LOWBIT_OUT_SIZE {n_out}   /* float32 logits; logits[i] is class label i of the training data */
#define LOWBIT_FLASH_BYTES {flash}
#define LOWBIT_DESC_BYTES {desc_bytes}
#define LOWBIT_RAM_BYTES {ram}
#define LOWBIT_N_CONV {n_conv}

""" + extern_c("""/* logits of one image; not reentrant (static arena) */
void lowbit_predict(const float *input, float *logits);
/* the same from the packed input codes (lb_quantize_input's output) */
void lowbit_predict_codes(const uint8_t *codes, float *logits);
""" + "\n".join(pixel_h)) + """
#endif
"""
    src = "\n".join([
        "/* Generated by lowbit.export: the integer network (constants, descriptors, calls). See model.h. */",
        "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>", '#include "lowbit_rt.h"',
        '#include "model.h"', "",
        *cs.lines, "", *descs, "",
        f"static uint8_t lb_arena[{max(arena, 1)}];  /* activation codes, packed */",
        f"static int16_t lb_wrow[{max_row}];     {SCRATCH_COMMENT}", "",
        "static void lb_network(float *logits)",
        "{",
        "    uint8_t *A = lb_arena;",
        *body,
        "}", "",
        "void lowbit_predict_codes(const uint8_t *codes, float *logits)",
        "{",
        f"    memcpy(lb_arena + {offsets[graph.input]}, codes, LOWBIT_IN_BYTES);",
        "    lb_network(logits);",
        "}", "",
        "void lowbit_predict(const float *input, float *logits)",
        "{",
        f"    lb_quantize_input(input, LOWBIT_IN_SIZE, {0 if a.rule == 'clip_div' else 1}, {_f(a.lo)}, {_f(a.step)}, "
        f"{_f(a.inv)}, {a.qmin}, {a.qmax}, LOWBIT_IN_BITS, lb_arena + {offsets[graph.input]});",
        "    lb_network(logits);",
        "}", "", *pixel_c,
    ])
    (out / "model.h").write_text(with_c_prefix(header, prefix))
    (out / "model.c").write_text(with_c_prefix(src, prefix))
    (out / "main.c").write_text(with_c_prefix(_main_c(samples, expected, n_in, n_out, pixels=table is not None), prefix))
    files = [out / n for n in ("model.h", "model.c", "main.c", *RUNTIME_FILES)]
    return IntCExport(out, files, flash, n_conv * _DESC_BYTES, ram, arena, scratch)


#: sizeof(lb_conv_t) on a 32-bit target (int32 fields and 32-bit pointers): 23 int32 + 9 pointers + 4 uint8 fields,
#: each padded to 4 bytes by the int32 or pointer after it = 144 (124 before session 24, which missed 5 fields;
#: tests/test_integer_export.py checks it against arm-none-eabi-gcc's sizeof)
_DESC_BYTES = 4 * 23 + 4 * 9 + 4 * 4


def _floats(v) -> str:
    return "[" + ", ".join(f"{float(x):.6g}" for x in v) + "]"


def _f(v: float) -> str:
    from .c_export import _cfloat

    return _cfloat(v)


#: the runtime compiled once per process: (compiler, flags, digest of lowbit_rt.c + .h) -> object file
_RUNTIME_OBJECTS: dict[tuple, Path] = {}
_OBJECT_DIR: list[Path] = []  # a temporary folder for them, removed at exit


def compile_int_c(c_dir: str | Path, cc: str | None = None) -> Path:
    """Build ``model.c lowbit_rt.c main.c`` into ``c_dir/model``. The runtime, the same two files in every export,
    is compiled once per process, compiler and flags (it took 90 % of a build, 6 s of 6.5 under the tests'
    sanitizers) and linked as that object file: the same translation unit, the same program."""
    obj = _runtime_object(Path(c_dir).resolve(), cc or find_cc())
    return build_host(c_dir, ["model.c", str(obj) if obj is not None else "lowbit_rt.c", "main.c"], cc,
                      what="integer C code")


def _runtime_object(d: Path, cc: str | None) -> Path | None:
    """The object file of ``d``'s ``lowbit_rt.c`` under :func:`host_cflags` (compiled on first use), or None (no
    compiler, or it does not compile: the whole build then says why)."""
    import atexit
    import hashlib
    import subprocess
    import tempfile

    from .c_export import host_cflags

    if cc is None or not all((d / f).is_file() for f in RUNTIME_FILES):
        return None
    flags = host_cflags()
    key = (cc, tuple(flags), hashlib.sha256(b"".join((d / f).read_bytes() for f in RUNTIME_FILES)).hexdigest())
    obj = _RUNTIME_OBJECTS.get(key)
    if obj is not None and obj.is_file():
        return obj
    if not _OBJECT_DIR:
        _OBJECT_DIR.append(Path(tempfile.mkdtemp(prefix="lowbit_rt_")))
        atexit.register(shutil.rmtree, _OBJECT_DIR[0], True)
    obj = _OBJECT_DIR[0] / f"lowbit_rt_{len(_RUNTIME_OBJECTS)}.o"
    r = subprocess.run([cc, *flags, "-c", "lowbit_rt.c", "-o", str(obj)], cwd=d, capture_output=True, check=False)
    if r.returncode != 0:
        return None
    _RUNTIME_OBJECTS[key] = obj
    return obj
