"""Tests of the quantizer zoo (lowbit.quant) against formulas written out here from scratch.

Every expected value is computed in this file with numpy / plain torch from the papers' formulas
(003 appendix A.1 eq. 9-15, METHODS.md "Quantizers", DoReFa, PACT, LSQ); the library's own helpers
are never used to produce an expected value. Set membership (``torch.isin``) is exact equality.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.quant import build_quantizer, list_quantizers
from quant_helpers import assert_close_off_ties as _close_off_ties
from quant_helpers import assert_on_levels, np64, randn

# this file's comparisons of float32 quantizers with float64 formulas use atol 1e-5
assert_close_off_ties = partial(_close_off_ties, atol=1e-5)

ALL_NAMES = ["minmax", "sawb", "bwn", "twn", "dorefa", "lsq", "pact", "po2", "valueset", "uniform", "fp"]

#: SAWB constants as printed in METHODS.md (Choi et al. 2018): bits -> (c1, c2)
SAWB_TABLE = {2: (3.12, -2.064), 3: (7.509, -6.892), 4: (12.68, -12.80), 5: (17.74, -18.64), 8: (31.76, -35.04)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def assert_nearest(x, y, levels, tol=1e-5) -> None:
    """eq. 9: y is (one of) the nearest levels to x: |x - y| <= min_j |x - q_j| + tol."""
    x, y, levels = np.asarray(x, float).ravel(), np.asarray(y, float).ravel(), np.asarray(levels, float)
    best = np.abs(x[:, None] - levels[None, :]).min(1)
    err = np.abs(x - y) - best
    assert err.max() <= tol, f"not the nearest level: excess {err.max()} at x={x[err.argmax()]}, y={y[err.argmax()]}"


def ste_grad(q, w, seed=7):
    """Gradient of sum(c * q(w)) w.r.t. w, and the c used."""
    w = w.clone().requires_grad_(True)
    c = randn(*w.shape, seed=seed)
    (c * q(w)).sum().backward()
    return w.grad, c


# ---------------------------------------------------------------------------------------------
# registry and errors
# ---------------------------------------------------------------------------------------------
def test_list_quantizers_contains_the_zoo():
    names = list_quantizers()
    for n in ALL_NAMES:
        assert n in names
    assert names == sorted(names)
    assert "pact" in list_quantizers("act") and "pact" not in list_quantizers("weight")
    assert "bwn" in list_quantizers("weight") and "bwn" not in list_quantizers("act")
    assert {"minmax", "lsq", "dorefa"} <= set(list_quantizers("act"))


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError) as e:
        build_quantizer("nosuchquant", 2)
    msg = str(e.value)
    assert "nosuchquant" in msg
    for n in ALL_NAMES:
        assert n in msg


@pytest.mark.parametrize(
    "name,bits,allowed",
    [
        ("bwn", 2, "1"),
        ("twn", 1, "2"),
        ("twn", 3, "2"),
        ("minmax", 9, "1..8"),
        ("minmax", 0, "1..8"),
        ("sawb", 9, "1..8"),
        ("dorefa", 0, "1..8"),
        ("pact", 9, "1..8"),
        ("lsq", 9, "1..8"),
        ("uniform", 0, "1..8"),
        ("po2", 9, "1..8"),
        ("fp", 8, "32"),
    ],
)
def test_bits_out_of_range(name, bits, allowed):
    with pytest.raises(ConfigError) as e:
        build_quantizer(name, bits)
    msg = str(e.value)
    assert f"'{name}'" in msg and allowed in msg and str(bits) in msg


@pytest.mark.parametrize("bits", [2.5, True])
@pytest.mark.parametrize(
    "name,allowed", [("minmax", "1..8"), ("sawb", "1..8"), ("bwn", "1"), ("twn", "2"), ("dorefa", "1..8")]
)
def test_bits_not_an_integer_names_quantizer_and_allowed_bits(name, allowed, bits):
    with pytest.raises(ConfigError) as e:
        build_quantizer(name, bits)
    msg = str(e.value)
    assert "bits" in msg and f"'{name}'" in msg and allowed in msg


@pytest.mark.parametrize("name", ["minmax", "sawb", "bwn", "twn", "dorefa", "lsq", "pact", "po2", "valueset", "uniform", "fp"])
@pytest.mark.parametrize("bits", [2.5, True])
def test_bits_not_an_integer_is_rejected_by_every_quantizer(name, bits):
    # True == 1 and 1.0 == 1 in Python: a bool or float must still be refused, not taken as 1
    with pytest.raises(ConfigError):
        build_quantizer(name, bits)


def test_unknown_option_names_the_options():
    with pytest.raises(ConfigError) as e:
        build_quantizer("minmax", 2, colour="red")
    msg = str(e.value)
    assert "colour" in msg and "minmax" in msg and "per_channel" in msg and "momentum" in msg
    with pytest.raises(ConfigError) as e:
        build_quantizer("sawb", 2, alpah="mse")
    assert "alpah" in str(e.value) and "alpha" in str(e.value)


def test_role_errors():
    with pytest.raises(ConfigError) as e:
        build_quantizer("pact", 2, role="weight")
    assert "pact" in str(e.value) and "weight" in str(e.value)
    with pytest.raises(ConfigError):
        build_quantizer("bwn", 1, role="act")
    with pytest.raises(ConfigError):
        build_quantizer("minmax", 2, role="bias")
    with pytest.raises(ConfigError):
        build_quantizer("dorefa", 2, per_channel=True)
    with pytest.raises(ConfigError):
        build_quantizer("minmax", 2, role="act", per_channel=True)
    with pytest.raises(ConfigError):
        build_quantizer("lsq", 2, role="act", per_channel=True)
    # the defaults: PACT / uniform are activation quantizers
    assert build_quantizer("pact", 2).role == "act"
    assert build_quantizer("uniform", 2).role == "act"
    assert build_quantizer("minmax", 2).role == "weight"


def test_lsq_one_bit():
    with pytest.raises(ConfigError):
        build_quantizer("lsq", 1, role="weight")
    q = build_quantizer("lsq", 1, role="act")  # unsigned 1 bit is fine: {0, s}
    q(torch.rand(2, 5))
    assert q.levels().numel() == 2


def test_valueset_bits_must_match_set_size():
    with pytest.raises(ConfigError):
        build_quantizer("valueset", 1, values="ternary")
    with pytest.raises(ConfigError):
        build_quantizer("valueset", 3, values="ternary")
    with pytest.raises(ConfigError):
        build_quantizer("valueset", 2, values="binary")
    with pytest.raises(ConfigError):
        build_quantizer("valueset", 2, values=[0.1, 0.2, 0.3, 0.4, 0.5])  # 5 values need 3 bits
    with pytest.raises(ConfigError):
        build_quantizer("valueset", None, values="nosuchset")
    with pytest.raises(ConfigError):
        build_quantizer("valueset", None, values=[1.0])
    with pytest.raises(ConfigError):
        build_quantizer("valueset", None, values="binary", scale="median")
    assert build_quantizer("valueset", 2, values="ternary").bits == 2
    assert build_quantizer("valueset", None, values=[0.1, 0.2, 0.3, 0.4, 0.5]).bits == 3
    assert build_quantizer("valueset", None, values="po2-3bit").bits == 3


def test_sawb_alpha_option_errors():
    with pytest.raises(ConfigError):
        build_quantizer("sawb", 6, alpha="closed_form")
    with pytest.raises(ConfigError):
        build_quantizer("sawb", 1, alpha="closed_form")
    with pytest.raises(ConfigError):
        build_quantizer("sawb", 2, alpha="best")
    build_quantizer("sawb", 6, alpha="mse")
    build_quantizer("sawb", 6)  # auto: falls back to the MSE grid


def test_pact_init_must_be_positive():
    with pytest.raises(ConfigError):
        build_quantizer("pact", 2, init=0.0)
    with pytest.raises(ConfigError):
        build_quantizer("pact", 2, init=-1.0)


def test_levels_before_call_is_an_error():
    with pytest.raises(RuntimeError):
        build_quantizer("minmax", 2).levels()


# ---------------------------------------------------------------------------------------------
# min-max (eq. 10, 13)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_minmax_weight_levels_and_outputs(bits):
    w = randn(64, 9, seed=bits, scale=0.3, shift=0.05)
    q = build_quantizer("minmax", bits)
    y = q(w)
    n = 2**bits - 1
    x = np64(w)
    xmin, xmax = x.min(), x.max()
    expected = xmin + np.arange(n + 1) * (xmax - xmin) / n
    lv = q.levels()
    assert lv.shape == (n + 1,)
    np.testing.assert_allclose(np64(lv), expected, rtol=0, atol=1e-6)
    assert torch.all(lv[1:] > lv[:-1])
    assert_on_levels(y, lv)
    assert y.unique().numel() <= 2**bits
    assert_nearest(x, np64(y), expected)
    # the extremes map onto the end levels exactly
    assert y.reshape(-1)[w.argmin()] == lv[0]
    assert y.reshape(-1)[w.argmax()] == lv[-1]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_minmax_hand_example(bits):
    w = torch.tensor([-1.0, 0.0, 0.2, 0.5, 2.0])
    q = build_quantizer("minmax", bits)
    y = q(w)
    step = 3.0 / (2**bits - 1)
    exp = [-1.0 + step * round((v + 1.0) / step) for v in (-1.0, 0.0, 0.2, 0.5, 2.0)]
    np.testing.assert_allclose(np64(y), exp, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("n_out", [1, 4])
def test_minmax_per_channel(bits, n_out):
    scales = torch.tensor([0.1, 1.0, 3.0, 0.5])[:n_out].reshape(-1, 1, 1, 1)
    w = randn(n_out, 3, 3, 3, seed=3) * scales + 0.1
    q = build_quantizer("minmax", bits, per_channel=True)
    y = q(w)
    n = 2**bits - 1
    lv = q.levels()
    assert lv.shape == (n_out, n + 1)
    for c in range(n_out):
        x = np64(w[c])
        exp = x.min() + np.arange(n + 1) * (x.max() - x.min()) / n
        np.testing.assert_allclose(np64(lv[c]), exp, rtol=0, atol=1e-6)
        assert_nearest(x, np64(y[c]), exp)
    assert_on_levels(y, lv)


# ---------------------------------------------------------------------------------------------
# SAWB (eq. 11-12)
# ---------------------------------------------------------------------------------------------
def test_sawb_constants_match_the_paper():
    from lowbit.quant.uniform import SAWB_COEFFS

    assert set(SAWB_COEFFS) == set(SAWB_TABLE)
    for b, (c1, c2) in SAWB_TABLE.items():
        assert SAWB_COEFFS[b] == pytest.approx((c1, c2))


def test_sawb_two_bit_closed_form_by_hand():
    w = randn(32, 16, 3, 3, seed=11, scale=0.05)
    x = np64(w)
    alpha = 3.12 * math.sqrt((x**2).mean()) - 2.064 * np.abs(x).mean()
    q = build_quantizer("sawb", 2, alpha="closed_form")
    y = q(w)
    lv = q.levels()
    exp = np.array([-alpha, -alpha / 3, alpha / 3, alpha])
    np.testing.assert_allclose(np64(lv), exp, rtol=1e-5)
    np.testing.assert_allclose(np64(lv), -np64(lv)[::-1], rtol=0, atol=1e-7)  # symmetric
    assert_on_levels(y, lv)
    clipped = np.clip(x, -alpha, alpha)
    assert_nearest(clipped, np64(y), exp)
    # beyond alpha: the end levels
    big = np.abs(x) > alpha * (1 + 1e-5)
    assert big.any()
    assert np.allclose(np.abs(np64(y)[big]), alpha, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_sawb_closed_form_levels(bits):
    c1, c2 = SAWB_TABLE[bits]
    w = randn(4096, seed=bits, scale=0.2)
    x = np64(w)
    alpha = c1 * math.sqrt((x**2).mean()) + c2 * np.abs(x).mean()
    n = 2**bits - 1
    for mode in ("auto", "closed_form") if bits <= 4 else ("closed_form",):  # auto: the grid above 4 bits
        q = build_quantizer("sawb", bits, alpha=mode)
        y = q(w)
        lv = q.levels()
        exp = -alpha + np.arange(n + 1) * 2 * alpha / n
        assert lv.shape == (n + 1,)
        np.testing.assert_allclose(np64(lv), exp, rtol=0, atol=1e-5 * alpha)
        assert_on_levels(y, lv)
        assert y.unique().numel() <= 2**bits
        assert_nearest(np.clip(x, -alpha, alpha), np64(y), exp, tol=1e-5 * alpha)


def _mse(y, w):
    return float(((y.double() - w.double()) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sawb_beats_minmax_on_gaussian(bits):
    w = randn(10_000, seed=100 + bits)
    sawb = _mse(build_quantizer("sawb", bits)(w), w)
    minmax = _mse(build_quantizer("minmax", bits)(w), w)
    assert sawb <= minmax


def _sym_uniform_mse(x: np.ndarray, alpha: float, bits: int) -> float:
    n = 2**bits - 1
    step = 2 * alpha / n
    q = -alpha + np.round((np.clip(x, -alpha, alpha) + alpha) / step) * step
    return float(((q - x) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sawb_mse_mode(bits):
    w = randn(10_000, seed=200 + bits)
    x = np64(w)
    closed = _mse(build_quantizer("sawb", bits, alpha="closed_form")(w), w)
    q = build_quantizer("sawb", bits, alpha="mse")
    y = q(w)
    mse = _mse(y, w)
    assert mse <= closed * 1.01
    # symmetric levels, and the MSE it reaches is near the best over a fine alpha grid (eq. 12)
    lv = np64(q.levels())
    np.testing.assert_allclose(lv, -lv[::-1], atol=1e-6)
    assert_on_levels(y, q.levels())
    best = min(_sym_uniform_mse(x, a, bits) for a in np.linspace(0.01, np.abs(x).max(), 1000))
    assert mse <= best * 1.02
    np.testing.assert_allclose(mse, _sym_uniform_mse(x, float(lv[-1]), bits), rtol=1e-4)


@pytest.mark.parametrize("bits", [1, 6])
def test_sawb_auto_without_constants_is_symmetric(bits):
    w = randn(2000, seed=bits)
    q = build_quantizer("sawb", bits)
    y = q(w)
    lv = q.levels()
    assert lv.shape == (2**bits,)
    np.testing.assert_allclose(np64(lv), -np64(lv)[::-1], atol=1e-6)
    steps = np.diff(np64(lv))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-4)
    assert_on_levels(y, lv)


@pytest.mark.parametrize("bits", [2, 4])
def test_sawb_per_channel(bits):
    scales = torch.tensor([0.05, 0.5, 2.0]).reshape(-1, 1, 1, 1)
    w = randn(3, 8, 3, 3, seed=5) * scales
    q = build_quantizer("sawb", bits, per_channel=True, alpha="closed_form")  # auto may use the grid per row
    y = q(w)
    lv = q.levels()
    c1, c2 = SAWB_TABLE[bits]
    n = 2**bits - 1
    assert lv.shape == (3, n + 1)
    for c in range(3):
        x = np64(w[c])
        a = c1 * math.sqrt((x**2).mean()) + c2 * np.abs(x).mean()
        exp = -a + np.arange(n + 1) * 2 * a / n
        np.testing.assert_allclose(np64(lv[c]), exp, rtol=0, atol=1e-5 * a)
        assert_nearest(np.clip(x, -a, a), np64(y[c]), exp, tol=1e-5 * a)
    assert_on_levels(y, lv)


# ---------------------------------------------------------------------------------------------
# BWN (eq. 14) and TWN (eq. 15)
# ---------------------------------------------------------------------------------------------
def test_bwn_levels_and_sign_of_zero():
    w = randn(16, 8, seed=21, scale=0.3)
    w[0, :3] = 0.0
    w[1, 0] = -0.0
    q = build_quantizer("bwn", 1)
    y = q(w)
    beta = np.abs(np64(w)).mean()
    lv = q.levels()
    assert lv.shape == (2,)
    np.testing.assert_allclose(np64(lv), [-beta, beta], rtol=1e-6)
    assert lv[0] == -lv[1]
    assert torch.equal(y, torch.where(w >= 0, lv[1], lv[0]))
    assert torch.all(y[0, :3] == lv[1]) and y[1, 0] == lv[1]  # sign(0) = +1


def test_bwn_hand_example():
    y = build_quantizer("bwn", 1)(torch.tensor([1.0, -3.0, 0.0, 2.0]))
    assert y.tolist() == [1.5, -1.5, 1.5, 1.5]


@pytest.mark.parametrize("n_out", [1, 3])
def test_bwn_per_channel(n_out):
    w = randn(n_out, 4, 3, 3, seed=22) * torch.tensor([0.1, 1.0, 5.0])[:n_out].reshape(-1, 1, 1, 1)
    q = build_quantizer("bwn", 1, per_channel=True)
    y = q(w)
    lv = q.levels()
    assert lv.shape == (n_out, 2)
    for c in range(n_out):
        b = np.abs(np64(w[c])).mean()
        np.testing.assert_allclose(np64(lv[c]), [-b, b], rtol=1e-6)
        assert torch.equal(y[c], torch.where(w[c] >= 0, lv[c, 1], lv[c, 0]))
    assert_on_levels(y, lv)


def test_twn_divides_by_kept_count_hand_example():
    # E|w| = 2.2/4 = 0.55, delta = 0.385: only +-1 are kept, beta = (1+1)/2 = 1 (not 2/4 = 0.5)
    w = torch.tensor([1.0, -1.0, 0.1, -0.1])
    q = build_quantizer("twn", 2)
    y = q(w)
    assert y.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert q.levels().tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twn_levels(seed):
    w = randn(256, seed=seed, scale=0.2)
    q = build_quantizer("twn", 2)
    y = q(w)
    x = np64(w)
    delta = 0.7 * np.abs(x).mean()
    keep = np.abs(x) > delta
    beta = np.abs(x)[keep].sum() / keep.sum()
    assert not np.isclose(beta, np.abs(x)[keep].sum() / x.size)  # the two readings differ here
    lv = q.levels()
    assert lv.shape == (3,) and lv[1] == 0 and lv[0] == -lv[2]
    np.testing.assert_allclose(np64(lv), [-beta, 0, beta], rtol=1e-6)
    exp = np.where(x > delta, 1, np.where(x < -delta, -1, 0))
    assert np.array_equal(np.sign(np64(y)), exp)
    assert_on_levels(y, lv)


@pytest.mark.parametrize("n_out", [1, 3])
def test_twn_per_channel(n_out):
    w = randn(n_out, 32, seed=23) * torch.tensor([0.1, 1.0, 5.0])[:n_out].reshape(-1, 1)
    q = build_quantizer("twn", 2, per_channel=True)
    y = q(w)
    lv = q.levels()
    assert lv.shape == (n_out, 3)
    for c in range(n_out):
        x = np64(w[c])
        d = 0.7 * np.abs(x).mean()
        k = np.abs(x) > d
        b = np.abs(x)[k].mean()
        np.testing.assert_allclose(np64(lv[c]), [-b, 0, b], rtol=1e-6)
        assert np.array_equal(np.sign(np64(y[c])), np.where(x > d, 1, np.where(x < -d, -1, 0)))
    assert_on_levels(y, lv)


# ---------------------------------------------------------------------------------------------
# DoReFa
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_formula(bits):
    w = randn(500, seed=30 + bits, scale=0.7)
    q = build_quantizer("dorefa", bits)
    y = q(w)
    n = 2**bits - 1
    x = np64(w)
    t = np.tanh(x)
    r = t / (2 * np.abs(t).max()) + 0.5
    exp = 2 * np.round(n * r) / n - 1
    lv = q.levels()
    np.testing.assert_allclose(np64(lv), 2 * np.arange(n + 1) / n - 1, atol=1e-7)
    assert_on_levels(y, lv)
    assert_close_off_ties(np64(y), exp, n * r, atol=1e-6)
    assert float(y.abs().max()) == 1.0  # the largest |w| maps to +-1


def test_dorefa_weight_one_bit():
    w = randn(100, seed=31)
    w[5] = 0.0
    q = build_quantizer("dorefa", 1)
    y = q(w)
    beta = np.abs(np64(w)).mean()
    np.testing.assert_allclose(np64(q.levels()), [-beta, beta], rtol=1e-6)
    assert torch.equal(y, torch.where(w >= 0, q.levels()[1], q.levels()[0]))
    g, c = ste_grad(q, w)
    assert torch.equal(g, c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_gradient_is_round_free_expression(bits):
    w0 = randn(6, 20, seed=40 + bits, scale=0.6)
    c = randn(6, 20, seed=41)
    q = build_quantizer("dorefa", bits)
    w = w0.clone().requires_grad_(True)
    (c * q(w)).sum().backward()
    n = 2**bits - 1
    v = w0.double().clone().requires_grad_(True)
    t = torch.tanh(v)
    r = t / (2 * t.abs().max()) + 0.5
    expr = 2 * ((r * n) / n) - 1  # round replaced by the identity
    (c.double() * expr).sum().backward()
    np.testing.assert_allclose(np64(w.grad), np64(v.grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_activation(bits):
    x = randn(4, 50, seed=50 + bits, scale=0.8, shift=0.4)
    q = build_quantizer("dorefa", bits, role="act")
    xr = x.clone().requires_grad_(True)
    y = q(xr)
    n = 2**bits - 1
    lv = q.levels()
    np.testing.assert_allclose(np64(lv), np.arange(n + 1) / n, atol=1e-7)
    assert_on_levels(y, lv)
    xc = np.clip(np64(x), 0, 1)
    assert_close_off_ties(np64(y), np.round(n * xc) / n, n * xc, atol=1e-6)
    g = randn(4, 50, seed=9)
    (g * y).sum().backward()
    inside = (x >= 0) & (x <= 1)
    assert torch.equal(xr.grad, g * inside)


# ---------------------------------------------------------------------------------------------
# LSQ
# ---------------------------------------------------------------------------------------------
def _qnqp(bits, signed):
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_init_and_levels(bits):
    w = randn(8, 4, 3, 3, seed=60 + bits, scale=0.1)
    q = build_quantizer("lsq", bits)
    y = q(w)
    qn, qp = _qnqp(bits, True)
    s = 2 * np.abs(np64(w)).mean() / math.sqrt(qp)
    assert float(q.step.detach()) == pytest.approx(s, rel=1e-5)
    lv = q.levels()
    assert lv.shape == (qn + qp + 1,)
    np.testing.assert_allclose(np64(lv), s * np.arange(-qn, qp + 1), rtol=1e-5, atol=1e-9)
    assert_on_levels(y, lv)
    v = np64(w) / s
    assert_close_off_ties(np64(y), np.clip(np.round(v), -qn, qp) * s, v, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsq_activation_init_and_levels(bits):
    x = torch.relu(randn(4, 3, 5, 5, seed=70 + bits))
    q = build_quantizer("lsq", bits, role="act")
    q.train()
    y = q(x)
    qn, qp = _qnqp(bits, False)
    s = 2 * np.abs(np64(x)).mean() / math.sqrt(qp)
    assert float(q.step.detach()) == pytest.approx(s, rel=1e-5)
    lv = q.levels()
    np.testing.assert_allclose(np64(lv), s * np.arange(0, qp + 1), rtol=1e-5, atol=1e-9)
    assert_on_levels(y, lv)
    v = np64(x) / s
    assert_close_off_ties(np64(y), np.clip(np.round(v), 0, qp) * s, v, atol=1e-6)


def test_lsq_init_max_puts_the_largest_value_on_the_last_code():
    """init="max": step = max|v|/Qp (per tensor; per channel for per-channel weights), so the
    largest value is exactly representable and no value is clipped; unknown inits are one line."""
    x = randn(4, 3, 5, 5, seed=75)
    q = build_quantizer("lsq", 8, role="act", signed=True, init="max")
    q.train()
    y = q(x)
    s = np.abs(np64(x)).max() / 127
    assert float(q.step.detach()) == pytest.approx(s, rel=1e-6)
    assert float(np.abs(np64(y)).max()) == pytest.approx(np.abs(np64(x)).max(), rel=1e-6)
    w = randn(6, 4, 3, 3, seed=76)
    qw = build_quantizer("lsq", 8, per_channel=True, init="max")
    qw(w)
    np.testing.assert_allclose(np64(qw.step.detach()).reshape(-1), np.abs(np64(w)).reshape(6, -1).max(1) / 127,
                               rtol=1e-6)
    # the paper's init at 8 bits uses a small part of the grid on the same tensor
    qp = build_quantizer("lsq", 8, role="act", signed=True)
    qp.train()
    qp(x)
    assert float(qp.step.detach()) * 127 > 4 * np.abs(np64(x)).max()
    with pytest.raises(ConfigError, match="init must be 'lsq' or 'max'"):
        build_quantizer("lsq", 8, init="mse")


def _lsq_expected_grads(v, s, g, qn, qp, n_grad):
    """The LSQ paper's eq. 3 gradients: (dL/dv, dL/ds) with grad scale 1/sqrt(N*Qp)."""
    r = v / s
    inside = (r > -qn) & (r < qp)
    below = r <= -qn
    above = r >= qp
    dv = g * inside
    ds_el = np.where(inside, np.round(r) - r, np.where(above, qp, -qn))
    ds_el = np.where(below, -qn, ds_el)
    return dv, g * ds_el / math.sqrt(n_grad * qp)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_gradients(bits):
    w0 = randn(6, 5, 3, 3, seed=80 + bits)
    q = build_quantizer("lsq", bits)
    q(w0)  # initialise, then choose a step that clips on both sides
    qn, qp = _qnqp(bits, True)
    s = 1.5 / qp
    q.step.data.fill_(s)
    w = w0.clone().requires_grad_(True)
    g = randn(6, 5, 3, 3, seed=81)
    (g * q(w)).sum().backward()
    v = np64(w0)
    assert (v / s >= qp).any() and (v / s <= -qn).any()
    dv, ds = _lsq_expected_grads(v, s, np64(g), qn, qp, v.size)
    np.testing.assert_allclose(np64(w.grad), dv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(q.step.grad), ds.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsq_activation_gradients(bits):
    x0 = randn(4, 3, 4, 4, seed=90 + bits, scale=1.0, shift=0.3)  # negatives are clipped to 0
    q = build_quantizer("lsq", bits, role="act")
    q.train()
    q(x0)
    qn, qp = _qnqp(bits, False)
    s = 1.6 / qp
    q.step.data.fill_(s)
    x = x0.clone().requires_grad_(True)
    g = randn(4, 3, 4, 4, seed=91)
    (g * q(x)).sum().backward()
    v = np64(x0)
    assert (v / s >= qp).any() and (v <= 0).any()
    n_features = 3 * 4 * 4  # features per sample
    dv, ds = _lsq_expected_grads(v, s, np64(g), qn, qp, n_features)
    np.testing.assert_allclose(np64(x.grad), dv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(q.step.grad), ds.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n_out", [1, 4])
def test_lsq_per_channel(bits, n_out):
    scales = torch.tensor([0.05, 0.5, 1.0, 3.0])[:n_out].reshape(-1, 1, 1, 1)
    w0 = randn(n_out, 3, 3, 3, seed=100 + bits) * scales
    q = build_quantizer("lsq", bits, per_channel=True)
    y = q(w0)
    qn, qp = _qnqp(bits, True)
    lv = q.levels()
    assert lv.shape == (n_out, qn + qp + 1)
    s_c = [2 * np.abs(np64(w0[c])).mean() / math.sqrt(qp) for c in range(n_out)]
    for c in range(n_out):
        np.testing.assert_allclose(np64(lv[c]), s_c[c] * np.arange(-qn, qp + 1), rtol=1e-5, atol=1e-9)
    assert_on_levels(y, lv)
    # gradients with per-channel steps that clip on both sides; N = elements of one channel
    new = torch.tensor([1.2, 0.4, 0.9, 2.0])[:n_out] * scales.reshape(-1) / qp
    q.step.data = new.reshape(-1, 1, 1, 1).clone()
    w = w0.clone().requires_grad_(True)
    g = randn(*w0.shape, seed=101)
    (g * q(w)).sum().backward()
    n_per = w0[0].numel()
    for c in range(n_out):
        dv, ds = _lsq_expected_grads(np64(w0[c]), float(new[c]), np64(g[c]), qn, qp, n_per)
        np.testing.assert_allclose(np64(w.grad[c]), dv, rtol=0, atol=1e-6)
        np.testing.assert_allclose(float(q.step.grad.reshape(-1)[c]), ds.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_state_dict_round_trip(per_channel):
    w = randn(4, 3, 3, 3, seed=110) * torch.tensor([0.1, 1.0, 2.0, 0.3]).reshape(-1, 1, 1, 1)
    q1 = build_quantizer("lsq", 3, per_channel=per_channel)
    q1(w)
    with torch.no_grad():  # move the step away from its data-driven init
        q1.step.mul_(torch.linspace(0.7, 1.3, q1.step.numel()).reshape(q1.step.shape))
    sd = q1.state_dict()
    q2 = build_quantizer("lsq", 3, per_channel=per_channel)
    q2.load_state_dict(sd)
    w2 = randn(4, 3, 3, 3, seed=111) * 0.8  # different data: a re-init from data would differ
    assert torch.equal(q2(w2), q1(w2))
    assert torch.equal(q2.levels(), q1.levels())
    assert torch.equal(q2.step, q1.step)


def test_lsq_act_state_dict_round_trip():
    q1 = build_quantizer("lsq", 4, role="act")
    q1(torch.relu(randn(2, 10, seed=112)))
    q1.step.data.mul_(1.7)
    q2 = build_quantizer("lsq", 4, role="act")
    q2.load_state_dict(q1.state_dict())
    x = torch.relu(randn(3, 10, seed=113)) * 3
    assert torch.equal(q2(x), q1(x))


# ---------------------------------------------------------------------------------------------
# PACT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pact_levels_and_clip(bits):
    alpha = 2.5
    x = randn(8, 40, seed=120 + bits, scale=2.0, shift=0.5)
    q = build_quantizer("pact", bits, init=alpha)
    y = q(x)
    n = 2**bits - 1
    lv = q.levels()
    np.testing.assert_allclose(np64(lv), alpha * np.arange(n + 1) / n, rtol=1e-6, atol=1e-7)
    assert_on_levels(y, lv)
    xc = np.clip(np64(x), 0, alpha)
    assert_close_off_ties(np64(y), np.round(xc * n / alpha) * alpha / n, xc * n / alpha, atol=1e-5)
    assert torch.all(y[x > alpha] == lv[-1]) and torch.all(y[x < 0] == 0)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pact_gradients(bits):
    alpha = 1.5
    inside = torch.linspace(0.01, 1.49, 20)
    above = torch.tensor([1.6, 2.0, 3.5, 10.0, 1.51, 4.0, 7.0])  # 7 beyond alpha
    below = torch.tensor([-0.2, -1.0, -3.0, -0.01, -5.0])  # 5 below 0
    x0 = torch.cat([inside, above, below, torch.zeros(1)])
    q = build_quantizer("pact", bits, init=alpha)
    x = x0.clone().requires_grad_(True)
    g = randn(x0.numel(), seed=130 + bits)
    (g * q(x)).sum().backward()
    mask = (x0 >= 0) & (x0 <= alpha)
    assert torch.equal(x.grad, g * mask)
    exp_alpha = float(g[20:27].double().sum())
    assert float(q.alpha.grad) == pytest.approx(exp_alpha, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# power-of-two and value sets
# ---------------------------------------------------------------------------------------------
PO2 = {
    1: [-1.0, 1.0],
    2: [-1.0, -0.5, 0.5, 1.0],
    3: [-1.0, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1.0],
    4: sorted([s * 2.0**-k for s in (-1, 1) for k in range(8)]),
}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_po2_levels(bits):
    w = randn(300, seed=140 + bits, scale=0.4)
    q = build_quantizer("po2", bits)
    y = q(w)
    smax = float(np.abs(np64(w)).max())
    exp = smax * np.array(PO2[bits])
    lv = q.levels()
    np.testing.assert_allclose(np64(lv), exp, rtol=1e-6)
    assert_on_levels(y, lv)
    assert_nearest(np64(w), np64(y), exp, tol=1e-6)
    assert float(y.abs().max()) == pytest.approx(smax, rel=1e-6)


def test_po2_with_zero():
    w = randn(300, seed=150)
    q = build_quantizer("po2", 3, zero=True)
    y = q(w)
    smax = float(np.abs(np64(w)).max())
    exp = smax * np.array([-1, -0.5, -0.25, 0, 0.25, 0.5, 1])
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-6, atol=1e-9)
    assert_on_levels(y, q.levels())
    assert_nearest(np64(w), np64(y), exp, tol=1e-6)


NAMED = {
    "binary": [-1.0, 1.0],
    "ternary": [-1.0, 0.0, 1.0],
    "po2-2bit": [-1.0, -0.5, 0.5, 1.0],
    "po2-3bit": [-1.0, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1.0],
    "int-2bit": [-2.0, -1.0, 0.0, 1.0],
}


@pytest.mark.parametrize("name", list(NAMED))
def test_valueset_named_sets_unscaled(name):
    w = randn(400, seed=160, scale=1.2)
    q = build_quantizer("valueset", None, values=name)
    y = q(w)
    assert q.levels().tolist() == NAMED[name]
    assert q.bits == max(1, math.ceil(math.log2(len(NAMED[name]))))
    assert_on_levels(y, q.levels())
    assert_nearest(np64(w), np64(y), NAMED[name], tol=1e-7)


@pytest.mark.parametrize("scale", ["none", "max", "mean"])
def test_valueset_user_list(scale):
    vals = [0.35, -0.9, 1.7, 0.1, -0.2]  # unsorted on purpose
    w = randn(500, seed=170, scale=0.8)
    q = build_quantizer("valueset", None, values=vals, scale=scale)
    y = q(w)
    v = np.array(sorted(vals))
    x = np64(w)
    s = {"none": 1.0, "max": np.abs(x).max() / np.abs(v).max(), "mean": np.abs(x).mean() / np.abs(v).mean()}[scale]
    exp = s * v
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-6)
    assert q.bits == 3
    assert_on_levels(y, q.levels())
    assert_nearest(x, np64(y), exp, tol=1e-6)


def test_valueset_binary_mean_equals_bwn():
    w = randn(10, 20, seed=180, scale=0.3)
    a = build_quantizer("valueset", None, values="binary", scale="mean")(w)
    b = build_quantizer("bwn", 1)(w)
    assert torch.equal(a, b)


def test_valueset_binary_mean_equals_bwn_with_zero_weights():
    # eq. 14: sign(0) = +1, so a zero weight maps to +beta in BWN; "binary + mean = BWN" must hold
    w = randn(10, 20, seed=181, scale=0.3)
    w[0, :4] = 0.0
    a = build_quantizer("valueset", None, values="binary", scale="mean")(w)
    b = build_quantizer("bwn", 1)(w)
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", ["max", "mean"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_valueset_per_channel(scale, n_out):
    vals = NAMED["po2-2bit"]
    w = randn(n_out, 4, 3, 3, seed=190) * torch.tensor([0.1, 1.0, 4.0])[:n_out].reshape(-1, 1, 1, 1)
    q = build_quantizer("valueset", None, values="po2-2bit", scale=scale, per_channel=True)
    y = q(w)
    lv = q.levels()
    assert lv.shape == (n_out, 4)
    v = np.array(vals)
    for c in range(n_out):
        x = np64(w[c])
        s = np.abs(x).max() / np.abs(v).max() if scale == "max" else np.abs(x).mean() / np.abs(v).mean()
        np.testing.assert_allclose(np64(lv[c]), s * v, rtol=1e-6)
        assert_nearest(x, np64(y[c]), s * v, tol=1e-6)
    assert_on_levels(y, lv)


# ---------------------------------------------------------------------------------------------
# straight-through gradients of the weight quantizers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bits,opts",
    [
        ("minmax", 1, {}),
        ("minmax", 2, {}),
        ("minmax", 4, {}),
        ("minmax", 8, {}),
        ("minmax", 3, {"per_channel": True}),
        ("bwn", 1, {}),
        ("bwn", 1, {"per_channel": True}),
        ("twn", 2, {}),
        ("twn", 2, {"per_channel": True}),
        ("po2", 1, {}),
        ("po2", 2, {}),
        ("po2", 3, {}),
        ("valueset", None, {"values": "ternary", "scale": "max"}),
        ("valueset", None, {"values": [-0.9, -0.2, 0.1, 0.35, 1.7]}),
        ("valueset", None, {"values": "po2-2bit", "scale": "mean", "per_channel": True}),
    ],
)
def test_identity_ste(name, bits, opts):
    w = randn(4, 6, 3, 3, seed=200, scale=0.5)
    g, c = ste_grad(build_quantizer(name, bits, **opts), w)
    assert torch.equal(g, c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sawb_clipped_ste(bits):
    w0 = randn(4000, seed=210 + bits, scale=0.3)
    c1, c2 = SAWB_TABLE[bits]
    x = np64(w0)
    alpha = c1 * math.sqrt((x**2).mean()) + c2 * np.abs(x).mean()
    g, c = ste_grad(build_quantizer("sawb", bits), w0)
    exp = np64(c) * (np.abs(x) <= alpha)
    clear = np.abs(np.abs(x) - alpha) > 1e-5 * alpha
    assert (np.abs(x) > alpha).any() or bits == 8
    np.testing.assert_array_equal(np64(g)[clear], exp[clear])


# ---------------------------------------------------------------------------------------------
# activation running range (min-max / uniform)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_minmax_act_running_range(bits, momentum):
    opts = {} if momentum == 0.1 else {"momentum": momentum}
    q = build_quantizer("minmax", bits, role="act", **opts)
    q.train()
    n = 2**bits - 1
    x1 = randn(4, 50, seed=220, scale=1.0, shift=0.2)
    x2 = randn(4, 50, seed=221, scale=2.0, shift=-0.5)
    q(x1)
    lo, hi = float(x1.min()), float(x1.max())  # first call: the batch range itself
    np.testing.assert_allclose(np64(q.levels()), lo + np.arange(n + 1) * (hi - lo) / n, rtol=1e-5, atol=1e-6)
    q(x2)
    lo = (1 - momentum) * lo + momentum * float(x2.min())
    hi = (1 - momentum) * hi + momentum * float(x2.max())
    exp = lo + np.arange(n + 1) * (hi - lo) / n
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5, atol=1e-6)
    # eval: frozen range, values beyond it are clipped, clipped STE
    q.eval()
    x3 = torch.cat([randn(100, seed=222, scale=5.0), torch.tensor([lo - 1.0, hi + 1.0, lo + 1e-3, hi - 1e-3])])
    xr = x3.clone().requires_grad_(True)
    y = q(xr)
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5, atol=1e-6)
    yy = np64(y)
    assert yy.min() >= exp[0] - 1e-6 and yy.max() <= exp[-1] + 1e-5
    assert_nearest(np.clip(np64(x3), lo, hi), yy, exp, tol=1e-5)
    assert abs(yy[-4] - exp[0]) < 1e-6 and abs(yy[-3] - exp[-1]) < 1e-5
    g = randn(x3.numel(), seed=223)
    (g * y).sum().backward()
    xx = np64(x3)
    clear = (np.abs(xx - lo) > 1e-5) & (np.abs(xx - hi) > 1e-5)
    np.testing.assert_array_equal(np64(xr.grad)[clear], (np64(g) * ((xx >= lo) & (xx <= hi)))[clear])
    q(x3 * 10)  # still frozen
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_act_running_max(bits):
    q = build_quantizer("uniform", bits)
    q.train()
    n = 2**bits - 1
    x1 = torch.relu(randn(3, 30, seed=230))
    x2 = torch.relu(randn(3, 30, seed=231, scale=3.0))
    q(x1)
    r = float(x1.max())
    q(x2)
    r = 0.9 * r + 0.1 * float(x2.max())
    exp = r * np.arange(n + 1) / n
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5, atol=1e-7)
    q.eval()
    x3 = torch.cat([randn(60, seed=232, scale=4.0), torch.tensor([r + 2.0, -1.0])])
    y = q(x3)
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5, atol=1e-7)
    assert_on_levels(y, q.levels())
    xc = np.clip(np64(x3), 0, r)
    assert_nearest(xc, np64(y), exp, tol=1e-5)
    assert y[-2] == q.levels()[-1] and y[-1] == 0


