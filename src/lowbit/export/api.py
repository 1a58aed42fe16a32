"""``export_run``: deploy a trained run and prove the deployed model computes what was trained.

    report = export_run("runs/w2a2", formats=("packed", "onnx", "c"))
    print(format_report(report))

1. load the run (``config.yaml`` + ``best.pt``; the method's ``finalize`` runs, as in training);
2. lower it (:mod:`.graph`: BatchNorm folded into full-precision layers, kept as a per-channel
   affine after quantized ones), write the packed file and load it back (:mod:`.package`);
3. from the *loaded* package: the NumPy integer reference, the ONNX QDQ model (and its FP32
   twin) and the C99 code; each one's predictions are compared with the PyTorch fake-quantized
   model on the whole test set (count of disagreeing images, largest logit difference), the C
   outputs with the NumPy reference bit for bit;
4. sizes: packed file vs the limit and vs FP32, C flash and RAM vs seed 002's
   ``Mem = N_p·b_p + N_a·max(b_p, 4)``; onnxruntime latency QDQ vs FP32, measured side by side.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .graph import Graph, WeightQ, lower
from .numpy_ref import IntegerReference
from .pack import packed_nbytes
from .package import Sizes, load_package, op_arrays, save_package

FORMATS = ("packed", "onnx", "c")
BN_NOTE = {"folded": "folded into the float weights", "affine": "per-channel affine after the integer accumulator",
           "": "none"}


def _formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",")]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"export format {', '.join(map(repr, bad)) or '(none)'} unknown; allowed: {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def check_formats(formats, target: str | None = None) -> tuple[str, ...]:
    """The export formats (a list or "packed,onnx,c"), checked with the Cortex-M ``target`` before any work: an
    unknown format or core, a target without the c format, or a missing cross tool is one line."""
    formats = _formats(formats)
    if target is not None:
        from .mcu import check_tools
        from .mcu import target as _target

        _target(target)
        if "c" not in formats:
            raise ConfigError("export: --target needs the c format (--format c)")
        check_tools()
    return formats


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """Prediction agreement of ``out`` with ``ref`` (logits, N x classes)."""
    same = ref.argmax(1) == out.argmax(1)
    return {"images": len(ref), "agreement": float(same.mean()) if len(ref) else float("nan"),
            "mismatches": int((~same).sum()),
            "max_logit_diff": float(np.abs(ref.astype(np.float64) - out).max()) if len(ref) else 0.0}


def _accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean())


def layer_table(graph: Graph, modes: dict[str, str] | None = None) -> list[dict]:
    """Per conv/linear layer: weight, input quantization, what happened to its BN, kernel."""
    rows = []
    for op in graph.conv_ops():
        rows.append({
            "layer": op.name,
            "weight": op.weight.quantizer if isinstance(op.weight, WeightQ) else "fp32",
            "act": f"{op.act.quantizer}{op.act.bits}" if op.act is not None else "fp32",
            "bn": BN_NOTE[op.bn],
            **({"kernel": modes[op.name]} if modes else {}),
        })
    return rows


def _mem_002(model: nn.Module, x: torch.Tensor) -> dict:
    from ..cost import MIN_ACT_BITS, profile
    from ..quantize import layer_bits

    cs = profile(model, x[:1], layer_bits(model))
    act_bits = cs.max_act_elems * max(cs.act_bits, MIN_ACT_BITS)
    return {"bytes": cs.mem_bits / 8, "params_bytes": (cs.mem_bits - act_bits) / 8, "activation_bytes": act_bits / 8,
            "largest_activation": cs.max_act_elems, "act_bits": max(cs.act_bits, MIN_ACT_BITS)}


def torch_reference(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, batch: int):
    """The model's outputs on ``x`` in eval mode, the reference every backend is checked against:
    ``(x as float32, x as NumPy, labels as NumPy or None, outputs as NumPy)``."""
    from ..fit import check_model, model_dtype

    check_model(model)
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"export: the inputs must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() < 2 or len(x) == 0:
        raise ConfigError(f"export: the inputs of shape {tuple(x.shape)} are not a non-empty batch (N, C, H, W)")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (len(x),)):
        raise ConfigError(f"export: labels must be a torch.Tensor of shape ({len(x)},), one per input, got "
                          f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    dt = model_dtype(model)
    if dt is not None and dt != torch.float32:  # before session 27: "the model cannot run inputs of shape ..."
        raise ConfigError(f"export: the model is in {dt}; the exported network and its reference are float32: "
                          "call model.float() before exporting")
    model.eval()
    x = x.float()
    with torch.no_grad():
        try:
            ref = torch.cat([model(x[i: i + batch]) for i in range(0, len(x), batch)]).numpy()
        except RuntimeError as e:  # a shape the network cannot take: torch's reason, on one line
            raise ConfigError(f"export: the model cannot run inputs of shape {tuple(x.shape)}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    return x, x.numpy(), None if labels is None else labels.numpy(), ref


def _keeps_modes(fn):
    """``fn(model, ...)`` leaves every module of ``model`` in the train/eval mode it found it in
    (:func:`lowbit.fit.kept_modes`; the export runs the model in eval mode, and before session 24 a model passed in
    train mode came back in eval mode), and runs it with autocast off (:func:`_autocast_off`)."""
    import functools

    from ..fit import kept_modes

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with kept_modes(model) if isinstance(model, nn.Module) else contextlib.nullcontext(), _autocast_off():
            return fn(model, *args, **kwargs)
    return wrapper


def _autocast_off() -> contextlib.ExitStack:
    """A context with ``torch.autocast`` off: the exported network and its reference are float32. Before session 29
    an export under a caller's autocast ran the reference in bfloat16: a float model's export failed with
    "TypeError: Got unsupported ScalarType BFloat16", an integer model's failed checks that were not there (its
    PyTorch and NumPy references' convs in bfloat16: mismatches, a C self-test of 0/3 samples bit-exact)."""
    stack = contextlib.ExitStack()
    for dev in ("cpu", "cuda"):
        if dev == "cpu" or torch.cuda.is_available():
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


