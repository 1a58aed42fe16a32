"""The activation kernels' fast paths (issue 11, speed): the same values and gradients as the
plain mask formulas, at the range edges too, and the fused activation mixture against the
per-member one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.methods.mixture import QuantizerMixture
from lowbit.models import create_model
from lowbit.quant.functional import _ClipRound, _LSQFn
from lowbit.quantize import quant_state, quantize
from quant_helpers import range_edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low", [0.0, -0.7])
def test_clip_round_backward_is_the_mask_formula(dtype, low):
    torch.manual_seed(0)
    low_t, high_t = torch.tensor(low), torch.tensor(1.3)
    lo, hi = float(low_t), float(high_t)
    x = torch.randn(2000, dtype=dtype) * 2
    x[:7] = range_edges(lo, hi, dtype)
    g = torch.randn(2000, dtype=dtype)
    xr, hr = x.clone().requires_grad_(True), high_t.clone().requires_grad_(True)
    _ClipRound.apply(xr, low_t, hr, 3).backward(g)
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(xr.grad, g * inside)
    assert torch.equal(hr.grad, (g * (x > hi)).sum().to(hr.grad.dtype))
    # nothing below lo (a post-ReLU input): the clip gradient is sum(g) − sum(g·inside), the same terms
    xp = x.clamp(min=lo)
    xr, hr = xp.clone().requires_grad_(True), high_t.clone().requires_grad_(True)
    _ClipRound.apply(xr, low_t, hr, 3).backward(g)
    assert torch.equal(xr.grad, g * ((xp >= lo) & (xp <= hi)))
    want = float((g.double() * (xp > hi)).sum())
    tol = 16 * torch.finfo(dtype).eps * float(g.abs().sum()) + torch.finfo(hr.dtype).eps * abs(want)
    assert abs(float(hr.grad) - want) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qn,qp", [(0, 3), (2, 1), (0, 255), (128, 127)])
def test_lsq_backward_is_the_mask_formula(dtype, qn, qp):
    torch.manual_seed(1)
    s = torch.tensor(0.37, dtype=dtype)
    sf = float(s)
    lo, hi = -qn * sf, qp * sf
    v = torch.randn(3000, dtype=dtype) * sf * (qp + 1)
    v[:7] = range_edges(lo, hi, dtype)
    v[7:50] = (torch.arange(43, dtype=dtype) - 21) * 0.5 * sf
    g = torch.randn(3000, dtype=dtype)
    vr, sr = v.clone().requires_grad_(True), s.clone().requires_grad_(True)
    q = _LSQFn.apply(vr, sr, qn, qp, 0.01)
    q.backward(g)
    above, below = v >= hi, v <= lo
    inside = ~(above | below)
    assert torch.equal(vr.grad, g * inside)
    # eq. 3 with the masks, in float64: the kernel sums g·q and g·1[inside]·v instead (another
    # order of the same terms), so it agrees to the dtype's rounding of those sums
    g64, v64, q64, s64 = g.double(), v.double(), q.detach().double(), float(s)
    gs = (torch.dot(g64 * inside, q64 - v64) / s64 + qp * (g64 * above).sum() - qn * (g64 * below).sum()) * 0.01
    scale = (g64.abs() * (q64.abs() + v64.abs())).sum() / s64 * 0.01
    eps = torch.finfo(dtype).eps
    assert abs(float(sr.grad) - float(gs)) <= 8 * eps * float(scale)
    assert sr.grad.dtype == dtype


MM = lambda b: {"name": "minmax", "bits": b}  # noqa: E731
PACT = lambda b: {"name": "pact", "bits": b, "init": 2.0}  # noqa: E731
PLANS = {
    "minmax": {"weight": MM(2), "act": MM(2),
               "method": {"name": "dqa", "mixture": [MM(4)], "act_mixture": [MM(4), MM(8)]}},
    "pact": {"weight": MM(2), "act": PACT(2),
             "method": {"name": "dqa", "mixture": [MM(4)], "act_mixture": [PACT(4), PACT(8)]}},
    "fp+lsq": {"weight": MM(2), "act": MM(2),
               "method": {"name": "dqa", "mixture": [MM(4)], "act_mixture": [{"name": "lsq", "bits": 4}, {"name": "fp"}]}},
    "br": {"weight": MM(2), "act": MM(2), "method": {"name": "binaryrelax", "form": "original", "act_mixture": [{"name": "fp"}]}},
}


def _one_step(plan: dict, fused: bool):
    old = QuantizerMixture.fused
    QuantizerMixture.fused = fused
    try:
        torch.manual_seed(0)
        m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.5), plan)
        method = quant_state(m).method
        method.setup(m, 10, 10)
        torch.manual_seed(1)
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
        method.on_step(m, 0)
        out = m(x)
        loss = F.cross_entropy(out, y)
        extra = method.extra_loss(m)
        (loss if extra is None else loss + extra).backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        return out.detach(), grads, {k: v.clone() for k, v in m.state_dict().items()}
    finally:
        QuantizerMixture.fused = old


@pytest.mark.parametrize("name", list(PLANS))
def test_fused_activation_mixture_matches_per_member(name):
    """Forward bit-identical (same member values, same summation); gradients the same up to float
    rounding (the x gradient merges members with equal ranges); member statistics updated alike."""
    o0, g0, s0 = _one_step(PLANS[name], fused=False)
    o1, g1, s1 = _one_step(PLANS[name], fused=True)
    assert torch.equal(o0, o1)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7, msg=k)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


# ---------------------------------------------------------------------------------------------
# the opt-in torch.compile kernels (lowbit.quant.compiled)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def compiled_state():
    from lowbit.quant import compiled

    saved = dict(compiled._state), dict(compiled._compiled)
    yield compiled
    compiled._state.clear()
    compiled._state.update(saved[0])
    compiled._compiled.clear()
    compiled._compiled.update(saved[1])


def test_compiled_kernels_fall_back_to_eager(compiled_state):
    """A failing compile warns once and leaves the eager kernels in charge, results unchanged."""
    compiled = compiled_state

    def broken(*args):
        raise RuntimeError("no compiler")

    x = torch.randn(4, 128, 128).relu_()  # >= MIN_NUMEL
    low, high = torch.tensor(0.0), torch.tensor(1.5)
    compiled.enable(False)
    ref = _ClipRound.apply(x, low, high, 3)
    compiled.enable(True)
    compiled._compiled["_clip_fwd"] = broken
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        out = _ClipRound.apply(x, low, high, 3)
    assert torch.equal(out, ref)
    assert not compiled.enabled() and not compiled.active(x)


@pytest.mark.skipif(not __import__("os").environ.get("LOWBIT_TEST_COMPILE"),
                    reason="compiling takes 10-60 s: set LOWBIT_TEST_COMPILE=1")
def test_compiled_kernels_match_eager(compiled_state):
    """Forward outputs and input gradients bit-identical to eager; the scalar gradients the same
    sums (another order); one graph per kernel whatever the shape (no recompiles)."""
    import torch._dynamo.utils as dyn

    compiled = compiled_state
    torch.manual_seed(0)

    def both(fn):
        compiled.enable(False)
        a = fn()
        compiled.enable(True)
        b = fn()
        return a, b

    for shape in [(16, 8, 24, 24), (9, 16, 20, 20)]:
        g = torch.randn(shape)
        for qn, qp in [(0, 3), (2, 1)]:
            s = torch.tensor(0.31)
            v = torch.randn(shape) * 0.31 * (qp + 1)

            def lsq():
                vr, sr = v.clone().requires_grad_(True), s.clone().requires_grad_(True)
                out = _LSQFn.apply(vr, sr, qn, qp, 0.01)
                out.backward(g)
                return out.detach(), vr.grad, sr.grad

            (o0, gv0, gs0), (o1, gv1, gs1) = both(lsq)
            assert torch.equal(o0, o1) and torch.equal(gv0, gv1)
            torch.testing.assert_close(gs1, gs0, rtol=1e-4, atol=1e-6)
        for low in (0.0, -0.4):
            x = torch.randn(shape) * 2

            def clip():
                xr, hr = x.clone().requires_grad_(True), torch.tensor(1.7, requires_grad=True)
                out = _ClipRound.apply(xr, torch.tensor(low), hr, 3)
                out.backward(g)
                return out.detach(), xr.grad, hr.grad

            (o0, gx0, gh0), (o1, gx1, gh1) = both(clip)
            assert torch.equal(o0, o1) and torch.equal(gx0, gx1)
            torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-5)
    graphs = dyn.counters["stats"]["unique_graphs"]
    compiled.enable(True)
    y = torch.randn(5, 7, 30, 30)
    _ClipRound.apply(y, torch.tensor(0.0), torch.tensor(2.0), 3)
    assert dyn.counters["stats"]["unique_graphs"] == graphs  # a new shape: no new graph


@pytest.mark.skipif(not __import__("os").environ.get("LOWBIT_TEST_COMPILE"),
                    reason="compiling takes 10-60 s: set LOWBIT_TEST_COMPILE=1")
def test_compiled_mixture_matches_eager(compiled_state):
    """Every member's Q_k(x) exact (one-hot coefficients give Q_k bit for bit); the mixture sum
    and the gradients equal up to float rounding."""
    from lowbit.methods.mixture import fused_mix
    from lowbit.quant import build_quantizer

    compiled = compiled_state
    torch.manual_seed(0)
    x = torch.randn(8, 16, 24, 24).relu_()
    members = [build_quantizer("pact", b, role="act", init=i) for b, i in ((2, 1.5), (4, 2.5), (8, 3.0))]
    for k in range(3):
        c = torch.zeros(3)
        c[k] = 1.0
        compiled.enable(True)
        out = fused_mix(x, c, members)
        compiled.enable(False)
        assert torch.equal(out, members[k](x))
    g = torch.randn_like(x)

    def run():
        xr = x.clone().requires_grad_(True)
        c = torch.softmax(torch.tensor([0.3, -0.2, 0.1]), 0).requires_grad_(True)
        out = fused_mix(xr, c, members)
        out.backward(g)
        return out.detach(), xr.grad, c.grad, [m.alpha.grad.clone() for m in members]

    compiled.enable(False)
    for m in members:
        m.alpha.grad = None
    a = run()
    for m in members:
        m.alpha.grad = None
    compiled.enable(True)
    b = run()
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)
    for u, v in zip(a[3], b[3]):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)


def test_min_max_members_of_a_mixture_read_the_batch_range_once(monkeypatch):
    """003's 2/4/8-bit min-max activation members share one min/max pass over the layer input,
    and each member's running range is what it would be alone."""
    from lowbit.methods.mixture import AttentionMixture
    from lowbit.quant import build_quantizer

    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16)
    alone = build_quantizer("minmax", 4, role="act")
    alone(x)
    mix = AttentionMixture([build_quantizer("minmax", b, role="act") for b in (2, 4, 8)])
    calls = []
    real = torch.Tensor.aminmax
    monkeypatch.setattr(torch.Tensor, "aminmax", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    mix(x)
    assert len(calls) == 1
    for m in mix.members:
        assert torch.equal(m.running_min, alone.running_min) and torch.equal(m.running_max, alone.running_max)
    mix(x * 2)  # a new input: a new pass
    assert len(calls) == 2
