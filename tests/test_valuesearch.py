"""RDHS and SGT (000): value-set search parametrization, its two backward rules, the schedule,
and the multiplication-free check. Expected numbers are worked out by hand in the comments."""

import json
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.methods.valuesearch import (
    RDHSSearch,
    SGTSearch,
    format_values,
    needs_multiplier,
    value_space,
    value_space_report,
)
from lowbit.quant import build_quantizer
from lowbit.quantize import quant_state
from lowbit.train import run

PO2_2 = [-1.0, -0.5, 0.5, 1.0]


def search(cls, values="binary", scale="none", per_channel=False, **kw):
    q = build_quantizer("valueset", None, values=values, scale=scale, per_channel=per_channel)
    return cls(q, **kw)


def param(p, w):
    """α = right_inverse(w) as a leaf tensor that needs a gradient."""
    return p.right_inverse(w).clone().requires_grad_(True)


def quantized_conv(method, values="binary", scale="none", per_channel=False, seed=0, **options):
    """A tiny model whose middle conv is searched (first conv / last linear stay FP)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 16, 3))
    lowbit.quantize(model, {"weight": {"name": "valueset", "values": values, "scale": scale,
                                       "per_channel": per_channel},
                            "method": {"name": method, **options}})
    return model


# --------------------------------------------------------------------------------------------
# the parametrization: α is the trainable tensor, forward values lie exactly in the set
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rdhs", "sgt"])
@pytest.mark.parametrize("values", ["binary", "po2-2bit", "po2-3bit", "int-2bit", [-0.75, 0.1, 2.0]])
def test_forward_values_are_exactly_in_the_value_set(method, values):
    model = quantized_conv(method, values)
    conv = model[1]
    v = build_quantizer("valueset", None, values=values).values
    alpha = conv.parametrizations.weight.original
    assert alpha.shape == (6, 4, 3, 3, v.numel())  # weight shape + (m,): 000's m masks
    # α is the only float tensor of the layer: no latent copy of the weight is kept
    assert [n for n, _ in conv.named_parameters()] == ["bias", "parametrizations.weight.original"]
    for train in (True, False):
        model.train(train)
        w = conv.weight
        assert torch.isin(w, v).all()
        assert torch.equal(w, v[alpha.argmax(-1)])
    # a gradient step keeps it in the set
    model.train()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    with torch.no_grad():
        alpha -= 0.5 * alpha.grad
    assert torch.isin(conv.weight, v).all()


def test_init_is_the_nearest_value_and_alpha_is_half_the_distance():
    w = torch.tensor([0.9, 0.6, 0.2, -0.3, -0.8])
    # init_scale none: nearest of {±1, ±1/2} is 1, 1/2, 1/2, -1/2, -1; α_i = -|w - v_i|/2
    p = search(SGTSearch, PO2_2, init_scale="none")
    a = p.right_inverse(w)
    assert torch.allclose(a[0], torch.tensor([-0.95, -0.7, -0.2, -0.05]))
    assert p.hard(a).tolist() == [1.0, 0.5, 0.5, -0.5, -1.0]
    # init_scale max: c = max|w| / max|V| = 0.9, so w/c = 1, .667, .222, -.333, -.889 -> 1, 1/2, 1/2, -1/2, -1
    p = search(SGTSearch, PO2_2, init_scale="max")
    assert p.hard(p.right_inverse(w)).tolist() == [1.0, 0.5, 0.5, -0.5, -1.0]
    # init_scale mean: c = E|w| / E|V| = 0.56 / 0.75 -> w/c = 1.205, .804, .268, -.402, -1.071
    p = search(SGTSearch, PO2_2, init_scale="mean")
    assert p.hard(p.right_inverse(w)).tolist() == [1.0, 1.0, 0.5, -0.5, -1.0]
    # {±1}: the margin α_+ − α_− is the latent weight itself (SGT then equals BinaryConnect)
    p = search(SGTSearch, "binary")
    a = p.right_inverse(w)
    assert torch.allclose(a[:, 1] - a[:, 0], w)


def test_value_set_scale_is_kept_per_channel_and_survives_a_checkpoint():
    model = quantized_conv("sgt", "po2-2bit", scale="max", per_channel=True)
    conv = model[1]
    p = conv.parametrizations.weight[0]
    assert p.scale.shape == (6, 1, 1, 1) and p.scale_kind() == "per channel"
    w = conv.weight
    assert torch.isin(w / p.scale, torch.tensor(PO2_2)).all()
    assert torch.equal(w.abs().flatten(1).max(1).values, p.scale.flatten())  # s = max|w_c| / 1 at init
    assert p.n_scales == 4 + 6 and p.bits == 2
    other = quantized_conv("sgt", "po2-2bit", scale="max", per_channel=True, seed=1)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other[1].weight, w)


# --------------------------------------------------------------------------------------------
# the backward rules
# --------------------------------------------------------------------------------------------
def test_rdhs_gradient_is_the_softmax_straight_through_gradient_hand_case():
    p = search(RDHSSearch, "binary", tau=1.0)
    alpha = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    w = p(alpha)
    assert w.tolist() == [1.0]  # z = one_hot(argmax) picks +1
    (2 * w).sum().backward()
    # y = (1/4, 3/4); ∂L/∂z = 2·v = (-2, 2); ∂L/∂α = y ⊙ (∂L/∂z − y·∂L/∂z)
    #   = (1/4·(−2 − 1), 3/4·(2 − 1))
    assert torch.allclose(alpha.grad, torch.tensor([[-0.75, 0.75]]))
    # τ = 1/2: y = softmax(0, 2 ln 3) = (1/10, 9/10), ȳ = 0.8;
    #   ∂L/∂α = (2/τ)·y ⊙ (v − ȳ) = 4·(1/10·(−1.8), 9/10·0.2)
    p.tau = 0.5
    alpha.grad = None
    (2 * p(alpha)).sum().backward()
    assert torch.allclose(alpha.grad, torch.tensor([[-0.72, 0.72]]))


def test_rdhs_gradient_matches_a_naive_straight_through_softmax():
    torch.manual_seed(0)
    v = torch.tensor([-1.0, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1.0])
    p = search(RDHSSearch, "po2-3bit", tau=0.7)
    alpha = torch.randn(5, 3, 8, requires_grad=True)
    g = torch.randn(5, 3)
    (p(alpha) * g).sum().backward()
    # the textbook form: z_st = one_hot − y.detach() + y, w = Σ z_st·v (many (…, m) tensors)
    a2 = alpha.detach().clone().requires_grad_(True)
    y = torch.softmax(a2 / 0.7, -1)
    z = torch.nn.functional.one_hot(y.argmax(-1), 8).float()
    w2 = ((z - y.detach() + y) * v).sum(-1)
    (w2 * g).sum().backward()
    assert torch.allclose(alpha.grad, a2.grad, atol=1e-6)


def test_sgt_gradient_is_dl_dw_times_sign_hand_case_and_elementwise():
    p = search(SGTSearch, PO2_2)
    alpha = torch.tensor([[0.0, 0.1, 0.3, 0.2]], requires_grad=True)
    w = p(alpha)
    assert w.tolist() == [0.5]
    (3 * w).sum().backward()
    # ∂L/∂w = 3; sign(v_i − 1/2) = (−1, −1, 0, +1)
    assert alpha.grad.tolist() == [[-3.0, -3.0, 0.0, 3.0]]
    torch.manual_seed(1)
    alpha = torch.randn(4, 5, 4, requires_grad=True)
    g = torch.randn(4, 5)
    w = p(alpha)
    (w * g).sum().backward()
    expected = g.unsqueeze(-1) * torch.sign(torch.tensor(PO2_2) - w.detach().unsqueeze(-1))
    assert torch.equal(alpha.grad, expected)


def test_sgt_keeps_only_the_chosen_index_for_backward_and_rdhs_the_softmax():
    """000 Table 4's claim in bytes: SGT saves one byte per weight, RDHS the m floats of y."""

    def saved_bytes(p, alpha):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            p(alpha)
        return sum(sizes)

    alpha = torch.randn(64, 32, 3, 3, 8, requires_grad=True)
    n = 64 * 32 * 3 * 3
    sgt = saved_bytes(search(SGTSearch, "po2-3bit"), alpha)
    rdhs = saved_bytes(search(RDHSSearch, "po2-3bit"), alpha)
    assert sgt <= n + 64  # uint8 index + the value table
    assert 4 * 8 * n <= rdhs <= 4 * 8 * n + 64  # y: m float32 per weight + the table