@_keeps_modes
def export_model(model: nn.Module, x: torch.Tensor, out_dir: str | Path, formats=FORMATS,
                 labels: torch.Tensor | None = None, c_images: int | None = 8, batch: int = 500,
                 latency_batch: int = 256, latency_repeats: int = 20, log=None, meta: dict | None = None,
                 target: str | None = None, mcu_images: int = 3, c_prefix: str = "lowbit") -> dict:
    """Export ``model`` (quantized, eval mode) and check every format on the inputs ``x``.

    ``x`` is the evaluation set (normalised float32, N x C x H x W), ``labels`` its classes
    (optional). ``c_images`` inputs go through the compiled C code (None: all of ``x``).
    ``target`` (cortex-m0, cortex-m3, cortex-m4, cortex-m7, cortex-m33, nrf51822; with the "c" format) also cross-compiles the C
    code for that core and runs ``mcu_images`` inputs under QEMU, bit-exact against NumPy, beside the
    FP32 build of the same network (:mod:`lowbit.export.mcu`).
    ``c_prefix`` names the C code's public API (``PREFIX_predict``, ``PREFIX_IN_SIZE``; two models in one firmware
    take two prefixes). ``meta`` (JSON-able) goes into the manifest. Returns a JSON-able report (see
    :func:`format_report`; ``failed_checks`` lists the bit-exactness checks that failed). An integer-mode model
    (``plan.integer: true``) goes to :func:`lowbit.export.int_api.export_int_model`: the integer package, C runtime
    and integer ONNX.
    """
    from ..cost import count_params
    from ..intmode import is_integer

    from .c_export import check_c_prefix

    formats = check_formats(formats, target)
    check_c_prefix(c_prefix)
    stale = [f"{f}/" for f in FORMATS if f not in formats and (Path(out_dir) / f).exists()]
    if stale:  # before session 27 an earlier model's onnx/ or c/ stayed beside this one's packed/ without a word
        warnings.warn(f"export: {out_dir} holds {', '.join(stale)} from an earlier export, which this one (formats "
                      f"{', '.join(formats)}) does not rewrite: they may be another model's; remove them or export "
                      "into a new folder", stacklevel=3)
    if is_integer(model):  # integer mode: the integer package, C runtime and integer ONNX (int_api)
        from .int_api import export_int_model

        return {"integer": True, **export_int_model(
            model, x, out_dir, labels=labels, formats=formats, c_images=c_images, latency_batch=latency_batch,
            latency_repeats=latency_repeats, meta=meta, log=log, target=target, mcu_images=mcu_images,
            c_prefix=c_prefix)}
    say = log or (lambda s: None)
    out = Path(out_dir)
    x, xn, y, ref = torch_reference(model, x, labels, batch)
    graph = lower(model, x[:2])
    graph.meta = dict(meta or {})
    report: dict = {"images": len(x), "formats": list(formats), "out_dir": str(out),
                    "torch": {"accuracy": _accuracy(ref, y)}}

    # packed file, loaded back: everything below comes from the file alone
    tmp = None
    pdir = out / "packed"
    if "packed" not in formats:
        tmp = tempfile.TemporaryDirectory()
        pdir = Path(tmp.name)
    sz = save_package(graph, pdir, fp32_params=count_params(model))
    pkg = load_package(pdir / "model.json")
    if "packed" in formats:
        report["packed"] = {"dir": str(pdir), **sz.to_dict()}

    say("numpy integer reference")
    numpy_ref = IntegerReference(pkg)
    t0 = time.perf_counter()
    ref_np = numpy_ref.run(xn, batch=250)
    report["numpy"] = {**compare(ref, ref_np), "accuracy": _accuracy(ref_np, y),
                       "seconds": time.perf_counter() - t0}
    report["layers"] = layer_table(pkg, numpy_ref.modes())

    if "onnx" in formats:
        say("onnx")
        report["onnx"] = _onnx(pkg, out / "onnx", xn, ref, y, latency_batch, latency_repeats, batch)
    if "c" in formats:
        say("c")
        report["c"] = _c(pkg, out / "c", xn, ref, ref_np, y, c_images, c_prefix)
        report["c"]["mem_002"] = _mem_002(model, x)
        if target is not None:
            say(f"c on {target} (qemu)")
            report["c"]["mcu"] = _mcu(pkg, out / "c" / target, xn[:mcu_images], ref_np[:mcu_images], target)
    if tmp is not None:
        tmp.cleanup()
    return _flag_failures(report)


