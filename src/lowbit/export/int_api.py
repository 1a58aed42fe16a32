"""Export an integer-mode model (``plan.integer: true``) and prove every backend computes it.

    report = export_int_model(model, x, "out/", labels=y)   # or export_run(RUN_DIR) on such a run
    print(format_int_report(report))

1. the integer graph of the model (:func:`lowbit.intmode.int_graph`) is written as the integer
   package (:func:`.intgraph.save_int_package`) and loaded back: everything below comes from the
   file alone;
2. NumPy integer reference from the file vs the PyTorch model's eval forward (the integer model):
   logits compared bit for bit on every image;
3. C (runtime kernels + generated network): built, bit-exact against NumPy on ``c_images``
   images (None: all), flash and RAM vs seed 002's Mem;
4. ONNX with integer operators (ConvInteger / MatMulInteger) and its FP32 twin: agreement, and
   onnxruntime latency (1 thread) of integer vs FP32 vs onnxruntime's own ``quantize_static`` of
   the FP32 twin, sessions alternating.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .api import FORMATS, _accuracy, _flag_failures, _mcu, _mem_002, check_formats, compare, torch_reference
from .intgraph import _I32, IntReference, load_int_package, packed_weight_bytes, save_int_package


def _bits_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.all(np.asarray(a, np.float32).view(np.uint32) == np.asarray(b, np.float32).view(np.uint32), axis=1)


def export_int_model(model: nn.Module, x: torch.Tensor, out_dir: str | Path, labels: torch.Tensor | None = None,
                     formats=FORMATS, c_images: int | None = 8, latency_batch: int = 256, latency_repeats: int = 20,
                     calib: int = 200, meta: dict | None = None, log=None, target: str | None = None,
                     mcu_images: int = 3, fp32=None, c_prefix: str = "lowbit") -> dict:
    """Export and check an integer-mode model on inputs ``x`` (module docstring). ``formats``: any of packed, onnx,
    c (the NumPy reference and both other formats are built from the packed file, which goes to a temporary folder
    when "packed" is not asked for); ``target`` (with "c"): the C runtime cross-compiled for that Cortex-M and run
    under QEMU on ``mcu_images`` inputs, beside an FP32 build (``fp32``: that build's float graph, e.g.
    :func:`lowbit.export.mcu.fp32_twin_of_int_run`; None: no FP32 build); ``c_prefix``: the C API's names
    (``PREFIX_predict``; the ``--target`` build keeps ``lowbit_``)."""
    from ..intmode import int_graph
    from .c_export import find_cc, run_c
    from .int_c import compile_int_c, write_int_c

    formats = check_formats(formats, target)
    say = log or (lambda s: None)
    out = Path(out_dir)
    say("pytorch (integer mode)")
    x, xn, y, ref = torch_reference(model, x, labels, 500)
    graph = int_graph(model, x[:1])
    graph.meta = dict(meta or {})
    with tempfile.TemporaryDirectory() as tmp:
        pdir = out / "packed" if "packed" in formats else Path(tmp)
        sz = save_int_package(graph, pdir)
        pkg = load_int_package(pdir / "model.safetensors")
    rep: dict = {"images": len(x), "formats": list(formats), "out_dir": str(out),
                 "torch": {"accuracy": _accuracy(ref, y)},
                 "packed": {**sz, "weight_codes_bytes": packed_weight_bytes(pkg),
                            **({} if "packed" in formats else {"note": "not kept (--format without packed)"})}}
    say("numpy")
    t0 = time.perf_counter()
    ref_np = IntReference(pkg).run(xn)
    rep["numpy"] = {**compare(ref, ref_np), "bit_exact_images": int(_bits_equal(ref, ref_np).sum()),
                    "accuracy": _accuracy(ref_np, y), "seconds": time.perf_counter() - t0}
    if "c" in formats:
        say("c")
        n_self = min(3, len(xn))
        ce = write_int_c(pkg, out / "c", xn[:n_self], ref_np[:n_self], prefix=c_prefix)
        c = {**ce.to_dict(), "compiled": False, "mem_002": _mem_002(model, x)}
        if find_cc() is not None:
            exe = compile_int_c(out / "c")
            st = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
            n = len(xn) if c_images is None else min(int(c_images), len(xn))
            t0 = time.perf_counter()
            lc = run_c(exe, xn[:n], ref.shape[1])
            c.update({"compiled": True, "self_test": st.stdout.strip(), "self_test_ok": st.returncode == 0,
                      "bit_exact_images": int(_bits_equal(lc, ref_np[:n]).sum()), **compare(ref[:n], lc),
                      "accuracy": _accuracy(lc, None if y is None else y[:n]),
                      "seconds_per_image": (time.perf_counter() - t0) / max(n, 1)})
            px = _pixels(pkg, xn[:n])
            if px is not None:  # raw uint8 pixels in (lowbit_predict_pixels): the same logits, no float at the input
                lp = run_c(exe, px, ref.shape[1], pixels="chw")
                c.update({"pixel_images": n, "pixel_bit_exact_images": int(_bits_equal(lp, ref_np[:n]).sum())})
            exe.unlink()
        else:
            c["note"] = "no C compiler on PATH: code written, not built"
        rep["c"] = c
    if "onnx" in formats:
        say("onnx")
        rep["onnx"] = _onnx(pkg, out / "onnx", xn, ref, y, latency_batch, latency_repeats, calib)
    if target is not None:  # the integer C runtime on a Cortex-M under QEMU, beside the FP32 build
        say(target)
        xs = xn[:mcu_images]
        rep["mcu"] = _mcu(pkg, out / "c" / target, xs, ref_np[:mcu_images], target, fp32=fp32,
                          pixels=_pixels(pkg, xs))
    return _flag_failures({"integer": True, **rep})


def _pixels(graph, x: np.ndarray) -> np.ndarray | None:
    """The raw uint8 pixels of the normalised test images ``x``, where the graph records its input normalisation
    and ``x`` are exactly such images (:func:`lowbit.data.transforms.pixels_of`); else None."""
    from ..data.transforms import pixels_of
    from ..errors import ConfigError
    from .intgraph import input_normalisation

    try:
        mean, std = input_normalisation(graph)
    except ConfigError:
        return None
    p = pixels_of(torch.from_numpy(np.asarray(x, np.float32)), mean, std)
    return None if p is None else p.numpy()


def _onnx(pkg, d: Path, xn, ref, y, latency_batch: int, repeats: int, calib: int) -> dict:
    import onnx

    from . import onnx_export as ox
    from .int_onnx import eff_scales, float_layers, quantize_static_onnx, to_fp32_onnx, to_int_onnx, uint8_weight_layers

    d.mkdir(parents=True, exist_ok=True)
    sc = eff_scales(pkg)
    models = {"integer": to_int_onnx(pkg, sc), "integer_fused": to_int_onnx(pkg, sc, fused=True),
              "fp32": to_fp32_onnx(pkg, sc)}
    for k, m in models.items():
        ox.check(m)
        if k != "fp32":
            onnx.save(m, str(d / f"model_{k}.onnx"))
    models["ort_int8"] = quantize_static_onnx(models["fp32"], xn[:calib], d / "model_fp32.onnx",
                                              d / "model_ort_int8.onnx")
    sessions = {k: ox.session(m) for k, m in models.items()}
    rep = {"dir": str(d), "checker": "ok", "opset": ox.OPSET, "float_conv_layers": float_layers(pkg),
           "uint8_weight_layers": uint8_weight_layers(pkg),
           # the variants that compute the integer network bit for bit (failed_checks holds them to it): ConvInteger
           # always; QLinearConv unless a residual is rounded into the accumulator (no onnxruntime kernel does that)
           "exact": ["integer"] + ([] if any(op.kind == "conv" and len(op.inputs) > 1
                                             and op.attrs.get("residual") != "output" for op in pkg.ops)
                                   else ["integer_fused"])}
    for k, s in sessions.items():
        lo = ox.run(s, xn)
        rep[k] = {**compare(ref, lo), "accuracy": _accuracy(lo, y)}
    if repeats > 0:
        rep.update(onnx_latency(sessions, xn[:latency_batch], repeats))
    return rep


def onnx_latency(sessions: dict, x: np.ndarray, repeats: int) -> dict:
    """Median ms per batch of every session, alternating (``onnx_export.latency``), and each one's
    speed-up over ``fp32``."""
    from . import onnx_export as ox

    lat = ox.latency(sessions, x, repeats)
    return {"latency_batch": len(x), "latency_ms": lat, "speedup_vs_fp32": {k: lat["fp32"] / v for k, v in lat.items()}}


def format_int_report(r: dict) -> str:
    def agree(a):
        return f"{a['images'] - a['mismatches']}/{a['images']} agree"

    lines = []
    if r["torch"].get("accuracy") is not None:
        lines.append(f"PyTorch (integer mode) accuracy {100 * r['torch']['accuracy']:.2f}% on {r['images']} images")
    p = r["packed"]
    lines.append(f"packed          {p['file_bytes']} B file ({p['numbers_bytes']} B numbers, weight codes "
                 f"{p['weight_codes_bytes']} B, header with the embedded manifest {p['header_bytes']} B); "
                 f"model.json {p['manifest_bytes']} B" + (f"; {p['note']}" if p.get("note") else ""))
    n = r["numpy"]
    lines.append(f"NumPy (file)    {n['bit_exact_images']}/{n['images']} images bit-exact with PyTorch; {agree(n)}")
    c = r.get("c", {})
    if c:
        m = c["mem_002"]
        lines.append(f"C               flash {c['flash_bytes']} B + {c['descriptor_bytes']} B descriptors, RAM "
                     f"{c['ram_bytes']} B (arena {c['arena_bytes']}); 002 Mem {m['bytes']:.0f} B: RAM/Mem "
                     f"{c['ram_bytes'] / m['bytes']:.2f}")
    if c.get("compiled"):
        lines.append(f"C vs NumPy      {c['bit_exact_images']}/{c['images']} images bit-exact; {agree(c)} with PyTorch")
    if c.get("pixel_images"):
        lines.append(f"C from pixels   {c['pixel_bit_exact_images']}/{c['pixel_images']} images bit-exact "
                     "(lowbit_predict_pixels: raw uint8 pixels in, no float at the input)")
    o = r.get("onnx")
    if o:
        lines.append(f"ONNX            ConvInteger {agree(o['integer'])}; QLinearConv {agree(o['integer_fused'])}; "
                     f"FP32 twin {agree(o['fp32'])}; ORT quantize_static {agree(o['ort_int8'])} (with PyTorch)")
    if o and "latency_ms" in o:
        lat = o["latency_ms"]
        lines.append(f"onnxruntime     ConvInteger {lat['integer']:.2f} ms, QLinearConv {lat['integer_fused']:.2f} ms, "
                     f"FP32 {lat['fp32']:.2f} ms, quantize_static {lat['ort_int8']:.2f} ms per batch of "
                     f"{o['latency_batch']} (1 thread)")
    lines += onnx_speed_notes(o or {})
    return "\n".join(lines)


def onnx_speed_notes(o: dict) -> list[str]:
    """Report lines for the layers that onnxruntime cannot run on its fast integer kernels (``o``: the
    report's ``onnx`` part)."""
    lines = []
    if o.get("float_conv_layers"):
        f = o["float_conv_layers"]
        lines.append(f"ONNX, slow      {len(f)} layer(s) ({_names(f)}) have integer weights beyond int8 (8-bit SAWB's "
                     "odd levels go up to ±255): onnxruntime runs them as float32 Conv (or, where float32 sums could round, "
                     "as two ConvInteger on 16·hi + lo), not on QLinearConv; 8-bit weights on an int8 grid (lsq, "
                     "uniform) run on its fused integer kernels")
    if o.get("uint8_weight_layers"):
        u = o["uint8_weight_layers"]
        lines.append(f"ONNX, note      {len(u)} layer(s) ({_names(u)}) have weights beyond ±64 on 8-bit codes, which "
                     "onnxruntime's uint8 x int8 kernel can saturate on x86 without VNNI: their weights go as uint8, "
                     "to its exact uint8 x uint8 kernel")
    return lines


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def int_package_table(model: nn.Module, example: torch.Tensor, meta: dict | None = None) -> str:
    """Per-layer size of an integer-mode model's integer package (for ``lowbit info``): weight codes at their bits,
    the code -> integer table, and the int32 constants (bias, multipliers; BatchNorm is folded into them); the total
    is the real ``model.safetensors`` size, header with the embedded manifest included."""
    from ..intmode import int_graph
    from .pack import packed_nbytes

    g = int_graph(model, example)
    g.meta = dict(meta or {})
    with tempfile.TemporaryDirectory() as d:
        sz = save_int_package(g, d)
    rows = [("layer", "weight", "codes B", "table B", "int32 B")]
    for op in g.ops:
        if op.kind != "conv":
            continue
        i32 = 4 * sum(getattr(op, k).size for k in _I32 if getattr(op, k, None) is not None)
        rows.append((op.name, "requantize" if op.attrs.get("role") == "requant" else op.wquant,
                     f"{packed_nbytes(op.codes.size, op.wbits):,}",
                     f"{2 * op.lut.size:,}", f"{i32:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    fmt.insert(1, "-" * len(fmt[0]))
    fmt.append(f"integer package {sz['file_bytes']:,} B ({sz['numbers_bytes']:,} B numbers, weight codes "
               f"{sz['codes_bytes']:,} B, header with the embedded manifest {sz['header_bytes']:,} B); BatchNorm folded "
               "into the int32 bias and multipliers (lowbit export writes this file)")
    return "\n".join(fmt)


def export_int_runs(run_dirs, out: str | Path, limit: int | None = None, c_images: int | None = None,
                    latency_repeats: int = 0, log=print) -> list[dict]:
    """Export integer-mode run folders (benchmark): reports into ``out/<run>.json`` + a table."""
    from ..data import BatchLoader
    from .api import load_run

    out = Path(out)
    reports = []
    for rd in run_dirs:
        rd = Path(rd)
        cfg, data, model = load_run(rd)
        xs, ys = zip(*BatchLoader(data.test, data.info, 1000))
        x, y = torch.cat(xs), torch.cat(ys)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        name = rd.parent.name
        log(f"== export {name} ({len(x)} test images)")
        rep = export_int_model(model, x, out / "export" / name, labels=y, c_images=c_images, log=log,
                               latency_repeats=latency_repeats, meta={"run": str(rd)})
        rep["run"] = name
        (out / f"{name}.json").write_text(json.dumps(rep, indent=1, default=float))
        log(format_int_report(rep))
        reports.append(rep)
    return reports