# ---------------------------------------------------------------------------------------------
# every activation quantizer: outputs exactly on levels(), at most 2^bits distinct values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("minmax", {}), ("uniform", {}), ("pact", {"init": 2.7}), ("dorefa", {}), ("lsq", {})])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_activation_outputs_exactly_on_levels(name, opts, bits, seed):
    q = build_quantizer(name, bits, role="act", **opts)
    q.train()
    x = randn(8, 125, seed=240 + seed, scale=3.0, shift=0.3 + 0.17 * seed)
    y = q(x)
    assert_on_levels(y, q.levels())
    assert y.unique().numel() <= 2**bits
    q.eval()
    y = q(x * 1.3)
    assert_on_levels(y, q.levels())


def test_numeric_edges_session25():
    """Session 25 (a user with odd tensors): SAT scaled a constant or all-zero weight by 1e4 (an all-0.7 weight came
    out as 10000); a uniform activation quantizer whose first training batch was all negative output that negative
    maximum for every input; sawb closed_form's refused set_bits(6) kept 6 bits and failed on the next call with a
    KeyError; numpy and tensor integers were refused as bits; an LQ-Net state saved at 2 bits loaded into a 4-bit
    quantizer and failed in the next forward with a matmul shape error."""
    import numpy as np

    from lowbit.errors import ConfigError
    from lowbit.quant import build_quantizer

    sat = build_quantizer("sat", 2)
    for w in (torch.zeros(4, 3, 3, 3), torch.full((4, 3, 3, 3), 0.7), torch.tensor([[0.4]])):
        assert sat(w).abs().max() <= 1.0, w.flatten()[0]
    u = build_quantizer("uniform", 4, role="act")
    u.train()
    u(-torch.rand(64) - 0.1)
    assert u.awaits_data()  # not started on an all-negative batch
    x = torch.rand(64)
    y = u(x)
    assert y.min() >= 0 and not u.awaits_data()
    u(-torch.rand(64))
    u.eval()
    assert u(torch.tensor([0.5, -1.0])).min() == 0
    s = build_quantizer("sawb", 2, alpha="closed_form")
    with pytest.raises(ConfigError, match="closed-form constants exist for bits"):
        s.set_bits(6)
    assert s.bits == 2 and torch.isfinite(s(torch.randn(8, 4))).all()
    s.set_bits(np.int64(3))
    s.set_bits(torch.tensor(4))
    assert s.bits == 4 and type(s.bits) is int
    with pytest.raises(ConfigError, match="integer bits"):
        s.set_bits(3.5)
    a = build_quantizer("lqnet", 4)
    a(torch.randn(8, 4))
    a.set_bits(2)
    a(torch.randn(8, 4))
    b = build_quantizer("lqnet", 4)
    with pytest.raises(ConfigError, match=r"basis: saved at 2 bits, this quantizer has 4: set_bits\(2\) before"):
        b.load_state_dict(a.state_dict())
    b.set_bits(2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.basis, a.basis)
    c = build_quantizer("centroids", 3)  # session 26: torch's multi-line size-mismatch RuntimeError
    c(torch.randn(8, 4))
    with pytest.raises(ConfigError, match=r"centroids: saved at 3 bits, this quantizer has 2: set_bits\(3\) before"):
        build_quantizer("centroids", 2).load_state_dict(c.state_dict())
    with pytest.raises(ConfigError, match="signed: true"):
        build_quantizer("lsq", 1, role="act", signed=True)