def _onnx(pkg: Graph, d: Path, xn, ref, y, latency_batch: int, repeats: int, batch: int) -> dict:
    import onnx

    from . import onnx_export as ox

    d.mkdir(parents=True, exist_ok=True)
    mq, mf = ox.to_onnx(pkg, qdq=True), ox.to_onnx(pkg, qdq=False)
    ox.check(mq)
    ox.check(mf)
    onnx.save(mq, str(d / "model_qdq.onnx"))
    onnx.save(mf, str(d / "model_fp32.onnx"))
    sq, sf = ox.session(mq), ox.session(mf)
    t0 = time.perf_counter()
    lo = ox.run(sq, xn, batch)
    seconds = time.perf_counter() - t0
    rep = {"dir": str(d), "checker": "ok", "opset": ox.OPSET, **compare(ref, lo), "accuracy": _accuracy(lo, y),
           "seconds": seconds, "qdq_bytes": (d / "model_qdq.onnx").stat().st_size,
           "fp32_bytes": (d / "model_fp32.onnx").stat().st_size}
    if repeats > 0:  # 0: no latency measurement (as the integer export; before, statistics.median failed on it)
        lat = ox.latency({"qdq": sq, "fp32": sf}, xn[:latency_batch], repeats)
        rep.update({"latency_batch": min(latency_batch, len(xn)), "latency_ms": lat,
                    "latency_ratio": lat["qdq"] / lat["fp32"]})
    return rep