def test_rdhs_mu_zero_is_deterministic_and_noise_only_in_training():
    alpha = torch.randn(200, 4, requires_grad=True)
    p = search(RDHSSearch, PO2_2, mu=0.0)
    torch.manual_seed(1)
    a = p(alpha)
    torch.manual_seed(2)
    assert torch.equal(p(alpha), a) and torch.equal(a, p.hard(alpha))
    noisy = search(RDHSSearch, PO2_2, mu=1.0)
    assert not torch.equal(noisy(alpha), noisy(alpha))  # Gumbel noise changes the hard sample
    noisy.eval()
    assert torch.equal(noisy(alpha), a)  # evaluation: argmax α


def test_no_nan_at_tiny_temperature():
    p = search(RDHSSearch, "po2-3bit", tau=1e-5, mu=0.01)
    alpha = torch.tensor([[0.0, 0.0, 3.0, 3.0, -1.0, 50.0, 50.0, 1e-6]] * 3 + [[1.0] * 8], requires_grad=True)
    w = p(alpha)
    (w * torch.tensor([1.0, -2.0, 1e3, 5.0])).sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(alpha.grad).all()
    p.mu = 0.0
    alpha.grad = None
    (p(alpha) * 7).sum().backward()
    assert torch.isfinite(alpha.grad).all()


