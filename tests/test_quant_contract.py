"""The quantizer contract, checked on every registered quantizer (from the registry) x role x bits:
outputs on ``levels()``, at most 2^bits values, the straight-through mask, state_dict round trip,
determinism in eval, ``describe()`` consistent with ``levels()``, ``set_bits``, input dtype; and an
export round trip (NumPy reference vs PyTorch) for every activation quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import create_model, quantize
from lowbit.errors import ConfigError
from lowbit.export import IntegerReference, lower
from lowbit.export.levels import act_quant
from lowbit.methods.base import QuantizedWeight
from lowbit.quant import build_quantizer, get_quantizer_class, list_quantizers
from lowbit.quant.uniform import SAWB_COEFFS, mse_optimal_alpha


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops: one thread (conftest.py)


def _cases():
    for name in list_quantizers():
        cls = get_quantizer_class(name)
        for role in cls.roles:
            for bits in sorted({b for b in (cls.min_bits, 2, 3, 4, 8) if cls.min_bits <= b <= cls.max_bits}):
                if name == "valueset" and bits != 1:
                    continue  # bits follow the value set (binary by default)
                if name == "lsq" and role == "weight" and bits < 2:
                    continue
                per_channels = (False, True) if cls.supports_per_channel and role == "weight" else (False,)
                for pc in per_channels:
                    yield pytest.param(name, role, bits, pc, id=f"{name}-{role}-{bits}{'-ch' if pc else ''}")


CASES = list(_cases())


def build(name, role, bits, pc):
    kw = {"per_channel": True} if pc else {}
    return build_quantizer(name, bits, role=role, **kw)


def data(role: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    x = x * 0.3 if role == "weight" else x * 2.0
    return x.to(dtype)


def _fp(name: str) -> bool:
    return get_quantizer_class(name).min_bits == 32


def warm(q, x):
    """Two training calls (running ranges, LSQ's step, k-means/QEM) then eval mode."""
    q.train()
    with torch.no_grad():
        q(x)
        q(x * 1.1)
    return q.eval()


def test_every_quantizer_is_covered():
    names = {c.values[0] for c in CASES}
    assert names == set(list_quantizers())
    assert {"bnn", "qnn", "sat", "uniform", "minmax", "pact", "dorefa", "lsq", "lqnet", "centroids", "fp"} \
        <= set(list_quantizers("act"))


@pytest.mark.parametrize("name,role,bits,pc", CASES)
def test_contract(name, role, bits, pc):
    q = warm(build(name, role, bits, pc), data(role))
    x = data(role, seed=1).requires_grad_(True)
    y = q(x)
    if _fp(name):
        assert torch.equal(y, x) and q.describe().levels is None and q.n_scales == 0
        return
    lv = q.levels()
    # outputs lie on the levels bit for bit, at most 2^bits of them per row
    rows_y = y.detach().flatten(1) if lv.dim() == 2 else y.detach().reshape(1, -1)
    rows_lv = lv if lv.dim() == 2 else lv.reshape(1, -1)
    assert rows_lv.shape[1] <= 2**bits
    for r in range(rows_y.shape[0]):
        assert torch.isin(rows_y[r], rows_lv[r if rows_lv.shape[0] > 1 else 0]).all()
        assert rows_y[r].unique().numel() <= 2**bits
    assert (lv.diff(dim=-1) > 0).all()  # sorted, distinct
    # the gradient of x is a 0/1 mask (the straight-through estimator); clipped families clip
    y.backward(torch.ones_like(y))
    g = x.grad
    # DoReFa's tanh normalisation, SAT's rescaling: weight gradients are not a 0/1 mask by design
    through_tanh = role == "weight" and (name == "sat" or name == "dorefa" and bits > 1)
    assert through_tanh or set(g.unique().tolist()) <= {0.0, 1.0}
    xd = x.detach()
    lo, hi = rows_lv[:, :1], rows_lv[:, -1:]
    xr = xd.flatten(1) if lv.dim() == 2 else xd.reshape(1, -1)
    inside = ((xr > lo) & (xr < hi)).reshape(x.shape)
    far_out = ((xr < lo - 1e-3) | (xr > hi + 1e-3)).reshape(x.shape)
    if not through_tanh:
        assert (g[inside] == 1).all()
    if role == "act" and name not in ("lsq",) or name in ("sawb", "qnn", "bnn"):
        assert (g[far_out] == 0).all()
    # deterministic in eval mode
    with torch.no_grad():
        assert torch.equal(q(xd), q(xd))
    # state_dict round trip: a fresh quantizer gives identical outputs
    fresh = build(name, role, bits, pc)
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(xd), q(xd))
    # describe() agrees with levels()
    d = q.describe()
    assert torch.equal(d.levels, q.levels()) and d.bits == bits and d.role == role
    assert d.n_scales == q.n_scales and d.signed == bool((lv < 0).any())
    assert d.qmax - d.qmin + 1 == lv.shape[-1]
    if d.uniform:
        k = torch.arange(d.qmin, d.qmax + 1, dtype=torch.float32)
        grid = d.low.reshape(-1, 1) + k * d.step.reshape(-1, 1)
        want = rows_lv.float()
        if d.rule in ("clip_div", "mul_clip"):
            ref = k * d.step.reshape(-1, 1) if d.rule == "mul_clip" else \
                (k * d.step.reshape(-1, 1)) + d.low.reshape(-1, 1)
            assert torch.equal(ref, want.expand_as(ref)), "the float32 grid is the levels bit for bit"
        assert torch.allclose(grid, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))
    if role == "act":
        assert d.rule in ("clip_div", "mul_clip", "nearest")