def _c(pkg: Graph, d: Path, xn, ref, ref_np, y, c_images: int | None, prefix: str = "lowbit") -> dict:
    import subprocess

    from .c_export import compile_c, find_cc, run_c, write_c

    n_self = min(3, len(xn))
    ce = write_c(pkg, d, xn[:n_self], ref_np[:n_self], prefix=prefix)
    rep = {**ce.to_dict(), "compiled": False}
    if find_cc() is None:
        rep["note"] = "no C compiler on PATH: code written, not built"
        return rep
    exe = compile_c(d)
    st = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    n = len(xn) if c_images is None else min(int(c_images), len(xn))
    t0 = time.perf_counter()
    lc = run_c(exe, xn[:n], ref.shape[1])
    secs = time.perf_counter() - t0
    exe.unlink()  # a host build product; the sources are the export
    exact = np.all(lc.view(np.uint32) == ref_np[:n].view(np.uint32), axis=1)
    rep.update({"compiled": True, "self_test": st.stdout.strip(), "self_test_ok": st.returncode == 0,
                "bit_exact_images": int(exact.sum()), **compare(ref[:n], lc),
                "accuracy": _accuracy(lc, None if y is None else y[:n]), "seconds_per_image": secs / max(n, 1)})
    return rep


def _mcu(pkg, d: Path, xs, ref_np, target: str, fp32: Graph | None = None, pixels=None) -> dict:
    """The C code cross-compiled for a Cortex-M and run under QEMU, beside its FP32 build (``fp32``: that
    build's graph; by default :func:`~lowbit.export.mcu.fp32_graph` of a float ``pkg``, none for an integer one);
    ``pixels``: the images' raw
    uint8 pixels, also run through an integer build's ``lowbit_predict_pixels``."""
    from .mcu import DoesNotFit, build_and_run, fp32_graph

    rep = build_and_run(pkg, d, xs, ref_np, target, pixels=pixels)
    if fp32 is None and not isinstance(pkg, Graph):  # an integer graph has no float twin of its own
        return rep
    fg = fp32_graph(pkg) if fp32 is None else fp32
    try:
        fp = build_and_run(fg, d.parent / f"{target}-fp32", xs, IntegerReference(fg).run(xs), target)
    except DoesNotFit as e:  # a real part's memory (nrf51822) holds the quantized build but not the FP32 one
        rep["fp32"] = {"error": e.reason}
        return rep
    keep = ("flash_bytes", "static_ram_bytes", "stack_bytes", "ram_bytes", "bit_exact_images", "images",
            "instructions_per_inference", "dir")
    rep["fp32"] = {k: fp[k] for k in keep}
    rep["fewer_instructions_than_fp32"] = fp["instructions_per_inference"] / rep["instructions_per_inference"]
    return rep


def load_run(run_dir: str | Path):
    """(cfg, data, model) of a run folder: ``lowbit.train.load_run`` without the checkpoint."""
    from ..train import load_run as _load

    cfg, data, model, _ = _load(run_dir)
    return cfg, data, model