@pytest.mark.parametrize("name, role, bits", [("bnn", "act", 1), ("bnn", "weight", 1), ("qnn", "weight", 1),
                                              ("centroids", "act", 3), ("centroids", "act", 5), ("lqnet", "act", 2)])
def test_nan_propagates_through_nearest_level_quantizers(name, role, bits):
    """Session 25: sign and nearest-level quantizers sent NaN to a finite level (bnn: -1; centroids: the lowest or
    highest; lqnet: 0), so NaN data trained on a finite loss without a word; now NaN stays NaN, as in torch's ops
    (and training stops with TrainingDiverged)."""
    q = build_quantizer(name, bits, role=role)
    q.train()
    q(torch.linspace(-1, 2, 64))
    y = q(torch.tensor([0.5, float("nan"), -0.5, float("inf")]))
    assert torch.isnan(y[1]) and torch.isfinite(y[[0, 2]]).all()


def test_grad_scale_keeps_the_value_bit_for_bit():
    """Session 26: grad_scale's forward was (x - x·g).detach() + x·g, which moved ~0.3 % of float32 values by an ulp
    (its docstring: "forward x unchanged")."""
    from lowbit.quant import grad_scale

    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = grad_scale(x, 1 / (1000 * 7) ** 0.5)
    assert torch.equal(y.detach(), x.detach())
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / (1000 * 7) ** 0.5))


