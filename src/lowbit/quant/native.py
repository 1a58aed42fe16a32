"""Single-pass C kernels for the activation fake-quantization of training (on by default on CPU).

The eager kernels of :mod:`lowbit.quant.functional` and :mod:`lowbit.methods.mixture` take
several passes over every activation: clamp, divide, round, scale (and, in a DQA mixture, that
per member plus the weighted sum); then a mask pass and reductions in the backward. They run on
every layer input of every step, forward and backward, and are most of what a quantized step
costs more than an FP32 one. ``csrc/actquant.c`` does each direction in one pass: the forward
reads x once and writes q; the backward reads x and the incoming gradient once, writes dx and
accumulates the scalar gradients (PACT's clip, LSQ's step, a mixture's coefficients) in the
same loop, recomputing the quantized values instead of storing them. SAWB's per-step alpha (the
closed form with its check, and the MSE search) is one call each too.

Why C and not ``torch.compile``: the opt-in compiled kernels (:mod:`lowbit.quant.compiled`)
are the same single-pass idea and measured no faster for the whole step here (issue 11,
``benchmarks/results/qat_overhead_core``), with seconds to minutes of compiling per kernel.
The C file (under 400 lines) is compiled once per machine in about a second with the C compiler
that the C export already needs (``gcc``/``cc``, -O3 -march=native, OpenMP on torch's own
``libgomp``), cached under ``$LOWBIT_CACHE_DIR`` (default ``~/.cache/lowbit``).

* Forward values are bit-identical to the eager kernels (the same float32 operations in the same
  order; tests/test_native.py compares them, and so does a self-check when the library is loaded).
  Input gradients are bit-identical too. The scalar
  gradients are the same sums accumulated in double, per thread, in a fixed order: they differ
  from torch's float32 sums in the last bits and are deterministic for a given thread count.
  ``benchmarks/native_kernels.py`` times each kernel against torch.
* Only contiguous float32 CPU tensors of at least :data:`MIN_NUMEL` elements with per-tensor
  (Python float) ranges take this path; everything else stays eager.
* ``LOWBIT_NATIVE=0`` (or :func:`enable(False) <enable>`) turns it off. Without a C compiler, or
  if building fails, the eager kernels are used (one warning says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

#: smaller tensors stay eager (a ctypes call costs a few microseconds, like one eager op)
MIN_NUMEL = 4096
#: most members of one mixture the kernels take (actquant.c's MAXK)
MAX_MEMBERS = 8

SOURCE = Path(__file__).with_name("csrc") / "actquant.c"
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
          "-shared"]

_state: dict = {"on": os.environ.get("LOWBIT_NATIVE", "1") not in ("0", ""), "lib": None, "failed": None}

_f, _d, _i, _i64, _p = ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "lb_mix_fwd": [_p, _p, _i64, _i, _p, _p, _p, _p, _i, _i],
    "lb_mix_bwd": [_p, _p, _p, _i64, _i, _p, _p, _p, _i, _p, _p, _p, _i, _i, _i, _p, _p, _i],
    "lb_lsq_fwd": [_p, _p, _i64, _f, _f, _f, _f, _i],
    "lb_lsq_bwd": [_p, _p, _p, _i64, _f, _f, _f, _f, _f, _f, _i, _p, _i],
    "lb_sq_err_sums": [_p, _i64, _i64, _p, _i64, _f, _p, _i],
    "lb_mse_alpha_rows": [_p, _i64, _i64, _f, _i, _i, _f, _p, _i],
    "lb_sawb_closed": [_p, _i64, _i64, _f, _f, _f, _i, _f, _p, _p, _i],
}


def enable(on: bool = True) -> None:
    """Turn the native kernels on or off for this process."""
    _state["on"] = bool(on)


def cache_dir() -> Path:
    d = os.environ.get("LOWBIT_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowbit"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags (a shared cache directory may be
    seen by different machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(force: bool = False) -> Path:
    """Compile ``csrc/actquant.c`` into the cache (once per source, flags, compiler and CPU) and
    return the shared library's path. Raises RuntimeError with the compiler's message on failure."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(CFLAGS).encode(), cc.encode(), _cpu_key().encode(),
                                     platform.machine().encode(), sys.version.encode()])).hexdigest()[:16]
    out = cache_dir() / f"actquant-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old or the new file, never half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    if _state["lib"] is not None or _state["failed"] is not None:
        return _state["lib"]
    try:
        torch.zeros(1)  # torch (and its libgomp.so.1, which the library then shares) is loaded
        lib = ctypes.CDLL(str(build()))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
        _self_check(lib)
        _state["lib"] = lib
    except Exception as e:  # no compiler, a build error, a foreign library: eager from now on
        _state["failed"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"lowbit: the native activation kernels are not available ({_state['failed']}); "
                      "using the eager kernels (set LOWBIT_NATIVE=0 to silence)", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def _self_check(lib) -> None:
    """Compare every kernel with torch on a fixed input before using the library (milliseconds, once
    per process): a compiler that miscompiles a loop (gcc 12.2 -O3 did, for one form of the masked
    sums here) must not silently train a network on wrong numbers. Values and input gradients must
    be bit-identical (NaN and -0.0 included), the sums agree with float64 to 1e-5 relative."""
    from .functional import clip_mask_grad, clip_values  # (functional imports this module)

    g = torch.Generator().manual_seed(1)
    n, t = 3 * 1024 + 37, 2  # several blocks and a tail; two threads' parts
    x = torch.randn(n, generator=g) * 2
    gr = torch.randn(n, generator=g)
    xs = x.clone()
    xs[5], xs[6] = float("nan"), -0.0

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-5 * (1.0 + abs(b))

    for lo, hi, ks in ((0.0, 1.7, (3,)), (-1.25, 2.5, (3, 15, 255)), (0.0, 3.0, (3, 15))):
        k = len(ks)
        st = [(hi - lo) / m for m in ks]
        c = [0.5, 0.3, 0.2][:k] if k > 1 else [1.0]
        lo_a, hi_a = _farr([lo] * k), _farr([hi] * k)
        for xx, sums in ((xs, False), (x, True)):
            out, gx, gc, ab = torch.empty_like(xx), torch.empty_like(xx), (_d * k)(), (_d * k)()
            lib.lb_mix_fwd(xx.data_ptr(), out.data_ptr(), n, k, lo_a, hi_a, _farr(st), _farr(c), int(k == 1), t)
            lib.lb_mix_bwd(gr.data_ptr(), xx.data_ptr(), gx.data_ptr(), n, k, lo_a, hi_a, _farr(st), 1, _farr([lo]),
                           _farr([hi]), _farr([1.0]), 1, 1, 1, gc, ab, t)
            qs = [clip_values(xx, lo, hi, s_) for s_ in st]  # the eager kernels themselves
            ref = qs[0] if k == 1 else torch.mul(qs[0], c[0])
            for ck, q in zip(c[1:], qs[1:]):  # as the eager mixture's weighted sum
                ref.add_(q, alpha=ck)
            ok = (torch.equal(out.view(torch.int32), ref.view(torch.int32))
                  and torch.equal(gx.view(torch.int32), clip_mask_grad(gr, xx, lo, hi).view(torch.int32)))
            if sums:
                ok = ok and all(close(gc[j], float((gr.double() * qs[j].double()).sum())) for j in range(k))
                ok = ok and close(ab[0], float(torch.where(xx > hi, gr.double(), 0.0).sum()))
            if not ok:
                raise RuntimeError(f"self-check failed: the built kernels disagree with torch (range {lo}..{hi}, "
                                   f"{k} member(s))")
    q, gv, s2 = torch.empty_like(xs), torch.empty_like(xs), (_d * 2)()
    s_, qn, qp = 0.37, 2, 1
    lib.lb_lsq_fwd(xs.data_ptr(), q.data_ptr(), n, 1.0 / s_, s_, float(-qn), float(qp), t)
    lib.lb_lsq_bwd(gr.data_ptr(), x.data_ptr(), gv.data_ptr(), n, 1.0 / s_, s_, float(-qn), float(qp), -qn * s_,
                   qp * s_, 1, s2, t)
    ref = torch.mul(xs, 1.0 / s_).clamp_(-qn, qp).round_().mul_(s_)
    rgv = torch.ops.aten.hardtanh_backward(gr, x, -qn * s_, qp * s_)
    qx = torch.mul(x, 1.0 / s_).clamp_(-qn, qp).round_().mul_(s_)
    if not (torch.equal(q.view(torch.int32), ref.view(torch.int32)) and torch.equal(gv, rgv)
            and close(s2[0], float((gr.double() * qx.double()).sum()))
            and close(s2[1], float((rgv.double() * x.double()).sum()))):
        raise RuntimeError("self-check failed: the built LSQ kernels disagree with torch")
    rows = x.reshape(1, -1)[:, : 3 * 1024].reshape(3, 1024)
    a = rows.abs().amax(1, keepdim=True) * torch.tensor([[0.25, 0.5, 1.0]])
    got = torch.empty_like(a)
    lib.lb_sq_err_sums(rows.data_ptr(), 3, 1024, a.data_ptr(), 3, 127.5, got.data_ptr(), t)
    if not torch.allclose(got.double(), _sq_err_f64(rows, a, 255), rtol=1e-5, atol=0.0):
        raise RuntimeError("self-check failed: the built SAWB error sums disagree with torch")
    from .uniform import _mse_alpha_rows  # (uniform imports this module)

    alpha = torch.empty(3, 1)
    lib.lb_mse_alpha_rows(rows.data_ptr(), 3, 1024, 127.5, 16, 2, 1e-8, alpha.data_ptr(), t)
    was, _state["on"] = _state["on"], False  # the torch search itself
    try:
        ref = _mse_alpha_rows(rows, 8)
    finally:
        _state["on"] = was
    if not equally_good_alphas(rows, alpha, ref, 255):
        raise RuntimeError("self-check failed: the built SAWB search disagrees with torch")


def equally_good_alphas(rows: Tensor, a: Tensor, b: Tensor, n: int, rtol: float = 1e-5) -> bool:
    """Whether the alphas ``a`` and ``b`` (R, 1) are equal or give the same quantization MSE per row
    (float64) to ``rtol``: two searches whose error sums differ in the last bits may pick different
    candidates where two are equally good."""
    if torch.equal(a, b):
        return True
    ea, eb = _sq_err_f64(rows, a, n), _sq_err_f64(rows, b, n)
    return bool(((ea - eb).abs() <= rtol * eb.abs()).all())


def _sq_err_f64(rows: Tensor, a: Tensor, n: int) -> Tensor:
    """lb_sq_err_sums in float64 (the reference): (R, C) sums of squared errors of the rows (R, N) on
    the symmetric n-step grids of the alphas ``a`` (R, C), in the scaled space of _sq_err_sums."""
    s = (n / 2) / a.double()
    v = rows.double()[:, None, :] * s[:, :, None]
    return ((v - v.clamp(-n / 2, n / 2).floor() - 0.5) ** 2).sum(2) / s**2


def available() -> bool:
    """Whether the kernels are on and the library is built and loaded (builds it if needed)."""
    return _state["on"] and _load() is not None


def _tracing() -> bool:
    """Whether torch is recording the forward (``torch.jit.trace``, ``torch.onnx.export``, ``torch.compile``):
    a ctypes call is invisible to a trace, which would keep its result as a constant. Before session 25
    ``torch.onnx.export`` of a quantized ResNet-8 wrote a graph without an input (every image the same logits)."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def active(x: Tensor) -> bool:
    """Whether ``x`` takes the native path (never while torch traces the forward: :func:`_tracing`)."""
    return (_state["on"] and _state["failed"] is None and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() >= MIN_NUMEL and x.is_contiguous() and not _tracing() and _load() is not None)


def _farr(vals) -> ctypes.Array:
    return (_f * len(vals))(*vals)


def _threads() -> int:
    return max(1, torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# entry points (callers check active(x) first)
# ---------------------------------------------------------------------------------------------
def mix_fwd(x: Tensor, lo: list[float], hi: list[float], step: list[float], c: list[float] | None) -> Tensor:
    """Σ_k c_k·Q_k(x) for K clip-round members with float ranges; ``c=None``: K = 1, Q_1(x)."""
    k = len(lo)
    if not 1 <= k <= MAX_MEMBERS:
        raise ValueError(f"native mix_fwd takes 1..{MAX_MEMBERS} members, got {k}")
    out = torch.empty_like(x)
    _state["lib"].lb_mix_fwd(x.data_ptr(), out.data_ptr(), x.numel(), k, _farr(lo), _farr(hi), _farr(step),
                             _farr(c if c is not None else [1.0] * k), int(c is None), _threads())
    return out


def mix_bwd(g: Tensor, x: Tensor, lo: list[float], hi: list[float], step: list[float],
            groups: list[tuple[float, float, float]] | None, plain: bool, want_gc: bool,
            want_above: bool) -> tuple[Tensor | None, list[float], list[float]]:
    """(dx, [Σ g·Q_k(x)], [Σ g·1[x > hi_k]]). ``groups``: the input gradient's clip ranges and
    weights ``(lo, hi, w)``, dx = Σ_r w_r·g·1[lo_r <= x <= hi_r] (``plain``: one range, w = 1);
    None: no dx."""
    g = g.contiguous()
    k = len(lo)
    gx = torch.empty_like(x) if groups else None
    gr = groups or [(0.0, 0.0, 1.0)]
    gc, above = (_d * k)(), (_d * k)()
    _state["lib"].lb_mix_bwd(g.data_ptr(), x.data_ptr(), gx.data_ptr() if gx is not None else None, x.numel(), k,
                             _farr(lo), _farr(hi), _farr(step), len(gr), _farr([r[0] for r in gr]),
                             _farr([r[1] for r in gr]), _farr([r[2] for r in gr]), int(plain), int(want_gc),
                             int(want_above), gc, above, _threads())
    return gx, list(gc), list(above)


def sq_err_sums(rows: Tensor, a: Tensor, n: int) -> Tensor:
    """SAWB's search (:func:`lowbit.quant.uniform._sq_err_sums`): (R, C) sums of squared errors
    of the rows (R, N) on the symmetric n-step grids of the candidate alphas ``a`` (R, C)."""
    a = a.contiguous()
    out = torch.empty_like(a)
    _state["lib"].lb_sq_err_sums(rows.data_ptr(), rows.shape[0], rows.shape[1], a.data_ptr(), a.shape[1],
                                 n / 2, out.data_ptr(), _threads())
    return out


def mse_alpha_rows(rows: Tensor, n: int, grid: int, refine: int, eps: float) -> Tensor:
    """SAWB's whole coarse-to-fine search (:func:`lowbit.quant.uniform._mse_alpha_rows`), (R, 1)."""
    out = rows.new_empty(rows.shape[0], 1)
    _state["lib"].lb_mse_alpha_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], n / 2, grid, refine, eps,
                                    out.data_ptr(), _threads())
    return out