def export_run(run_dir: str | Path, formats=FORMATS, out_dir: str | Path | None = None, *,
               limit: int | None = None, c_images: int | None = 8, latency_batch: int = 256,
               latency_repeats: int = 20, log=None, target: str | None = None, mcu_images: int = 3,
               c_prefix: str = "lowbit") -> dict:
    """Export a run folder (``config.yaml`` + ``best.pt``) into ``out_dir`` (default
    ``RUN_DIR/export``) and check it on the run's test set (the first ``limit`` images); ``c_prefix``: as
    :func:`export_model`."""
    from ..data import BatchLoader
    from .c_export import check_c_prefix

    formats = check_formats(formats, target)  # before any work
    check_c_prefix(c_prefix)
    from ..train import load_run as _load

    cfg, data, model, ck = _load(run_dir)
    source = checkpoint_source(ck)
    if cfg.plan.integer:  # integer-mode run: the integer package, C runtime and integer ONNX
        from .int_api import export_int_model

        xs, ys = zip(*BatchLoader(data.test, data.info, 1000))
        x, y = torch.cat(xs)[:limit], torch.cat(ys)[:limit]
        out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
        fp32 = None
        if target is not None:  # the FP32 build beside the integer one on the core
            from .mcu import fp32_twin_of_int_run

            fp32 = fp32_twin_of_int_run(cfg, data.info, run_dir, x)[1]
        return {"run_dir": str(run_dir), "integer": True, **export_int_model(
            model, x, out, labels=y, formats=formats, c_images=c_images, latency_batch=latency_batch,
            latency_repeats=latency_repeats, log=log, target=target, mcu_images=mcu_images, fp32=fp32,
            meta=int_run_meta(run_dir, cfg, data.info, ck), c_prefix=c_prefix), **source}
    loader = BatchLoader(data.test, data.info, 1000)
    xs, ys = zip(*loader) if len(data.test) else ((), ())
    if not xs:
        raise ConfigError(f"{run_dir}: the test split is empty; nothing to check the export on")
    x, y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    from ..quantize import ends_full_precision

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    plan = cfg.plan
    info = data.info
    meta = {"run": str(run_dir), "model": cfg.model.name, "model_options": cfg.model.options, "dataset": cfg.data.name,
            "classes": info.num_classes, "weight": plan.weight.label() if plan.weight else "fp32",
            "act": plan.act.label() if plan.act else "fp32", "method": plan.method.name,
            "input_normalisation": _normalisation(info), **source}
    report = export_model(model, x, out, formats, labels=y, c_images=c_images, latency_batch=latency_batch,
                          latency_repeats=latency_repeats, log=log, meta=meta, target=target, mcu_images=mcu_images,
                          c_prefix=c_prefix)
    report = {"run_dir": str(run_dir), "model": cfg.model.name, "dataset": cfg.data.name,
              "weight": plan.weight.label() if plan.weight else "fp32",
              "act": plan.act.label() if plan.act else "fp32",
              "first_last_fp": ends_full_precision(model), **source, **report}
    return report


def checkpoint_source(ck: dict) -> dict:
    """Which weights an export holds: best.pt's epoch (1-based) and checksum, so that a package can be told from one
    of a later training into the same folder (before session 28 the files recorded only the folder's path)."""
    return {"epoch": ck.get("epoch"), "checkpoint_sha256": ck.get("sha256")}


def int_run_meta(run_dir, cfg, info, ck: dict) -> dict:
    """What an integer-mode run's package records beside its numbers: the run and its checkpoint, the model and the
    data's normalisation (the C code's ``lowbit_predict_pixels`` is built from it)."""
    return {"run": str(run_dir), **checkpoint_source(ck), "model": cfg.model.name, "dataset": cfg.data.name,
            "classes": info.num_classes, "weight": cfg.plan.weight.label() if cfg.plan.weight else "fp32",
            "act": cfg.plan.act.label() if cfg.plan.act else "fp32", "input_normalisation": _normalisation(info)}


def _normalisation(info) -> dict:
    """The input normalisation of a run's data, as the packed files record it (an integer package's
    ``lowbit_predict_pixels`` is built from it: :func:`lowbit.export.intgraph.pixel_table`)."""
    return {"formula": "x = (pixel / 255 - mean) / std, per channel, C x H x W",
            "mean": list(info.mean), "std": list(info.std)}


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"