@pytest.mark.parametrize("name,role,bits,pc", [c for c in CASES if not _fp(c.values[0])])
def test_set_bits(name, role, bits, pc):
    q = warm(build(name, role, bits, pc), data(role))
    cls = type(q)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        q.set_bits(cls.max_bits + 1)
    assert "\n" not in str(e.value)
    target = next((b for b in (3, 2, 4) if b != bits and cls.min_bits <= b <= cls.max_bits), None)
    if cls.min_bits == cls.max_bits or name in ("valueset",):
        with pytest.raises(ConfigError, match="bit"):
            q.set_bits(target or cls.min_bits)
        return
    n_modules = len(list(q.modules()))
    q.set_bits(target)
    assert q.bits == target and len(list(q.modules())) == n_modules  # cheap: no new modules
    for key in ("step", "alpha"):  # learned state is kept
        if key in state:
            assert torch.equal(q.state_dict()[key], state[key])
    if name == "lsq":
        assert q.qp == (2 ** (target - 1) - 1 if q.signed else 2**target - 1)
    warm(q, data(role))
    with torch.no_grad():
        y = q(data(role, seed=1))
    assert y.flatten(1 if q.levels().dim() == 2 else 0).unique().numel() <= 2**target * max(1, q.rows)
    assert q.levels().shape[-1] <= 2**target


def test_quantized_weight_set_bits_delegates():
    p = QuantizedWeight(build_quantizer("lsq", 4))
    p(data("weight"))
    step = p.quantizer.step.detach().clone()
    p.set_bits(2)
    assert p.bits == 2 and p.quantizer.qn == 2 and torch.equal(p.quantizer.step.detach(), step)
    with pytest.raises(ConfigError):
        QuantizedWeight(build_quantizer("bwn", 1)).set_bits(2)


@pytest.mark.parametrize("name,role,bits,pc", [c for c in CASES if c.values[2] in (2, 3)])
def test_float64_input_stays_float64_and_on_levels(name, role, bits, pc):
    q = warm(build(name, role, bits, pc), data(role, torch.float64))
    with torch.no_grad():
        y = q(data(role, torch.float64, seed=1))
    assert y.dtype == torch.float64
    if _fp(name):
        return
    lv = q.levels()
    rows_y = y.flatten(1) if lv.dim() == 2 else y.reshape(1, -1)
    rows_lv = (lv if lv.dim() == 2 else lv.reshape(1, -1)).double()
    for r in range(rows_y.shape[0]):
        assert torch.isin(rows_y[r], rows_lv[r if rows_lv.shape[0] > 1 else 0]).all()


# ---------------------------------------------------------------------------------------------
# n_scales (issue 11)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n", [("uniform", 1), ("dorefa", 0), ("minmax", 2), ("pact", 1), ("lsq", 1),
                                    ("qnn", 0), ("bnn", 0), ("sat", 1), ("centroids", 4), ("lqnet", 2)])
def test_activation_scales_stored(name, n):
    q = warm(build_quantizer(name, 2 if name != "bnn" else 1, role="act"), data("act"))
    assert q.n_scales == n and q.describe().n_scales == n