# --------------------------------------------------------------------------------------------
# methods: schedule, options, errors
# --------------------------------------------------------------------------------------------
def test_rdhs_temperature_schedule_and_resume_state():
    model = quantized_conv("rdhs", "binary", tau0=2.0, tau_decay=0.5, tau_min=0.3)
    m = quant_state(model).method
    p = model[1].parametrizations.weight[0]
    m.setup(model, 100, 10)
    assert p.tau == 2.0 and m.log() == {"tau": 2.0}
    m.on_epoch_end(model, 0)
    assert p.tau == 1.0
    m.on_epoch_end(model, 2)
    assert p.tau == 0.3  # max(2·0.5³, 0.3)
    fresh = quantized_conv("rdhs", "binary", tau0=2.0, tau_decay=0.5, tau_min=0.3)
    m2 = quant_state(fresh).method
    m2.setup(fresh, 100, 10)
    m2.load_state_dict(m.state_dict())
    assert fresh[1].parametrizations.weight[0].tau == 0.3


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="method 'rdhs' searches a finite value set: .* got 'sawb'"):
        lowbit.quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)),
                        {"weight": {"name": "sawb", "bits": 2}, "method": {"name": "rdhs"}})
    with pytest.raises(ConfigError, match="option mu must be >= 0"):
        load_config(None, ["plan.method={name: rdhs, mu: -1}"])
    with pytest.raises(ConfigError, match="option init_scale must be one of max, mean, none"):
        load_config(None, ["plan.method={name: sgt, init_scale: median}"])
    with pytest.raises(ConfigError, match="option tau_min must be a number"):
        load_config(None, ["plan.method={name: rdhs, tau_min: tiny}"])
    # YAML reads 1e-5 (no dot) as a string; it is still a number
    assert quant_state(quantized_conv("rdhs", tau_min="1e-5")).method.tau_min == 1e-5


# --------------------------------------------------------------------------------------------
# the multiplication-free check (000's "Req. Mult")
# --------------------------------------------------------------------------------------------
def test_needs_multiplier_and_notation():
    assert not needs_multiplier([-1, -0.5, 0.5, 1])
    assert not needs_multiplier([-0.3, 0.0, 0.15, 0.6])  # 0.6·{−1/2, 0, 1/4, 1}: one scale
    assert needs_multiplier([-3, -1, 1, 3])  # SAWB/min-max 2-bit grids
    assert needs_multiplier([0.5, 0.7])
    assert format_values([-1, -0.5, 0.5, 1]) == "{±1, ±1/2}"
    assert format_values([-2, -1, 0, 1]) == "{-2, -1, 0, 1}"
    assert format_values([-0.125, 0.0, 0.125]) == "{0, ±1/8}"