def _agree(r: dict) -> str:
    return (f"{r['images'] - r['mismatches']}/{r['images']} predictions agree with PyTorch "
            f"({100 * r['agreement']:.2f}%, {r['mismatches']} mismatches), max |Δlogit| {r['max_logit_diff']:.2g}")


def failed_checks(report: dict) -> list[str]:
    """The exactness checks of an export report that failed, one short line each (empty: all passed): the integer
    package's NumPy network against PyTorch, the C build's self-test and its logits against NumPy (from floats and
    from raw pixels), a Cortex-M build's, and the integer ONNX models that claim to be exact (``onnx["exact"]``).
    An export that fails one is wrong: ``lowbit export`` exits 1."""
    out = []
    n = report.get("numpy") or {}
    if report.get("integer") and n and n["bit_exact_images"] < n["images"]:
        out.append(f"NumPy (packed file) {n['bit_exact_images']}/{n['images']} images bit-exact with PyTorch")
    c = report.get("c") or {}
    if c.get("compiled"):
        if not c.get("self_test_ok", True):
            out.append(f"C self-test failed: {c.get('self_test') or 'no output'}")
        if c["bit_exact_images"] < c["images"]:
            out.append(f"C {c['bit_exact_images']}/{c['images']} images bit-exact with NumPy")
        if c.get("pixel_images") and c["pixel_bit_exact_images"] < c["pixel_images"]:
            out.append(f"C from pixels {c['pixel_bit_exact_images']}/{c['pixel_images']} images bit-exact with NumPy")
    o = report.get("onnx") or {}
    for k in o.get("exact", []):
        if o[k]["max_logit_diff"] != 0:
            out.append(f"ONNX ({'QLinearConv' if k == 'integer_fused' else 'ConvInteger'}) logits differ from PyTorch's "
                       f"(max |Δ| {o[k]['max_logit_diff']:.3g}, {o[k]['mismatches']}/{o[k]['images']} predictions differ)")
    for m in (report.get("mcu"), c.get("mcu")):
        if m and m["bit_exact_images"] < m["images"]:
            out.append(f"{m['target']} {m['bit_exact_images']}/{m['images']} images bit-exact with NumPy")
        if m and m.get("pixel_images") and m["pixel_bit_exact_images"] < m["pixel_images"]:
            out.append(f"{m['target']} from pixels {m['pixel_bit_exact_images']}/{m['pixel_images']} images bit-exact")
    return out


def _flag_failures(report: dict) -> dict:
    """``report["failed_checks"]`` (:func:`failed_checks`), and a warning when there are any."""
    report["failed_checks"] = failed_checks(report)
    if report["failed_checks"]:
        warnings.warn(f"export: {len(report['failed_checks'])} check(s) failed: " + "; ".join(report["failed_checks"]),
                      stacklevel=3)
    return report