# ---------------------------------------------------------------------------------------------
# SAWB's alpha (issue 11)
# ---------------------------------------------------------------------------------------------
def test_sawb_closed_form_not_positive_falls_back_to_the_mse_minimiser():
    # a short row with E|w|/rms(w) = 1 > -c1/c2: the closed form is c1 + c2 < 0 at 5 and 8 bits;
    # it used to be clamped to 1e-8, which quantized the whole channel to zero
    rows = torch.tensor([[0.1, -0.1, 0.1, -0.1, 0.1, -0.1, 0.1, -0.1, 0.1],
                         [0.3, -0.2, 0.05, 0.4, -0.5, 0.1, -0.15, 0.25, -0.35]])
    w = rows.reshape(2, 1, 3, 3)
    for bits in (5, 8):
        c1, c2 = SAWB_COEFFS[bits]
        assert c1 * 0.1 + c2 * 0.1 <= 0
        for mode in ("auto", "closed_form"):
            q = build_quantizer("sawb", bits, per_channel=True, alpha=mode)
            y = q(w)
            assert torch.equal(y[0].reshape(-1), rows[0])  # on the grid's alpha: exact
            assert float(q.levels()[0, -1]) == pytest.approx(0.1, rel=1e-6)
        want = mse_optimal_alpha(w, bits, per_channel=True)
        assert float(build_quantizer("sawb", bits, per_channel=True)(w)[0].abs().max()) == \
            pytest.approx(float(want.reshape(-1)[0]), rel=1e-6)


def _kaiming(shape, seed):
    torch.manual_seed(seed)
    w = torch.empty(shape)
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    return w


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_sawb_auto_mse_is_the_grid_minimum_at_high_bits(bits):
    w = _kaiming((16, 8, 3, 3), bits)
    for pc in (False, True):
        y = build_quantizer("sawb", bits, per_channel=pc)(w)
        a = mse_optimal_alpha(w, bits, pc)
        ref = build_quantizer("sawb", bits, per_channel=pc, alpha="mse")(w)
        assert torch.equal(y, ref) and float(y.abs().max()) <= float(a.max()) * (1 + 1e-6)
    # the old closed form at 8 bits was ~50x worse than min-max on such a tensor
    mm = float(((build_quantizer("minmax", bits)(w) - w) ** 2).mean())
    assert float(((build_quantizer("sawb", bits)(w) - w) ** 2).mean()) < 1.5 * mm


def test_sawb_auto_never_worse_than_alpha_max_at_low_bits():
    w = _kaiming((16, 2, 3, 3), 0)
    for bits in (2, 3, 4):
        y = build_quantizer("sawb", bits, per_channel=True)(w)
        err = ((y - w) ** 2).flatten(1).mean(1)
        amax = w.abs().flatten(1).max(1).values.reshape(-1, 1, 1, 1)
        n = 2**bits - 1
        ym = torch.clamp(w, -amax, amax).add(amax).div(2 * amax / n).round().mul(2 * amax / n).sub(amax)
        assert (err <= ((ym - w) ** 2).flatten(1).mean(1) * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------
# export: every activation quantizer
# ---------------------------------------------------------------------------------------------
ACT_EXPORT = [n for n in list_quantizers("act")]


@pytest.mark.parametrize("name", ACT_EXPORT)
def test_every_activation_quantizer_exports_bit_exact(name):
    cls = get_quantizer_class(name)
    bits = 2 if cls.min_bits <= 2 <= cls.max_bits else cls.min_bits
    torch.manual_seed(0)
    # (bnn after ReLU maps every input to +1: the exporter has no Hardtanh op yet)
    m = create_model("lenet5", in_channels=1, num_classes=10, image_size=28, width=0.5, batch_norm=True)
    quantize(m, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": name, "bits": bits}})
    g = torch.Generator().manual_seed(1)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 28, 28, generator=g))
    m.eval()
    x = torch.randn(32, 1, 28, 28, generator=g)
    graph = lower(m, x[:2])
    acts = [op.act for op in graph.conv_ops() if op.act is not None]
    if name == "fp":
        assert not acts
    else:
        assert acts and all(a.quantizer == name for a in acts)
    with torch.no_grad():
        want = m(x).numpy()
    got = IntegerReference(graph).run(x.numpy())
    assert np.array_equal(got.argmax(1), want.argmax(1))
    d = np.abs(got - want)
    assert np.median(d) < 1e-5 and d.max() < 2e-3


@pytest.mark.parametrize("name", [n for n in ACT_EXPORT if n != "fp"])
def test_act_rule_codes_reproduce_the_quantizer(name):
    cls = get_quantizer_class(name)
    bits = 2 if cls.min_bits <= 2 <= cls.max_bits else cls.min_bits
    q = warm(build_quantizer(name, bits, role="act"), data("act"))
    with torch.no_grad():
        q(data("act"))  # an eval call: the levels of the state that is exported (k-means/QEM updated last call)
    a = act_quant(q, "t")
    lv = q.levels().reshape(-1).numpy()
    mids = (lv[1:] + lv[:-1]) / np.float32(2)
    xs = np.concatenate([np.random.default_rng(0).normal(0, 2, 4000), mids, lv, [lv[0] - 5, lv[-1] + 5, 0.0]])
    xt = torch.tensor(xs, dtype=torch.float32)
    with torch.no_grad():
        want = q(xt).numpy()
    assert np.array_equal(a.values(a.codes(xt.numpy())), want)