def test_value_space_of_search_and_other_quantized_layers():
    model = quantized_conv("sgt", "po2-3bit")
    conv = model[1]
    alpha = conv.parametrizations.weight.original
    with torch.no_grad():  # sorted set: index 2 is −1/4, index 7 is +1
        alpha.zero_()
        alpha[..., 2] = 1.0  # every weight −1/4 ...
        alpha[0, ..., 2] = 0.0
        alpha[0, ..., 7] = 1.0  # ... but output channel 0: +1
    vs = value_space(conv)
    assert vs.values == (-0.25, 1.0) and vs.n_candidates == 8 and vs.scale == "none" and not vs.req_mult
    assert vs.describe() == "{-1/4, 1} (2 of 8 values), mult N"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3),
                      nn.Conv2d(4, 2, 3))
    lowbit.quantize(m, {"weight": {"name": "bwn", "bits": 1},
                        "layers": {"1": {"weight": {"name": "bwn", "bits": 1, "per_channel": True}},
                                   "2": {"weight": {"name": "sawb", "bits": 2}}}})
    r = value_space_report(m)
    assert list(r) == ["1", "2", "3"]  # first and last layers stay FP: not reported
    assert r["1"].scale == "per channel" and not r["1"].req_mult and r["1"].values == (-1.0, 1.0)
    assert r["2"].req_mult and len(r["2"].values) == 4  # {±a, ±3a}
    assert r["3"].scale == "per layer" and not r["3"].req_mult  # BWN: {±1}·β


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def tiny_cfg(*overrides, epochs=3):
    base = ["model.name=resnet8", "model.width=0.5", "data.limit=1200", f"train.epochs={epochs}",
            "train.batch_size=64", "train.lr=0.1", "train.progress=false", "train.threads=1"]
    return load_config(None, base + list(overrides))


def metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, values", [("sgt", "po2-2bit"), ("rdhs", "binary")])
def test_a_tiny_model_trained_with_each_lowers_the_loss(tmp_path, fmnist_small, method, values):
    cfg = tiny_cfg(f"plan.weight={{name: valueset, values: {values}, scale: none}}", f"plan.method.name={method}")
    res = run(cfg, tmp_path / method, data=fmnist_small)
    r = metrics(tmp_path / method)
    assert r[-1]["train_loss"] < 0.85 * r[0]["train_loss"]  # sign-STE on this recipe: 0.72
    assert 0 < r[0]["changed"] < 0.5  # the search moved some weights, not all
    info = res.summary["method_info"]
    m = 2 if values == "binary" else 4
    assert info["req_mult"] == "N" and all(n <= m for n in res.summary["distinct_weight_values"].values())
    assert info["layers.0.0.conv1"].endswith("mult N")


def test_sgt_on_plus_minus_one_is_binaryconnect(tmp_path, fmnist_small):
    """α_+ − α_− starts at w and SGT moves it by −lr·∂L/∂w: the same trajectory as sign-STE."""
    binary = "plan.weight={name: valueset, values: binary, scale: none}"
    bc = run(tiny_cfg(binary, "plan.method.name=ste", "data.limit=300", epochs=1), tmp_path / "bc", data=fmnist_small)
    sgt = run(tiny_cfg(binary, "plan.method.name=sgt", "data.limit=300", epochs=1), tmp_path / "sgt",
              data=fmnist_small)
    a, b = metrics(tmp_path / "bc")[0], metrics(tmp_path / "sgt")[0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert bc.summary["test_acc"] == pytest.approx(sgt.summary["test_acc"], abs=0.01)


def test_noisy_rdhs_resumes_to_the_same_metrics(tmp_path, fmnist_small):
    cfg = tiny_cfg("plan.weight={name: valueset, values: binary}", "plan.method={name: rdhs, mu: 0.05}", epochs=2)
    run(cfg, tmp_path / "full", data=fmnist_small)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", data=fmnist_small, callbacks=[stop])
    run(cfg, tmp_path / "cut", resume=True, data=fmnist_small)
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "cut"), strict=True):
        a.pop("epoch_time"), b.pop("epoch_time")
        assert a == b


def test_info_prints_the_value_space(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: resnet8}\nplan:\n  weight: {name: valueset, values: po2-2bit}\n"
                   "  method: {name: sgt}\n")
    assert main(["info", str(cfg), "data.limit=50"]) == 0
    out = capsys.readouterr().out
    assert "value_space: {±1, ±1/2} (searched {±1, ±1/2})" in out
    assert "req_mult: N" in out and "layers.2.0.conv2: {±1, ±1/2} (4 of 4 values), mult N" in out