def format_report(report: dict) -> str:
    """The report of :func:`export_run` / :func:`export_model` as a few lines of text."""
    ep = f", best.pt of epoch {report['epoch']}" if report.get("epoch") is not None else ""
    if report.get("integer"):
        from .int_api import format_int_report

        return (f"integer export of {report.get('run_dir', 'a model')}{ep and f' ({ep[2:]})'} -> {report['out_dir']}\n"
                + format_int_report(report) + (f"\n{format_mcu(report['mcu'])}" if report.get("mcu") else "")
                + _failures(report))
    lines = []
    if "run_dir" in report:
        fl = ", first conv / last linear FP32" if all(report.get("first_last_fp", [False])) else ""
        lines.append(f"export of {report['run_dir']} ({report['model']}, weight {report['weight']}, "
                     f"act {report['act']}{fl}{ep}) -> {report['out_dir']}")
    acc = report["torch"].get("accuracy")
    if acc is not None:
        lines.append(f"PyTorch         accuracy {100 * acc:.2f}% on {report['images']} test images (fake-quantized)")
    layers = report.get("layers", [])
    folded = sum(r["bn"].startswith("folded") for r in layers)
    kept = sum(r["bn"].startswith("per-channel") for r in layers)
    n_int = sum(r.get("kernel") == "int" for r in layers)
    lines.append(f"BatchNorm       folded into {folded} full-precision layer(s); kept as per-channel affine after "
                 f"the integer accumulator in {kept} quantized layer(s)")
    p = report.get("packed")
    if p:
        lines.append(
            f"packed          {_kib(p['file_bytes'])} (codes {_kib(p['codes_bytes'])} + float32 {_kib(p['float_bytes'])}"
            f" + header {p['header_bytes']} B) vs FP32 {_kib(p['fp32_bytes'])} ({p['vs_fp32']:.1f}x smaller); "
            f"limit {_kib(p['limit_bytes'])}: {'within' if p['within_limit'] else 'OVER'}; manifest {_kib(p['manifest_bytes'])}")
    nr = report["numpy"]
    lines.append(f"NumPy integer   {n_int}/{len(layers)} layers on integer MACs; {_agree(nr)}"
                 + (f"; accuracy {100 * nr['accuracy']:.2f}%" if nr.get("accuracy") is not None else ""))
    o = report.get("onnx")
    if o:
        lines.append(f"ONNX QDQ        checker {o['checker']}, opset {o['opset']}; {_agree(o)}")
        if "latency_ms" in o:
            lines.append(f"onnxruntime     {o['latency_ms']['qdq']:.2f} ms (QDQ) vs {o['latency_ms']['fp32']:.2f} ms "
                         f"(FP32 ONNX) per batch of {o['latency_batch']}: {o['latency_ratio']:.2f}x")
    c = report.get("c")
    if c:
        m = c["mem_002"]
        lines.append(f"C99             flash {_kib(c['flash_bytes'])}, RAM {_kib(c['ram_bytes'])} (float32 activations "
                     f"{_kib(c['arena_bytes'])} + scratch {c['scratch_bytes']} B); 002 Mem {_kib(m['bytes'])} "
                     f"(params {_kib(m['params_bytes'])} + largest activation {m['largest_activation']} x "
                     f"{m['act_bits']} bit {_kib(m['activation_bytes'])})")
        if c.get("compiled"):
            lines.append(f"C vs NumPy      {c['bit_exact_images']}/{c['images']} images bit-exact (self-test: "
                         f"{c['self_test']}); {_agree(c)}")
        else:
            lines.append(f"C               {c.get('note', 'not built')}")
        if c.get("mcu"):
            lines.append(format_mcu(c["mcu"]))
    return "\n".join(lines) + _failures(report)


def _failures(report: dict) -> str:
    f = report.get("failed_checks", failed_checks(report))
    return "".join(f"\nCHECK FAILED    {x}" for x in f)


def _fewer(ratio: float) -> str:
    """FP32 instructions / this build's, in words (below 1 the quantized build runs more)."""
    return f"{ratio:.2f}x fewer" if ratio >= 1 else f"{1 / ratio:.2f}x MORE instructions"


def format_mcu(r: dict) -> str:
    """One Cortex-M build (:func:`lowbit.export.mcu.build_and_run`, plus its FP32 build) as two lines."""
    from collections import Counter

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(Counter(r["kernels"].values()).items()))
    line = (f"{r['target']:<15} (qemu {r['machine']}) {r['bit_exact_images']}/{r['images']} images bit-exact vs NumPy; "
            f"flash {_kib(r['flash_bytes'])}, RAM {_kib(r['ram_bytes'])} (static {_kib(r['static_ram_bytes'])} + "
            f"stack {r['stack_bytes']} B); {r['instructions_per_inference'] / 1e6:.2f} M instructions/inference; "
            f"kernels: {kinds}")
    if r.get("packed_kernels_did_not_fit"):
        line += f" (the bit-packed kernels' build did not fit: {r['packed_kernels_did_not_fit']})"
    if r.get("pixel_images"):
        line += (f"\n{'':<15} from raw uint8 pixels (lowbit_predict_pixels, no float at the input): "
                 f"{r['pixel_bit_exact_images']}/{r['pixel_images']} images bit-exact, "
                 f"{r['pixel_instructions_per_inference'] / 1e6:.2f} M instructions/inference")
    fp = r.get("fp32")
    if fp and fp.get("error"):
        line += f"\n{'':<15} FP32 build: {fp['error']}"
    elif fp:
        line += (f"\n{'':<15} FP32 build: flash {_kib(fp['flash_bytes'])}, RAM {_kib(fp['ram_bytes'])}, "
                 f"{fp['instructions_per_inference'] / 1e6:.2f} M instructions/inference "
                 f"(the quantized build: {_fewer(r['fewer_instructions_than_fp32'])})")
    return line


