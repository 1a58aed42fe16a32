"""The native activation kernels (lowbit.quant.native, issue 11 speed): the same values and input
gradients as the eager kernels bit for bit, the scalar gradients the same sums (float64 reference),
used by training, and a failed build or a wrong kernel falls back to eager instead of training on
wrong numbers."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from lowbit.methods.mixture import fused_mix
from lowbit.quant import build_quantizer, native
from lowbit.quant.functional import _ClipRound, _LSQFn
from quant_helpers import range_edges

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels are not built")


@pytest.fixture
def native_state():
    saved = dict(native._state)
    yield native
    native._state.clear()
    native._state.update(saved)


def both(fn, threads=1):
    """fn() with the eager kernels, then with the native ones (same thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.enable(False)
        a = fn()
        native.enable(True)
        b = fn()
    finally:
        native.enable(True)
        torch.set_num_threads(before)
    return a, b


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def edges(lo: float, hi: float) -> torch.Tensor:
    """The clip edges of quant_helpers.range_edges, and -0.0 (whose sign the kernels must keep)."""
    return torch.cat([range_edges(lo, hi), torch.tensor([-0.0])])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("low", [0.0, -0.7])
def test_clip_round_native_matches_eager(low, threads):
    torch.manual_seed(0)
    n = 3 * 4096 + 13  # blocks, two threads' parts and a tail
    x = torch.randn(n) * 2
    x[:8] = edges(low, 1.3)
    x[100:140] = torch.arange(40) * (2.0 / 3) * 1.3 / 3  # exact half-steps: ties go to even
    g = torch.randn(n)
    assert native.active(x)

    def run():
        xr, hr = x.clone().requires_grad_(True), torch.tensor(1.3, requires_grad=True)
        out = _ClipRound.apply(xr, torch.tensor(low), hr, 3)
        out.backward(g)
        return out.detach(), xr.grad, hr.grad

    (o0, gx0, gh0), (o1, gx1, gh1) = both(run, threads)
    assert torch.equal(bits(o0), bits(o1))
    assert torch.equal(bits(gx0), bits(gx1))
    want = float(torch.where(x > 1.3, g.double(), 0.0).sum())
    assert abs(float(gh1) - want) <= 1e-5 * (1 + abs(want))
    assert abs(float(gh0) - want) <= 1e-4 * (1 + abs(want))  # eager's float32 sum, for scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qn,qp", [(0, 3), (2, 1), (128, 127)])
def test_lsq_native_matches_eager(qn, qp, threads):
    torch.manual_seed(1)
    s = torch.tensor(0.37)
    sf = float(s)
    n = 2 * 4096 + 5
    v = torch.randn(n) * sf * (qp + 1)
    v[:8] = edges(-qn * sf, qp * sf)
    v[8:51] = (torch.arange(43) - 21) * 0.5 * sf
    g = torch.randn(n)

    def run():
        vr, sr = v.clone().requires_grad_(True), s.clone().requires_grad_(True)
        out = _LSQFn.apply(vr, sr, qn, qp, 0.01)
        out.backward(g)
        return out.detach(), vr.grad, sr.grad

    (o0, gv0, gs0), (o1, gv1, gs1) = both(run, threads)
    assert torch.equal(bits(o0), bits(o1)) and torch.equal(bits(gv0), bits(gv1))
    q = o0.double()
    want = float(((g.double() * q).sum() - (gv0.double() * v.double()).sum()) / sf * 0.01)
    assert abs(float(gs1) - want) <= 1e-5 * (1 + abs(want))


@pytest.mark.parametrize("kind", ["pact", "minmax"])
@pytest.mark.parametrize("threads", [1, 2])
def test_mixture_native_matches_eager(kind, threads):
    """PACT members: three ranges (three gradient groups, clip gradients); min-max members: one
    shared running range with a negative low end (one group). Forward and dx bit-identical."""
    torch.manual_seed(2)
    x = torch.randn(6, 16, 13, 17)
    if kind == "pact":
        x = x.relu_() * 2
    g = torch.randn_like(x)

    def members():
        if kind == "pact":
            return [build_quantizer("pact", b, role="act", init=i) for b, i in ((2, 1.5), (4, 2.5), (8, 3.0))]
        return [build_quantizer("minmax", b, role="act") for b in (2, 4, 8)]

    def run():
        ms = members()
        xr = x.clone().requires_grad_(True)
        c = torch.softmax(torch.tensor([0.3, -0.2, 0.1]), 0).requires_grad_(True)
        out = fused_mix(xr, c, ms)
        out.backward(g)
        extra = [m.alpha.grad for m in ms] if kind == "pact" else [m.running_min.clone() for m in ms]
        return out.detach(), xr.grad, c.grad, extra

    (o0, gx0, gc0, e0), (o1, gx1, gc1, e1) = both(run, threads)
    assert torch.equal(bits(o0), bits(o1))
    assert torch.equal(bits(gx0), bits(gx1))
    torch.testing.assert_close(gc1, gc0, rtol=1e-5, atol=1e-4)
    for a, b in zip(e0, e1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_training_runs_the_native_kernels(monkeypatch):
    """A quantized model's step goes through the native kernels (forward and backward)."""
    from lowbit.models import create_model
    from lowbit.quantize import quantize

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = native.mix_fwd, native.mix_bwd

    def count_fwd(x, *a, **k):
        calls["fwd"] += x.shape[0] == 8  # the activations (SAWB's larger weights go native too)
        return fwd(x, *a, **k)

    def count_bwd(g, x, *a, **k):
        calls["bwd"] += x.shape[0] == 8
        return bwd(g, x, *a, **k)

    monkeypatch.setattr(native, "mix_fwd", count_fwd)
    monkeypatch.setattr(native, "mix_bwd", count_bwd)
    torch.manual_seed(0)
    m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=28),
                 {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    m(torch.randn(8, 1, 28, 28)).sum().backward()
    assert calls["fwd"] == 8 and calls["bwd"] == 8  # every quantized conv input (6 + 2 shortcuts), both ways


def test_a_traced_forward_does_not_call_the_native_kernels(tmp_path):
    """Session 25 (a PyTorch user exporting with torch.onnx.export directly): a ctypes call is invisible to a
    trace, so the TorchScript exporter kept the first big activation as a constant and wrote a graph without an
    input (every image the same logits). While torch traces, the quantizers take the torch path."""
    import warnings

    import numpy as np
    import onnxruntime as ort

    from lowbit.models import create_model
    from lowbit.quantize import quantize

    torch.manual_seed(0)
    m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=28),
                 {"weight": {"name": "sawb", "bits": 4}, "act": {"name": "lsq", "bits": 4}})
    with torch.no_grad():
        m(torch.randn(8, 1, 28, 28))
    m.eval()
    assert native.active(torch.zeros(1, 16, 28, 28))  # the stem's output takes the native path in eager mode
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 1, 28, 28),), str(path), dynamo=False, input_names=["x"])
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["x"]
    outs = []
    for seed in (1, 2):
        x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        outs.append(s.run(None, {"x": x.numpy()})[0])
        np.testing.assert_allclose(outs[-1], m(x).detach().numpy(), atol=1e-5)
    assert not np.allclose(outs[0], outs[1])