@pytest.mark.parametrize("name", ["centroids", "bnn"])
def test_nearest_rule_in_c_is_bit_exact_with_numpy(name, tmp_path):
    from lowbit.export import compile_c, run_c, write_c

    torch.manual_seed(0)
    m = create_model("lenet5", in_channels=1, num_classes=10, image_size=28, width=0.5, batch_norm=True)
    quantize(m, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": name, "bits": 2 if name != "bnn" else 1}})
    g = torch.Generator().manual_seed(1)
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 28, 28, generator=g))
    m.eval()
    x = torch.randn(4, 1, 28, 28, generator=g).numpy()
    graph = lower(m, torch.from_numpy(x[:2]))
    want = IntegerReference(graph).run(x)
    write_c(graph, tmp_path, samples=x[:2], expected=want[:2])
    got = run_c(compile_c(tmp_path), x, want.shape[1])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _grid64_alpha_rows(rows, bits, grid=64):
    """Exhaustive reference: the old 64-point grid alpha = max|x|*k/64, k = 1..64 (first minimum)."""
    from lowbit.quant.uniform import _sym_mse
    amax = rows.abs().max(1, keepdim=True).values.clamp_min(1e-8)
    n = 2**bits - 1
    errs = torch.cat([_sym_mse(rows, amax * (k / grid), n) for k in range(1, grid + 1)], 1)
    return amax * ((errs.argmin(1, keepdim=True) + 1).to(amax.dtype) / grid)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_mse_optimal_alpha_fast_search_not_worse_than_exhaustive_grid(bits):
    from lowbit.quant.uniform import _sym_mse
    n = 2**bits - 1
    for seed, shape in enumerate([(16, 16, 3, 3), (64, 64, 3, 3), (32, 16, 3, 3), (10, 64)]):
        w = _kaiming(shape, 100 + seed)
        for pc in (False, True):
            rows = w.flatten(1) if pc else w.reshape(1, -1)
            fast = mse_optimal_alpha(w, bits, pc).reshape(-1, 1)
            ref = _grid64_alpha_rows(rows, bits)
            e_fast, e_ref = float(_sym_mse(rows, fast, n).mean()), float(_sym_mse(rows, ref, n).mean())
            assert e_fast <= e_ref * 1.005, (shape, pc, e_fast, e_ref)
            if not pc:  # one big row: MSE(alpha) is smooth, the finer search must not be worse
                assert e_fast <= e_ref * (1 + 1e-6)
    x = torch.zeros(3, 5)  # all-zero rows: a finite, positive alpha
    a = mse_optimal_alpha(x, bits, True)
    assert torch.isfinite(a).all() and (a > 0).all()
    assert torch.equal(mse_optimal_alpha(w, bits, True), mse_optimal_alpha(w, bits, True))  # deterministic


@pytest.mark.parametrize("name", ["minmax", "uniform"])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_act_rule_codes_reproduce_a_collapsed_range(name, bits):
    """Calibrated on a constant input (a dead ReLU layer), the range collapses: step is clamped to 1e-8 and the
    clamp at high sends every input to the low end. The exported rule clamps only the code, so it gave 2^b - 1
    for every input above the range (values up to 255e-8 where PyTorch gives 0)."""
    q = warm(build_quantizer(name, bits, role="act"), torch.zeros(8, 6, 3, 3))
    with torch.no_grad():
        q(torch.zeros(8, 6, 3, 3))
    a = act_quant(q, "t")
    xt = torch.cat([data("act").reshape(-1), torch.tensor([0.0, -0.0, 1e-9, 1e-8, 3.0])])
    with torch.no_grad():
        want = q(xt).numpy()
    assert np.array_equal(a.values(a.codes(xt.numpy())), want)


@pytest.mark.parametrize("name", ["minmax", "uniform"])
def test_integer_mode_refuses_a_collapsed_activation_range(name):
    """The integer network clamps a tensor to 2^bits codes; a collapsed range's quantizer uses fewer (session 27's
    grid: code 0 only), so the integer network could give codes PyTorch never does: refused in one line."""
    from lowbit.export.intgraph import tensor_q

    q = warm(build_quantizer(name, 4, role="act"), torch.zeros(8, 6, 3, 3))
    with torch.no_grad():
        q(torch.zeros(8, 6, 3, 3))
    with pytest.raises(ConfigError, match="uses 1 codes, not 2\\^bits: its range collapsed"):
        tensor_q(act_quant(q, "t"), "t")
    ok = warm(build_quantizer("uniform", 4, role="act"), torch.rand(8, 6, 3, 3))  # 0 on its grid
    with torch.no_grad():
        ok(torch.rand(8, 6, 3, 3))
    assert tensor_q(act_quant(ok, "t"), "t").bits == 4