def packed_size_table(model: nn.Module) -> str:
    """Per-layer packed size of a quantized model and the total vs FP32 (for ``lowbit info``).

    Weight codes at the trained bits, plus the float32 numbers each layer keeps (level set,
    per-channel BN affine of quantized layers; folded weights and biases of full-precision ones);
    the total is the real ``model.safetensors`` size, header included.
    """
    from ..cost import count_params

    graph = lower(model, None, acts=False)
    with tempfile.TemporaryDirectory() as d:
        sz: Sizes = save_package(graph, d, fp32_params=count_params(model))
    modules = dict(model.named_modules())
    rows = [("layer", "weight", "params", "codes B", "float32 B", "FP32 B")]
    fp32_sum = 0
    seen: set[str] = set()
    for op in graph.ops:
        floats = sum(a.size for a in op_arrays(op).values())
        if op.kind == "conv":
            src = op.attrs.get("module", op.name)  # a module the forward calls again: 'c', then 'c.call2' (session 24)
            m, first = modules[src], src not in seen
            seen.add(src)
            params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            fp32 = 4 * params * first + (8 * op.weight.shape[0] if op.bn else 0)  # + BN gamma, beta
            wq = op.weight if isinstance(op.weight, WeightQ) else None
            codes = packed_nbytes(wq.codes.size, wq.bits) if wq else 0
            label = wq.quantizer if wq else "fp32"
            note = f" (BN {'folded' if op.bn == 'folded' else 'kept'})" if op.bn else ""
            rows.append((op.name + note, label, f"{params:,}" if first else f"{src}'s", f"{codes:,}" if wq else "-",
                         f"{4 * floats:,}", f"{fp32:,}"))
        elif op.kind == "affine":
            fp32 = 8 * op.scale.size
            rows.append((op.name, "BN", f"{2 * op.scale.size:,}", "-", f"{4 * floats:,}", f"{fp32:,}"))
        else:
            continue
        fp32_sum += fp32
    other = sz.fp32_bytes - fp32_sum
    if other > 0:
        rows.append(("(other parameters)", "fp32", f"{other // 4:,}", "-", "-", f"{other:,}"))
    header = sz.file_bytes - sz.codes_bytes - sz.float_bytes
    rows.append(("total", f"{sz.quantized_params:,} quantized", f"{sz.fp32_params:,}", f"{sz.codes_bytes:,}",
                 f"{sz.float_bytes:,}", f"{sz.fp32_bytes:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    fmt.insert(1, "-" * len(fmt[0]))
    fmt.insert(len(fmt) - 1, "-" * len(fmt[0]))
    fmt.append(f"packed file {sz.file_bytes:,} B = codes + float32 + {header} B header "
               f"({sz.fp32_bytes / sz.file_bytes:.1f}x smaller than FP32 {sz.fp32_bytes:,} B); "
               f"limit 1.02 x {sz.ideal_bits / 8:,.0f} B + float32 = {sz.limit_bytes:,.0f} B: "
               f"{'within' if sz.file_bytes <= sz.limit_bytes else 'OVER'}")
    return "\n".join(fmt)