def test_a_failed_build_falls_back_to_eager(native_state, monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native._state.update(lib=None, failed=None, on=True)
    x = torch.randn(4, 64, 64).relu_()
    with pytest.warns(RuntimeWarning, match="native activation kernels are not available"):
        assert not native.active(x)
    assert not native.active(x)  # decided once
    out = _ClipRound.apply(x, torch.tensor(0.0), torch.tensor(1.5), 3)
    native.enable(False)
    assert torch.equal(out, _ClipRound.apply(x, torch.tensor(0.0), torch.tensor(1.5), 3))


def test_the_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    p = native.build()
    mtime = p.stat().st_mtime_ns
    assert native.build() == p and p.stat().st_mtime_ns == mtime
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temporary file left


def test_the_self_check_rejects_a_wrong_kernel():
    """One ULP wrong in one output element: the library is refused."""
    lib = native._state["lib"]
    assert lib is not None

    class OffByOne:
        def __getattr__(self, name):
            return getattr(lib, name)

        @staticmethod
        def lb_mix_fwd(x, out, n, *rest):
            lib.lb_mix_fwd(x, out, n, *rest)
            p = ctypes.cast(out, ctypes.POINTER(ctypes.c_float))
            p[n - 1] = float(torch.nextafter(torch.tensor(p[n - 1]), torch.tensor(math.inf)))

    native._self_check(lib)
    with pytest.raises(RuntimeError, match="self-check failed"):
        native._self_check(OffByOne())


def test_sawb_error_sums_native_match_eager():
    """SAWB's MSE search (003 eq. 12): the candidates' error sums agree with the eager batched
    version to float rounding, and the chosen alphas are the same on conv-weight-like tensors."""
    from lowbit.quant import uniform

    torch.manual_seed(3)
    for shape in [(64, 64, 3, 3), (32, 16, 3, 3), (10, 1000)]:
        w = torch.randn(shape) * 0.05
        for per_channel in (False, True):
            rows = w.flatten(1) if per_channel else w.reshape(1, -1)
            a = rows.abs().amax(1, keepdim=True) * torch.linspace(0.1, 1.0, 7)
            native.enable(False)
            e0, a0 = uniform._sq_err_sums(rows, a, 255), uniform.mse_optimal_alpha(w, 8, per_channel)
            native.enable(True)
            assert native.active(rows) == (rows.numel() >= native.MIN_NUMEL)
            e1, a1 = uniform._sq_err_sums(rows, a, 255), uniform.mse_optimal_alpha(w, 8, per_channel)
            torch.testing.assert_close(e1, e0, rtol=1e-5, atol=0.0)
            # the same alpha, or (sums in another order) one exactly as good
            assert native.equally_good_alphas(rows, a1.reshape(-1, 1), a0.reshape(-1, 1), 255)
            for b in (3, 5):  # the whole search, at other widths (SAWB's fallback rows use it at 2-4 bits)
                native.enable(False)
                r0 = uniform._mse_alpha_rows(rows, b)
                native.enable(True)
                assert native.equally_good_alphas(rows, uniform._mse_alpha_rows(rows, b), r0, 2**b - 1)
    # and the check itself is not empty: a clearly worse alpha is refused
    rows = w.reshape(1, -1)
    a = uniform._mse_alpha_rows(rows, 8)
    assert not native.equally_good_alphas(rows, a * 1.3, a, 255)


def test_sawb_closed_form_native_matches_eager():
    """SAWB's closed form at 2-4 bits (the moments, and in auto mode the check against alpha =
    max|w|): the same alphas to float rounding and the same rows flagged, per tensor and per row."""
    torch.manual_seed(4)
    for shape in [(64, 64, 3, 3), (32, 16, 3, 3), (4, 2000)]:
        for scale in (0.05, 1.0):
            w = torch.randn(shape) * scale
            w[0] = 0.0  # a dead row: the closed form is 0, not usable
            for b in (2, 3, 4):
                for per_channel in (False, True):
                    for mode in ("auto", "closed_form"):
                        q = build_quantizer("sawb", b, role="weight", per_channel=per_channel, alpha=mode)
                        native.enable(False)
                        a0 = q.alpha(w)
                        native.enable(True)
                        a1 = q.alpha(w)
                        torch.testing.assert_close(a1, a0, rtol=1e-5, atol=0.0)
