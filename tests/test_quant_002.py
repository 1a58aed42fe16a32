"""Tests of the quantizers of seed 002's W3A3 table: bnn, qnn, sat, lqnet, centroids.

Every expected value is computed here with numpy / plain torch from the papers' formulas (BinaryNet,
QNN, SAT, LQ-Nets, k-means) and hand cases; the library's helpers never produce an expected value.
Set membership (``torch.isin``) is exact equality.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.models import create_model
from lowbit.quant import build_quantizer, list_quantizers
from lowbit.quantize import quantize, weight_param
from quant_helpers import assert_close_off_ties, assert_on_levels, np64, randn

NEW = ["bnn", "qnn", "sat", "lqnet", "centroids"]
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("w3a3_*.yaml"))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def assert_nearest(x, y, levels, tol=1e-6) -> None:
    """y is (one of) the nearest levels to x: |x - y| <= min_j |x - q_j| + tol."""
    x, y, levels = np.asarray(x, float).ravel(), np.asarray(y, float).ravel(), np.asarray(levels, float)
    err = np.abs(x - y) - np.abs(x[:, None] - levels[None, :]).min(1)
    assert err.max() <= tol, f"not the nearest level: excess {err.max()} at x={x[err.argmax()]}"


def nearest_np(x, levels):
    """Index of the nearest of the sorted ``levels`` (a half-way tie goes to the upper one)."""
    x, levels = np.asarray(x, float).ravel(), np.asarray(levels, float)
    d = np.abs(x[:, None] - levels[None, :])
    # argmin picks the first minimum; reverse so that a tie picks the upper (later) level
    return len(levels) - 1 - np.argmin(d[:, ::-1], axis=1)


def grad_of(q, x0, seed=7):
    """(x.grad, g, y) for the loss sum(g * q(x))."""
    x = x0.clone().requires_grad_(True)
    g = randn(*x0.shape, seed=seed)
    y = q(x)
    (g * y).sum().backward()
    return x.grad, g, y


def mse(y, x) -> float:
    return float(((y.detach().double() - x.double()) ** 2).mean())


# ---------------------------------------------------------------------------------------------
# registry, bits and options
# ---------------------------------------------------------------------------------------------
def test_registered_for_both_roles():
    for name in NEW:
        assert name in list_quantizers("weight") and name in list_quantizers("act")
        assert build_quantizer(name, 1 if name == "bnn" else 3).role == "weight"


@pytest.mark.parametrize("name,bits,allowed", [
    ("bnn", 2, "1"), ("bnn", 0, "1"), ("bnn", 3, "1"),
    ("qnn", 0, "1..8"), ("qnn", 9, "1..8"),
    ("sat", 0, "1..8"), ("sat", 9, "1..8"),
    ("lqnet", 0, "1..8"), ("lqnet", 9, "1..8"),
    ("centroids", 0, "1..8"), ("centroids", 9, "1..8"),
])
@pytest.mark.parametrize("role", ["weight", "act"])
def test_bits_out_of_range(name, bits, allowed, role):
    with pytest.raises(ConfigError) as e:
        build_quantizer(name, bits, role=role)
    msg = str(e.value)
    assert f"'{name}'" in msg and allowed in msg and str(bits) in msg and "\n" not in msg


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("bits", [2.5, True, None])
def test_bits_not_an_integer(name, bits):
    with pytest.raises(ConfigError):
        build_quantizer(name, bits)


@pytest.mark.parametrize("name,bits,opts,words", [
    ("sat", 3, {"init": 4.0}, ["init", "weight"]),
    ("sat", 3, {"calibrated": False}, ["calibrated", "weight"]),
    ("sat", 3, {"role": "act", "scale_grad": True}, ["scale_grad", "act"]),
    ("sat", 3, {"role": "act", "init": 0.0}, ["init", "> 0"]),
    ("lqnet", 3, {"role": "act", "per_channel": True}, ["per_channel"]),
    ("lqnet", 3, {"momentum": 0.0}, ["momentum"]),
    ("lqnet", 3, {"momentum": 1.5}, ["momentum"]),
    ("lqnet", 3, {"qem_iters": 0}, ["qem_iters"]),
    ("lqnet", 3, {"qem_iters": 1.5}, ["qem_iters"]),
    ("centroids", 3, {"momentum": 0.0}, ["momentum"]),
    ("minmax", 3, {"role": "act", "momentum": -0.5}, ["momentum", "(0, 1]"]),
    ("minmax", 3, {"role": "act", "momentum": 1.5}, ["momentum"]),
    ("minmax", 3, {"role": "act", "momentum": float("nan")}, ["momentum"]),
    ("uniform", 3, {"momentum": -0.5}, ["uniform", "momentum"]),
    ("pact", 3, {"init": float("nan")}, ["init", "finite"]),
    ("pact", 3, {"init": float("inf")}, ["init", "finite"]),
    ("sat", 3, {"role": "act", "init": float("nan")}, ["init", "finite"]),
    ("centroids", 3, {"per_channel": True}, ["per_channel"]),
    ("qnn", 3, {"scale": 2}, ["scale", "(none)"]),
    ("bnn", 1, {"per_channel": True}, ["per_channel", "(none)"]),
])
def test_option_errors(name, bits, opts, words):
    with pytest.raises(ConfigError) as e:
        build_quantizer(name, bits, **opts)
    for w in words:
        assert w in str(e.value)


def test_levels_before_first_call_is_an_error():
    for name in NEW:
        with pytest.raises(RuntimeError):
            build_quantizer(name, 1 if name == "bnn" else 2).levels()


# ---------------------------------------------------------------------------------------------
# BNN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["weight", "act"])
def test_bnn_sign_levels_and_zero(role):
    x = randn(6, 20, seed=1, scale=1.5)
    x[0, :3] = 0.0
    x[1, 0] = -0.0
    q = build_quantizer("bnn", 1, role=role)
    y = q(x)
    assert q.levels().tolist() == [-1.0, 1.0]
    assert_on_levels(y, q.levels())
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0))  # sign(0) = +1, also for -0.0
    assert y[0, :3].tolist() == [1.0, 1.0, 1.0] and y[1, 0] == 1.0
    assert q.n_scales == 0


@pytest.mark.parametrize("role", ["weight", "act"])
def test_bnn_hardtanh_ste(role):
    x0 = torch.tensor([-3.0, -1.0, -0.999, -0.5, 0.0, 0.3, 0.999, 1.0, 1.001, 7.0])
    gx, g, y = grad_of(build_quantizer("bnn", 1, role=role), x0)
    assert y.tolist() == [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert torch.equal(gx, g * torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0, 0.0]))  # 1[|x| <= 1], ±1 included


# ---------------------------------------------------------------------------------------------
# QNN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qnn_weight_levels_and_values(bits):
    w = randn(8, 60, seed=10 + bits, scale=0.8)
    q = build_quantizer("qnn", bits)
    y = q(w)
    n = 2**bits - 1
    exp = -1 + 2 * np.arange(n + 1) / n
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=0, atol=1e-6)
    assert_on_levels(y, q.levels())
    assert y.unique().numel() <= 2**bits
    xc = np.clip(np64(w), -1, 1)
    pre = (xc + 1) * n / 2
    assert_close_off_ties(np64(y), -1 + np.round(pre) * 2 / n, pre)
    assert np.all(np64(y)[np64(w) > 1] == 1.0) and np.all(np64(y)[np64(w) < -1] == -1.0)
    assert q.n_scales == 0


def test_qnn_two_bit_hand_example():
    # levels {-1, -1/3, 1/3, 1}, cell boundaries -2/3, 0, 2/3; 0.0 is half-way between -1/3 and 1/3:
    # round(1.5) = 2 (half to even) -> 1/3
    w = torch.tensor([-5.0, -0.7, -0.6, -0.2, 0.0, 0.1, 0.5, 0.66, 0.67, 2.0])
    y = build_quantizer("qnn", 2)(w)
    np.testing.assert_allclose(np64(y), [-1, -1, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1, 1], atol=1e-7)


def test_qnn_one_bit_weights_are_binarynet():
    w = randn(5, 30, seed=20)
    w[0, :2] = 0.0
    q = build_quantizer("qnn", 1)
    y = q(w)
    assert q.levels().tolist() == [-1.0, 1.0]
    assert torch.equal(y, torch.where(w >= 0, 1.0, -1.0))
    gx, g, _ = grad_of(q, w)
    assert torch.equal(gx, g * (w.abs() <= 1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qnn_activation(bits):
    x = randn(4, 80, seed=30 + bits, scale=0.9, shift=0.4)
    q = build_quantizer("qnn", bits, role="act")
    y = q(x)
    n = 2**bits - 1
    np.testing.assert_allclose(np64(q.levels()), np.arange(n + 1) / n, atol=1e-6)
    assert_on_levels(y, q.levels())
    xc = np.clip(np64(x), 0, 1)
    assert_close_off_ties(np64(y), np.round(xc * n) / n, xc * n)


@pytest.mark.parametrize("role,lo,hi", [("weight", -1.0, 1.0), ("act", 0.0, 1.0)])
@pytest.mark.parametrize("bits", [2, 3])
def test_qnn_clipped_ste(role, lo, hi, bits):
    x0 = torch.cat([randn(200, seed=40, scale=1.5), torch.tensor([lo, hi, lo - 1e-3, hi + 1e-3])])
    gx, g, _ = grad_of(build_quantizer("qnn", bits, role=role), x0)
    assert torch.equal(gx, g * ((x0 >= lo) & (x0 <= hi)))
    assert gx[-4] == g[-4] and gx[-3] == g[-3] and gx[-2] == 0 and gx[-1] == 0


def test_qnn_has_no_data_dependent_scale_unlike_dorefa():
    # small weights (He init scale): QNN's fixed range leaves them on the two levels next to 0,
    # DoReFa's tanh/max normalisation spreads them over all 8 levels
    w = randn(400, seed=50, scale=0.05)
    yq = build_quantizer("qnn", 3)(w)
    assert sorted(yq.unique().tolist()) == pytest.approx([-1 / 7, 1 / 7])
    assert build_quantizer("dorefa", 3)(w).unique().numel() == 8
    # and a weight's value does not depend on the other weights of the tensor
    y_big = build_quantizer("qnn", 3)(torch.cat([w, torch.tensor([5.0])]))
    assert torch.equal(y_big[:-1], yq)


# ---------------------------------------------------------------------------------------------
# SAT: DoReFa weights rescaled to n_out * Var = 1
# ---------------------------------------------------------------------------------------------
def dorefa_np(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(DoReFa weights, the pre-rounding value n*r) from the formula in numpy."""
    n = 2**bits - 1
    t = np.tanh(x)
    r = t / (2 * np.abs(t).max()) + 0.5
    return 2 * np.round(n * r) / n - 1, n * r