@pytest.mark.parametrize("name, role", [("centroids", "weight"), ("centroids", "act"), ("lqnet", "weight"),
                                        ("lqnet", "act")])
def test_set_bits_to_the_same_width_keeps_the_codebook(name, role):
    """Session 26: set_bits to the width a quantizer already has emptied centroid / LQ-Net codebooks (a trained
    digits network fell from 90.2 % to 9.8 % after lowbit.set_bits(m, {"*": {"weight": 4, "act": 4}}) at 4 bits)."""
    from lowbit.quant import build_quantizer

    q = build_quantizer(name, 3, role=role)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    q.train()
    q(x)
    q(x * 1.1)
    q.eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    ref = q(x)
    q.set_bits(3)
    assert not q.awaits_data()
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("name, role, bits, opts", [("pact", "act", 4, {}), ("lsq", "act", 4, {}),
                                                    ("dorefa", "act", 4, {}), ("minmax", "act", 8, {}),
                                                    ("sawb", "weight", 4, {"alpha": "mse"})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizers_compute_in_float32_under_autocast(name, role, bits, opts, dtype):
    """Under torch.autocast (mixed precision) a quantizer computes in float32 with autocast off, as
    torch.amp.custom_fwd(cast_inputs=torch.float32) does: the codes, the output, the STE gradients and the learned
    step are those of the float32 quantizer on the same (bfloat16/float16) input. Before session 29 it computed in
    the layer input's bfloat16: codes one off at any bits (the output off the float32 levels), LSQ's step initialised
    as a bfloat16 parameter with a gradient from bfloat16 sums, and SAWB's alpha search summed its errors in
    bfloat16 (linalg.vecdot is on CPU autocast's list): another alpha than evaluation and the export use."""
    g = torch.Generator().manual_seed(0)
    if role == "act":
        x = (torch.randn(8, 8, 8, 8, generator=g) * 2).to(dtype)  # a layer input under autocast: half precision
    else:
        x = torch.randn(8, 8, 3, 3, generator=g) * 0.2  # a float32 weight
    up = torch.randn(x.shape, generator=g)
    outs = []
    for amp in (False, True):
        torch.manual_seed(0)
        q = build_quantizer(name, bits, role=role, **opts).train()
        xi = (x if amp else x.float()).clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            y = q(xi)
        y.backward(up.to(y.dtype))
        outs.append((y.detach(), xi.grad.float(), q))
    (y0, gx0, q0), (y1, gx1, q1) = outs
    assert torch.equal(y1.float(), y0)  # bit for bit: the same codes on the same float32 levels
    assert y1.dtype == torch.float32 and torch.equal(q1.levels(), q0.levels())
    assert torch.equal(gx1, gx0.to(x.dtype).float())  # the STE mask (in the input's dtype, as autograd casts it)
    for p0, p1 in zip(q0.parameters(), q1.parameters()):
        assert p1.dtype == torch.float32 and torch.equal(p1, p0)  # LSQ's step: initialised in float32
        assert torch.equal(p1.grad, p0.grad)