def sawb_closed(rows: Tensor, c1: float, c2: float, n: int, check_max: bool, eps: float) -> tuple[Tensor, Tensor]:
    """SAWB's closed-form alpha per row and the rows where it is not usable (not positive, or with
    ``check_max`` a larger grid MSE than alpha = max|x|): ((R, 1) float, (R, 1) bool)."""
    alpha = rows.new_empty(rows.shape[0], 1)
    bad = torch.empty(rows.shape[0], 1, dtype=torch.uint8)
    _state["lib"].lb_sawb_closed(rows.data_ptr(), rows.shape[0], rows.shape[1], c1, c2, float(n), int(check_max),
                                 eps, alpha.data_ptr(), bad.data_ptr(), _threads())
    return alpha, bad.bool()


def lsq_fwd(v: Tensor, inv: float, s: float, qn: int, qp: int) -> Tensor:
    """round(clamp(v·inv, -qn, qp))·s (LSQ's forward, per-tensor step)."""
    q = torch.empty_like(v)
    _state["lib"].lb_lsq_fwd(v.data_ptr(), q.data_ptr(), v.numel(), inv, s, float(-qn), float(qp), _threads())
    return q


def lsq_bwd(g: Tensor, v: Tensor, inv: float, s: float, qn: int, qp: int, lo: float, hi: float,
            want_gs: bool) -> tuple[Tensor, float, float]:
    """(g·1[lo < v < hi], Σ g·q, Σ gv·v)."""
    g = g.contiguous()
    gv = torch.empty_like(v)
    sums = (_d * 2)()
    _state["lib"].lb_lsq_bwd(g.data_ptr(), v.data_ptr(), gv.data_ptr(), v.numel(), inv, s, float(-qn), float(qp),
                             lo, hi, int(want_gs), sums, _threads())
    return gv, sums[0], sums[1]