@pytest.mark.parametrize("shape,n_out", [((16, 8, 3, 3), 16 * 9), ((32, 16, 1, 1), 32), ((10, 64), 10)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sat_weight_levels_and_variance(shape, n_out, bits):
    w = randn(*shape, seed=60 + bits, scale=0.2)
    q = build_quantizer("sat", bits)
    y = q(w)
    qd, pre = dorefa_np(np64(w), bits)
    c = 1 / np.sqrt(n_out * qd.var())
    n = 2**bits - 1
    np.testing.assert_allclose(np64(q.levels()), (2 * np.arange(n + 1) / n - 1) * c, rtol=0, atol=1e-6 * c)
    assert_on_levels(y, q.levels())
    assert y.unique().numel() <= 2**bits
    assert_close_off_ties(np64(y), qd * c, pre, atol=1e-6 * c)
    assert n_out * np64(y).var() == pytest.approx(1.0, rel=1e-5)  # SAT's rescaled variance
    assert q.n_scales == 1


def test_sat_one_bit_weights():
    w = randn(8, 4, 3, 3, seed=70)
    q = build_quantizer("sat", 1)
    y = q(w)
    beta = np.abs(np64(w)).mean()
    qd = np.where(np64(w) >= 0, beta, -beta)  # DoReFa's 1-bit case: E|w| sign(w)
    c = 1 / np.sqrt(8 * 9 * qd.var())
    np.testing.assert_allclose(np64(y), qd * c, rtol=1e-5)
    assert_on_levels(y, q.levels())
    assert 8 * 9 * np64(y).var() == pytest.approx(1.0, rel=1e-5)


def _sat_expected_grad(w0: torch.Tensor, g: torch.Tensor, bits: int, scale_grad: bool) -> np.ndarray:
    """d sum(g * q*) / dw in float64: DoReFa with the round replaced by the identity in the backward
    (its forward value from numpy), then q* = q / sqrt(n_out Var(q)) with Var(q) a constant or not."""
    n = 2**bits - 1
    v = w0.double().clone().requires_grad_(True)
    t = torch.tanh(v)
    r = t / (2 * t.abs().max()) + 0.5
    expr = 2 * (r * n) / n - 1
    qd = torch.from_numpy(dorefa_np(np64(w0), bits)[0])
    qs = qd + (expr - expr.detach())  # forward: the quantized value; backward: round-free
    n_out = w0.shape[0] * w0[0, 0].numel()
    var = qs.var(unbiased=False) if scale_grad else qd.var(unbiased=False)
    (g.double() * qs / torch.sqrt(n_out * var)).sum().backward()
    return np64(v.grad)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sat_weight_gradients(bits):
    w0 = randn(6, 4, 3, 3, seed=80 + bits, scale=0.5)
    grads = {}
    for sg in (False, True):
        opts = {"scale_grad": True} if sg else {}
        gx, g, _ = grad_of(build_quantizer("sat", bits, **opts), w0, seed=81)
        exp = _sat_expected_grad(w0, g, bits, sg)
        np.testing.assert_allclose(np64(gx), exp, rtol=1e-4, atol=1e-6 * np.abs(exp).max())
        grads[sg] = np64(gx)
    assert np.abs(grads[True] - grads[False]).max() > 1e-3 * np.abs(grads[False]).max()  # the option matters


# ---------------------------------------------------------------------------------------------
# SAT: PACT activations with the calibrated clip gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_sat_act_levels(bits):
    alpha = 2.5
    x = randn(6, 50, seed=90 + bits, scale=2.0, shift=0.5)
    q = build_quantizer("sat", bits, role="act", init=alpha)
    y = q(x)
    n = 2**bits - 1
    np.testing.assert_allclose(np64(q.levels()), alpha * np.arange(n + 1) / n, rtol=1e-6, atol=1e-7)
    assert_on_levels(y, q.levels())
    xc = np.clip(np64(x), 0, alpha)
    assert_close_off_ties(np64(y), np.round(xc * n / alpha) * alpha / n, xc * n / alpha, atol=1e-5)
    assert q.n_scales == 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("calibrated", [True, False])
def test_sat_act_gradients(bits, calibrated):
    alpha = 1.5
    n = 2**bits - 1
    inside = torch.linspace(0.013, 1.487, 23)
    above = torch.tensor([1.6, 2.0, 3.5, 10.0, 1.51])
    below = torch.tensor([-0.2, -1.0, -3.0, -0.01])
    x0 = torch.cat([inside, above, below])
    q = build_quantizer("sat", bits, role="act", init=alpha, calibrated=calibrated)
    gx, g, y = grad_of(q, x0, seed=100 + bits)
    gn, xn = np64(g), np64(x0)
    yq = np.round(np.clip(xn, 0, alpha) * n / alpha) * alpha / n
    np.testing.assert_allclose(np64(y), yq, atol=1e-6)
    ins, abv = (xn > 0) & (xn < alpha), xn >= alpha
    np.testing.assert_array_equal(np64(gx), gn * ins)
    if calibrated:  # SAT: d y_q / d alpha = (y_q - x)/alpha inside, 1 above
        exp = (gn * (yq - xn) / alpha)[ins].sum() + gn[abv].sum()
    else:  # PACT: 0 inside, 1 above
        exp = gn[abv].sum()
    assert float(q.alpha.grad) == pytest.approx(exp, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# LQ-Net
# ---------------------------------------------------------------------------------------------
def all_codes(bits: int, signed: bool) -> np.ndarray:
    """(2^K, K) every code, by itertools (independent of the library's bit trick)."""
    vals = (-1.0, 1.0) if signed else (0.0, 1.0)
    return np.array(list(itertools.product(vals, repeat=bits)))[:, ::-1]


def lq_levels(v: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sorted levels B v, the codes in that order) for a basis v (K,)."""
    b = all_codes(len(v), signed)
    lv = b @ v
    order = np.argsort(lv, kind="stable")
    return lv[order], b[order]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])  # 5 bits: 32 levels, the searchsorted path
def test_lqnet_weight_init_levels_per_channel(bits):
    scales = torch.tensor([0.05, 0.5, 2.0, 1.0]).reshape(-1, 1, 1, 1)
    w = randn(4, 6, 3, 3, seed=110 + bits) * scales
    q = build_quantizer("lqnet", bits)
    q.eval()  # no QEM update: the levels are the init
    y = q(w)
    lv = q.levels()
    assert lv.shape == (4, 2**bits)
    for c in range(4):
        x = np64(w[c])
        s = np.abs(x).mean() / 2 ** (bits - 1)
        exp = s * (2 * np.arange(2**bits) - 2**bits + 1)  # s * {±1, ±3, ..., ±(2^K - 1)}
        np.testing.assert_allclose(np64(lv[c]), exp, rtol=1e-5)
        assert_nearest(x, np64(y[c]), np64(lv[c]), tol=1e-7 * np.abs(x).max())
        assert y[c].unique().numel() <= 2**bits
    assert_on_levels(y, lv)
    assert q.n_scales == 4 * bits


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_lqnet_act_init_levels(bits):
    x = torch.relu(randn(4, 3, 6, 6, seed=120 + bits, scale=1.3))
    q = build_quantizer("lqnet", bits, role="act")
    q.train()  # an activation quantizer starts on a training batch (session 25); levels and y are the start's
    y = q(x)
    xp = np64(x)
    s = xp[xp > 0].mean() / 2 ** (bits - 1)
    exp = s * np.arange(2**bits)
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-5)
    assert_on_levels(y, q.levels())
    assert_nearest(np.clip(xp, 0, exp[-1]), np64(y), exp, tol=1e-6)
    assert q.n_scales == bits


def test_lqnet_one_bit_least_squares_is_mean_abs():
    # B = sign(x) whatever v > 0 is, so (B^T B)^-1 B^T x = sum|x|/N = mean|x|, per output channel
    w1 = randn(3, 40, seed=130) * torch.tensor([[0.1], [1.0], [3.0]])
    w2 = randn(3, 40, seed=131) * torch.tensor([[2.0], [0.2], [0.7]])
    q = build_quantizer("lqnet", 1, momentum=1.0)
    q.train()
    q(w1)
    np.testing.assert_allclose(np64(q.basis[:, 0]), np.abs(np64(w1)).mean(1), rtol=1e-6)
    y = q(w2)
    np.testing.assert_allclose(np64(q.basis[:, 0]), np.abs(np64(w2)).mean(1), rtol=1e-6)
    # that call's output used the basis from before the update: mean|w1| * sign(w2)
    b1 = torch.from_numpy(np.abs(np64(w1)).mean(1)).float().reshape(-1, 1)
    np.testing.assert_allclose(np64(y), np64(torch.where(w2 >= 0, b1, -b1)), rtol=1e-6)
    # with the default moving average: 0.9 old + 0.1 new
    q = build_quantizer("lqnet", 1)
    q.train()
    q(w1)
    q(w2)
    exp = 0.9 * np.abs(np64(w1)).mean(1) + 0.1 * np.abs(np64(w2)).mean(1)
    np.testing.assert_allclose(np64(q.basis[:, 0]), exp, rtol=1e-6)


def _lq_hand(q, x: torch.Tensor, v0: list[float], signed: bool):
    """Set the basis to v0, run one training call; return (output, expected output, expected v*)."""
    q.eval()
    q(x)  # a weight quantizer initialises here (no update in eval mode; an activation one waits for training)
    q.basis.copy_(torch.tensor([v0]))  # the basis set by hand
    q.initialized.fill_(True)
    q.train()
    y = q(x)
    xn = np64(x).ravel()
    lv, codes = lq_levels(np.array(v0), signed)
    k = nearest_np(xn, lv)
    v_star = np.linalg.lstsq(codes[k], xn, rcond=None)[0]
    return y, lv[k].reshape(x.shape), v_star


def test_lqnet_two_bit_weight_least_squares_hand_case():
    # levels of v = (0.2, 0.5): {-0.7, -0.3, 0.3, 0.7}
    x = torch.tensor([[-0.9, -0.65, -0.4, -0.2, 0.05, 0.25, 0.35, 0.6, 0.8, 1.1]])
    q = build_quantizer("lqnet", 2, momentum=1.0)
    y, y_exp, v_star = _lq_hand(q, x, [0.2, 0.5], signed=True)
    np.testing.assert_allclose(np64(y), y_exp, rtol=1e-6)
    np.testing.assert_allclose(np64(q.basis[0]), v_star, rtol=1e-6)
    # by hand: codes (b0, b1) = (-1,-1) x2, (1,-1) x2, (-1,1) x3, (1,1) x3, so B^T B = 10 I and
    # B^T x = (1.55 - 0.6 - 0.65 + 2.5, 1.55 + 0.6 + 0.65 + 2.5) = (2.8, 5.3): v* = (0.28, 0.53)
    np.testing.assert_allclose(v_star, [0.28, 0.53], rtol=1e-7)  # x is float32
    np.testing.assert_allclose(np64(q.basis[0]), [0.28, 0.53], rtol=1e-6)


def test_lqnet_two_bit_act_least_squares_hand_case():
    # levels of v = (0.5, 1.0) with {0,1} codes: {0, 0.5, 1.0, 1.5}
    x = torch.tensor([-1.0, 0.0, 0.1, 0.4, 0.6, 0.7, 0.95, 1.2, 1.4, 1.9, 3.0])
    q = build_quantizer("lqnet", 2, role="act", momentum=1.0)
    y, y_exp, v_star = _lq_hand(q, x, [0.5, 1.0], signed=False)
    np.testing.assert_allclose(np64(y), y_exp, rtol=1e-6)
    np.testing.assert_allclose(np64(q.basis[0]), v_star, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_lqnet_qem_iterations(bits):
    x = randn(1, 300, seed=140 + bits)
    iters = 3
    q = build_quantizer("lqnet", bits, momentum=0.5, qem_iters=iters)
    q.eval()
    q(x)
    v_old = np64(q.basis[0])
    q.train()
    q(x)
    v = v_old.copy()
    for _ in range(iters):  # alternate nearest codes and least squares
        lv, codes = lq_levels(v, True)
        v = np.linalg.lstsq(codes[nearest_np(np64(x), lv)], np64(x).ravel(), rcond=None)[0]
    np.testing.assert_allclose(np64(q.basis[0]), 0.5 * v_old + 0.5 * v, rtol=1e-5)


def test_lqnet_singular_codes_keep_the_undetermined_direction():
    # v = (1, 2): levels {-3, -1, 1, 3}; the data uses only the codes (-1,-1) and (1,1), so B^T B is
    # singular and only v0 + v1 is determined: it becomes mean(x * b) = 3.4, v0 - v1 stays -1
    x = torch.tensor([[-3.5, -3.3, 3.2, 3.6]])
    q = build_quantizer("lqnet", 2, momentum=1.0)
    q.eval()
    q(x)
    q.basis.copy_(torch.tensor([[1.0, 2.0]]))
    q.train()
    q(x)
    v = np64(q.basis[0])
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(v, [1.2, 2.2], rtol=1e-6)


@pytest.mark.parametrize("role", ["weight", "act"])
@pytest.mark.parametrize("bits", [2, 3])
def test_lqnet_reduces_quantization_error(role, bits):
    x = randn(8, 300, seed=150 + bits)
    if role == "act":
        x = torch.relu(x)
    q = build_quantizer("lqnet", bits, role=role)
    q.train()
    errs = [mse(q(x), x) for _ in range(60)]
    assert errs[-1] < 0.85 * errs[0]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errs[:-1], errs[1:]))  # QEM never increases it here
    y = q(x)
    assert_on_levels(y, q.levels())
    for c in range(8):
        assert y[c].unique().numel() <= 2**bits


def test_lqnet_eval_mode_does_not_update():
    x = randn(4, 50, seed=160)
    q = build_quantizer("lqnet", 3)
    q.train()
    q(x)
    q(x * 2)
    b = q.basis.clone()
    q.eval()
    q(x * 5)
    assert torch.equal(q.basis, b)


@pytest.mark.parametrize("role", ["weight", "act"])
def test_lqnet_ste(role):
    x0 = randn(4, 6, 3, 3, seed=170, shift=0.3)
    q = build_quantizer("lqnet", 3, role=role)
    q.eval()
    q(x0)
    gx, g, _ = grad_of(q, x0)
    if role == "weight":
        assert torch.equal(gx, g)
    else:
        top = float(q.levels()[-1])
        assert (x0 < 0).any() and (x0 > top).any()
        assert torch.equal(gx, g * ((x0 >= 0) & (x0 <= top)))


@pytest.mark.parametrize("role", ["weight", "act"])
def test_lqnet_state_dict_round_trip(role):
    w = randn(4, 3, 3, 3, seed=180) * torch.tensor([0.1, 1.0, 2.0, 0.3]).reshape(-1, 1, 1, 1)
    q1 = build_quantizer("lqnet", 3, role=role)
    q1.train()
    for k in range(5):
        q1(w * (1 + 0.1 * k))
    q2 = build_quantizer("lqnet", 3, role=role)
    q2.load_state_dict(q1.state_dict())
    assert torch.equal(q2.basis, q1.basis)
    w2 = randn(4, 3, 3, 3, seed=181) * 0.8  # a re-init from these data would differ
    q1.eval(), q2.eval()
    assert torch.equal(q2(w2), q1(w2))
    assert torch.equal(q2.levels(), q1.levels())
    q1.train(), q2.train()
    assert torch.equal(q2(w2), q1(w2)) and torch.equal(q2.basis, q1.basis)


# ---------------------------------------------------------------------------------------------
# scalar centroids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])  # 6 bits: 64 levels, the searchsorted path
def test_centroids_init_from_quantiles(bits):
    w = randn(6, 50, seed=190 + bits, scale=0.4)
    q = build_quantizer("centroids", bits)
    q.eval()
    y = q(w)
    p = (np.arange(2**bits) + 0.5) / 2**bits
    exp = np.quantile(np64(w), p)
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-6, atol=1e-7)
    assert_on_levels(y, q.levels())
    assert_nearest(np64(w), np64(y), exp, tol=1e-6)
    assert y.unique().numel() <= 2**bits
    assert q.n_scales == 2**bits


def test_centroids_init_after_relu_has_distinct_centroids():
    x = torch.relu(randn(500, seed=200))  # about half the entries are exactly 0
    q = build_quantizer("centroids", 3, role="act")
    q.train()  # an activation quantizer starts on a training batch (session 25); levels() are the start's
    q(x)
    xn = np64(x)
    exp = np.quantile(np.unique(xn), (np.arange(8) + 0.5) / 8)
    np.testing.assert_allclose(np64(q.levels()), exp, rtol=1e-6)
    assert q.levels().unique().numel() == 8


def test_centroids_kmeans_step_hand_case():
    # centroids {-1, 0, 1, 3}: cells (-inf, -0.5), [-0.5, 0.5), [0.5, 2), [2, inf)
    q = build_quantizer("centroids", 2)
    q.eval()
    q(torch.zeros(3))
    q.centroids.copy_(torch.tensor([-1.0, 0.0, 1.0, 3.0]))
    x = torch.tensor([-2.0, -0.9, -0.6, 0.5, 0.7, 1.9, 0.2, -0.1])
    q.train()
    y = q(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # 0.5 is a tie: the upper one
    # means: -1.1667 (3 entries), 0.05 (2), 1.0333 (3), empty -> keeps 3
    means = [(-2.0 - 0.9 - 0.6) / 3, (0.2 - 0.1) / 2, (0.5 + 0.7 + 1.9) / 3]
    exp = [0.9 * c + 0.1 * m for c, m in zip([-1.0, 0.0, 1.0], means)] + [3.0]
    np.testing.assert_allclose(np64(q.centroids), exp, rtol=1e-6)
    assert q.levels().tolist() == [-1.0, 0.0, 1.0, 3.0]  # levels() = the codebook that call used


@pytest.mark.parametrize("role", ["weight", "act"])
@pytest.mark.parametrize("bits", [2, 3])
def test_centroids_reduce_quantization_error(role, bits):
    x = randn(2000, seed=210 + bits)
    if role == "act":
        x = torch.relu(x)
    q = build_quantizer("centroids", bits, role=role)
    q.train()
    errs = [mse(q(x), x) for _ in range(60)]
    assert errs[-1] < 0.9 * errs[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs[:-1], errs[1:]))  # Lloyd steps never increase it
    y = q(x)
    assert_on_levels(y, q.levels())
    assert y.unique().numel() <= 2**bits


def test_centroids_eval_mode_does_not_update():
    q = build_quantizer("centroids", 3, role="act")
    q.train()
    q(torch.relu(randn(300, seed=220)))
    c = q.centroids.clone()
    q.eval()
    q(torch.relu(randn(300, seed=221)) * 4)
    assert torch.equal(q.centroids, c)


@pytest.mark.parametrize("role", ["weight", "act"])
def test_centroids_ste(role):
    x0 = randn(8, 40, seed=230, scale=2.0)
    q = build_quantizer("centroids", 2, role=role)
    q.eval()
    q(x0[:, :20])  # codebook from half the data, so that the other half exceeds it
    gx, g, _ = grad_of(q, x0)
    if role == "weight":
        assert torch.equal(gx, g)
    else:
        lo, hi = float(q.levels()[0]), float(q.levels()[-1])
        assert (x0 < lo).any() and (x0 > hi).any()
        assert torch.equal(gx, g * ((x0 >= lo) & (x0 <= hi)))


def test_centroids_state_dict_round_trip():
    q1 = build_quantizer("centroids", 3)
    q1.train()
    for k in range(5):
        q1(randn(500, seed=240 + k))
    q2 = build_quantizer("centroids", 3)
    q2.load_state_dict(q1.state_dict())
    x = randn(500, seed=250, scale=3.0)  # a re-init from these data would differ
    for mode in (False, True):
        q1.train(mode), q2.train(mode)
        assert torch.equal(q2(x), q1(x))
        assert torch.equal(q2.centroids, q1.centroids)


# ---------------------------------------------------------------------------------------------
# the shipped configs: one training step of a small model, quantized weights on their levels
# ---------------------------------------------------------------------------------------------
def test_one_config_per_new_quantizer():
    names = {load_config(p).plan.weight.name for p in CONFIGS}
    assert names >= set(NEW)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_w3a3_config_trains_one_step(path):
    cfg = load_config(path, ["model.name=resnet8", "model.width=0.5"])
    torch.manual_seed(0)
    model = quantize(create_model(cfg.model.name, in_channels=1, num_classes=10, image_size=28,
                                  **cfg.model.options), cfg.plan)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, t = randn(8, 1, 28, 28, seed=260), torch.arange(8) % 10
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    n = 0
    for m in model.modules():
        wp = weight_param(m)
        if wp is not None:
            with torch.no_grad():
                w = m.weight
            assert_on_levels(w, wp.quantizer.levels())
            n += 1
    assert n > 0
