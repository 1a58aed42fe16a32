"""SinReQ / SINAREQ (seed 001) and the WRPN quantizer: the regulariser's zeros and gradient, the
schedule, learned bits (decrease, rounding up, set_bits, export), resume, the WRPN grids."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lowbit import create_model, quantize
from lowbit.config import Config
from lowbit.errors import ConfigError
from lowbit.fit import fit
from lowbit.methods import build_method
from lowbit.methods.sinreq import lam_schedule, quantization_error, round_up_bits, sin_grid
from lowbit.quant import build_quantizer
from lowbit.quantize import quant_state, weight_param
from lowbit.train import run


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops: one thread (conftest.py)


def per_element(q, w, bits=None, domain="quantizer"):
    """sin²(π((u - c)/Δ + h)) per entry (R before the mean), with q called on w first."""
    q(w)
    u, c, step, h = sin_grid(q, w, bits, domain)
    return torch.sin(math.pi * ((u - c) / step + h)).pow(2)


# ---------------------------------------------------------------------------------------------
# WRPN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_wrpn_weight_grid_and_gradient(bits):
    m = 2 ** (bits - 1) - 1
    q = build_quantizer("wrpn", bits, role="weight")
    w = torch.tensor([-3.0, -1.0, -0.999, -0.5 / m, -0.49 / m, 0.0, 0.51 / m, 0.3, 1.0, 1.5], requires_grad=True)
    y = q(w)
    want = torch.round(w.detach().clamp(-1, 1) * m) / m
    assert torch.equal(y, want)
    assert torch.equal(q.levels(), torch.arange(-m, m + 1, dtype=torch.float32) / m)
    assert q.levels().numel() == 2**bits - 1 and 0.0 in q.levels().tolist()  # the sign bit: a grid with 0
    y.sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # clipped STE, [-1, 1] inclusive
    d = q.describe()
    assert d.uniform and d.qmin == -m and d.qmax == m and d.n_scales == 0 and d.signed


def test_wrpn_ternary_at_2_bits_and_activation_is_dorefa_grid():
    assert build_quantizer("wrpn", 2)(torch.tensor([-0.7, -0.2, 0.4, 0.6])).tolist() == [-1.0, 0.0, 0.0, 1.0]
    x = torch.linspace(-1, 2, 301, requires_grad=True)
    a = build_quantizer("wrpn", 3, role="act")
    y = a(x)
    assert torch.equal(y, build_quantizer("dorefa", 3, role="act")(x.detach()))
    assert torch.allclose(y, torch.round(x.detach().clamp(0, 1) * 7) / 7, rtol=0, atol=1e-6)  # the shared clip_round
    y.sum().backward()
    assert torch.equal(x.grad, ((x >= 0) & (x <= 1)).float())
    with pytest.raises(ConfigError, match="bits 2..8"):
        build_quantizer("wrpn", 1)


# ---------------------------------------------------------------------------------------------
# the regulariser
# ---------------------------------------------------------------------------------------------
def _on_levels_and_midpoints(name, bits):
    """Latent weights whose domain values are exactly the levels, and exactly the midpoints."""
    q = build_quantizer(name, bits)
    if name == "dorefa":  # u = tanh(w)/max|tanh w|: put max|tanh w| at 0.9, u = v
        lv = 2 * torch.arange(2**bits, dtype=torch.float64) / (2**bits - 1) - 1
        to_w = lambda v: torch.atanh(0.9 * v)  # noqa: E731
    else:  # wrpn: the domain is w itself on [-1, 1]
        m = 2 ** (bits - 1) - 1
        lv = torch.arange(-m, m + 1, dtype=torch.float64) / m
        to_w = lambda v: v  # noqa: E731
    mid = (lv[1:] + lv[:-1]) / 2
    return q, to_w(lv), to_w(torch.cat([mid, lv[:1], lv[-1:]])), len(mid)


@pytest.mark.parametrize("name", ["dorefa", "wrpn"])  # even level count (no 0 level) / odd (0 a level)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_regulariser_is_zero_on_levels_and_one_half_way(name, bits):
    q, on, between, n_mid = _on_levels_and_midpoints(name, bits)
    r_on = per_element(q, on)
    assert float(r_on.max()) < 1e-10  # the described step is float32
    r_mid = per_element(q, between)[:n_mid]
    assert torch.allclose(r_mid, torch.ones_like(r_mid), atol=1e-9)
    # and no larger anywhere: sin² <= 1 with its maxima at the midpoints
    w = torch.linspace(float(on.min()), float(on.max()), 2001, dtype=torch.float64)
    assert float(per_element(q, w).max()) <= 1 + 1e-12


def test_regulariser_zero_on_sawb_and_lsq_grids():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 0.1
    for q in (build_quantizer("sawb", 3), build_quantizer("sawb", 2, per_channel=True), build_quantizer("minmax", 3),
              build_quantizer("lsq", 3)):
        with torch.no_grad():
            wq = q(w)
        assert float(per_element(q, wq).max()) < 1e-10, q


@pytest.mark.parametrize("name", ["dorefa", "wrpn", "sawb"])
def test_gradient_pushes_towards_the_nearest_level(name):
    q = build_quantizer(name, 3)
    w = torch.randn(200, dtype=torch.float64) * 0.4
    with torch.no_grad():
        q(w)
        u, c, step, h = sin_grid(q, w)
        p = (u - c) / step + h  # levels at integer p
    w = w.clone().requires_grad_(True)
    u2, c, step, h = sin_grid(q, w)
    torch.sin(math.pi * ((u2 - c) / step + h)).pow(2).sum().backward()
    frac = p - torch.round(p)
    inside = (frac.abs() > 0.02) & (frac.abs() < 0.48) & (w.grad != 0)
    assert int(inside.sum()) > 100
    # gradient descent moves u (monotone in w) towards round(p): the gradient has the sign of frac
    assert (torch.sign(w.grad[inside]) == torch.sign(frac[inside])).all()


def test_raw_domain_is_the_authors_form():
    q = build_quantizer("dorefa", 3)
    w = torch.randn(50, dtype=torch.float64) * 0.3
    q(w)
    u, c, step, h = sin_grid(q, w, domain="raw")
    assert torch.equal(u, w) and c == 0.0 and h == 0.5 and step == pytest.approx(1 / (8 - 0.5))
    qw = build_quantizer("wrpn", 3)
    qw(w)
    assert sin_grid(qw, w, domain="raw")[2:] == (pytest.approx(1 / 7), 0.0)


def test_schedule_endpoints():
    assert lam_schedule(20, 100) == pytest.approx(0.5)  # t = 0.2 E
    assert lam_schedule(0, 100) == pytest.approx(0.5 * (1 + math.tanh(-1)))
    assert lam_schedule(1000, 100) == pytest.approx(1.0)
    assert lam_schedule(0, 3, tau=20) == pytest.approx(0.5 * (1 + math.tanh(-0.03)))
    m = build_method("sinreq", strength=2.0)
    m.setup(torch.nn.Linear(2, 2), total_steps=40, steps_per_epoch=10)
    assert m.lam_q == pytest.approx(2 * lam_schedule(0, 4))
    m.on_step(None, 35)
    assert m.lam_q == pytest.approx(2 * lam_schedule(3.5, 4))


def test_bad_options_and_non_uniform_quantizers_are_one_line_errors():
    for kw, msg in [({"domain": "tanh"}, "domain"), ({"strength": -1}, "strength"), ({"tau": 0}, "tau")]:
        with pytest.raises(ConfigError, match=msg) as e:
            build_method("sinreq", **kw)
        assert "\n" not in str(e.value)
    for kw, msg in [({"bits": [5, 2]}, "bits"), ({"bits": 4}, "bits"), ({"finetune_epochs": -1}, "finetune"),
                    ({"lam_f": "x"}, "lam_f"), ({"init_bits": 9}, "init_bits")]:
        with pytest.raises(ConfigError, match=msg):
            build_method("sinareq", **kw)
    m = tiny({"weight": {"name": "twn", "bits": 2}, "method": {"name": "sinreq"}})
    with pytest.raises(ConfigError, match="no uniform grid"):
        fit(m, batches(), epochs=1)
    with pytest.raises(ConfigError, match="outside what quantizer 'wrpn'"):
        tiny({"weight": {"name": "wrpn", "bits": 4}, "method": {"name": "sinareq", "bits": [1, 4]}})


# ---------------------------------------------------------------------------------------------
# training: SinReQ gathers weights, SINAREQ learns bits
# ---------------------------------------------------------------------------------------------
def tiny(plan, width=0.25):
    torch.manual_seed(0)
    return quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=width), plan)


def batches(n=4, bs=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def test_sinreq_lowers_the_quantization_error():
    plan = {"weight": {"name": "dorefa", "bits": 3}, "act": {"name": "dorefa", "bits": 3}}
    base, reg = tiny(plan), tiny({**plan, "method": {"name": "sinreq", "strength": 5.0}})
    fit(base, batches(), epochs=2)
    hist = fit(reg, batches(), epochs=2)
    e0, e1 = quantization_error(base), quantization_error(reg)
    assert set(e0) == set(e1) and len(e1) == 8
    assert sum(e1.values()) < 0.7 * sum(e0.values())
    assert set(hist[-1]["qerr"]) == set(e1) and "lam_q" in hist[-1]


def _betas(model):
    return {n: float(weight_param(m).beta.detach()) for n, m in model.named_modules() if weight_param(m) is not None}


def test_beta_decreases_under_lambda_f_alone_in_its_own_group():
    m = tiny({"weight": {"name": "wrpn", "bits": 6},
              "method": {"name": "sinareq", "strength": 0.0, "lam_f": 2.5, "bits_lr": 0.1}})
    method = quant_state(m).method
    groups = method.param_groups(m)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.1
    assert all(p.dim() == 0 for p in groups[1]["params"]) and len(groups[1]["params"]) == 8
    before = _betas(m)
    assert set(before.values()) == {6.0}
    opt = torch.optim.SGD(groups, lr=0.05, weight_decay=0.0)  # no momentum: every step is lr·λ_f
    fit(m, batches(n=2), optimizer=opt, epochs=2)
    after = _betas(m)
    for k in before:
        assert after[k] == pytest.approx(6.0 - 4 * 0.1 * 2.5, abs=1e-5)  # 5.0: rounds to 5, not 6
    assert all(weight_param(mod).bits == 5 for mod in m.modules() if weight_param(mod) is not None)


def test_beta_is_clamped_to_its_range():
    m = tiny({"weight": {"name": "dorefa", "bits": 3},
              "method": {"name": "sinareq", "strength": 0.0, "lam_f": 5.0, "bits": [2, 3]}})
    fit(m, batches(n=2), epochs=2)
    assert set(_betas(m).values()) == {2.0}


def test_round_up_and_set_bits_give_at_most_2_to_the_bits_values():
    assert [round_up_bits(b, 2, 8) for b in (1.2, 2.0, 2.00001, 2.3, 3.0, 7.9, 9.0)] == [2, 2, 2, 3, 3, 8, 8]
    m = tiny({"weight": {"name": "dorefa", "bits": 8}, "act": {"name": "dorefa", "bits": 4},
              "method": {"name": "sinareq"}})
    fit(m, batches(n=1), epochs=1)
    layers = [(n, mod) for n, mod in m.named_modules() if weight_param(mod) is not None]
    chosen = [2.3, 3.0, 4.7, 2.0, 5.5, 3.2, 6.01, 2.9]
    with torch.no_grad():
        for (_, mod), b in zip(layers, chosen):
            weight_param(mod).beta.fill_(b)
    quant_state(m).method.finalize(m)
    want = [3, 3, 5, 2, 6, 4, 7, 3]
    for (name, mod), b in zip(layers, want):
        assert weight_param(mod).bits == b
        assert f"{name}" in quant_state(m).table()
        with torch.no_grad():
            assert torch.unique(mod.weight).numel() <= 2**b
    info = quant_state(m).method.summary(m)
    assert info["learned bits"].split(", ")[0].endswith(" 3") and "per weight" in info["avg weight bits"]


# ---------------------------------------------------------------------------------------------
# runs: resume, export, report
# ---------------------------------------------------------------------------------------------
SINAREQ_PLAN = {"weight": {"name": "dorefa", "bits": 6}, "act": {"name": "dorefa", "bits": 4},
                "method": {"name": "sinareq", "lam_f": 0.03, "bits_lr": 0.5, "finetune_epochs": 1}}


def run_cfg(plan=SINAREQ_PLAN, epochs=3):
    return Config.model_validate({
        "name": "tiny", "model": {"name": "resnet8", "width": 0.25},
        "data": {"name": "fashion-mnist", "limit": 1200, "val_fraction": 0.05}, "plan": plan,
        "train": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "progress": False, "seed": 0, "threads": 1}})


def _rows(d):
    return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_a_run_with_learned_bits(tmp_path, fmnist_small):
    c = run_cfg()
    full = run(c, tmp_path / "full", data=fmnist_small)

    def kill_after_second_epoch(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "cut", data=fmnist_small, callbacks=[kill_after_second_epoch])
    resumed = run(c, tmp_path / "cut", resume=True, data=fmnist_small)
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        x.pop("epoch_time"), y.pop("epoch_time")
        assert x == y
    assert a[0]["beta"] != a[1]["beta"] and a[1]["beta"] == a[2]["beta"]  # frozen for the last (fine-tune) epoch
    assert a[0]["beta"]["layers.0.0.conv1"] < 6
    assert resumed.summary["test_acc"] == full.summary["test_acc"]
    assert resumed.summary["method_info"]["learned bits"] == full.summary["method_info"]["learned bits"]
    bits = a[-1]["bits"]
    # the reported network has those bits (summary, distinct values, cost)
    assert sorted(set(bits.values())) == full.summary["weight_bits"]
    for layer, n in full.summary["distinct_weight_values"].items():
        assert n <= 2 ** bits[layer]


def test_export_has_the_learned_bits(tmp_path, fmnist_small):
    from lowbit.export import IntegerReference, lower
    from lowbit.train import load_run

    run(run_cfg(epochs=2), tmp_path / "r", data=fmnist_small)
    bits = _rows(tmp_path / "r")[-1]["bits"]
    _, data, model, _ = load_run(tmp_path / "r")  # a fresh model: finalize applies the learned bits
    got_bits = {n: weight_param(m).bits for n, m in model.named_modules() if weight_param(m) is not None}
    assert got_bits == bits
    x = data.test.images[:64].float().div(255.0)
    graph = lower(model, x[:2])
    exported = {op.name: op.weight.bits for op in graph.conv_ops() if op.quantized}
    assert exported == bits
    with torch.no_grad():
        want = model(x).numpy()
    got = IntegerReference(graph).run(x.numpy())
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_report_figures_and_error(tmp_path, fmnist_small):
    from lowbit.viz.sinreq import sinreq_report

    run(run_cfg(epochs=2), tmp_path / "r", data=fmnist_small)
    res = sinreq_report(tmp_path / "r", out_dir=tmp_path / "fig")
    assert all(p.is_file() and p.stat().st_size > 1000 for p in res["files"])
    assert len(res["files"]) == 2 and 0 <= res["error_after"] <= 0.5
    assert set(res["error"]) == set(_rows(tmp_path / "r")[-1]["bits"])


def test_sinareq_with_dcq_is_refused_before_the_run_folder(tmp_path):
    """DCQ trains SINAREQ's learned bits on section views whose layer names set_bits does not know (a
    traceback-free but misleading "set_bits: '3.conv1' matches no layer" after the run folder was written),
    and the stitched network would be evaluated at the plan's bits: refused when the config is read."""
    from lowbit.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: {name: resnet8, width: 0.25}\ndata: {name: digits}\n"
                 "plan: {weight: {name: dorefa, bits: 8}, method: {name: sinareq}}\ndcq: {teacher: x}\n")
    with pytest.raises(ConfigError, match="dcq: method 'sinareq'"):
        load_config(p)


def test_sinareq_bit_range_a_quantizer_cannot_take_is_refused_when_built():
    """sawb's closed form has constants for 2, 3, 4, 5 and 8 bits: with bits [2, 8] the run crashed in its first
    epoch, when beta fell below 7 (set_bits refused 7); refused when the model is quantized, before training."""
    model = create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25)
    with pytest.raises(ConfigError, match="include 6"):
        quantize(model, {"weight": {"name": "sawb", "bits": 8, "alpha": "closed_form"},
                         "method": {"name": "sinareq", "bits": [2, 8]}})
    model = create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25)
    quantize(model, {"weight": {"name": "sawb", "bits": 5, "alpha": "closed_form"},
                     "method": {"name": "sinareq", "bits": [2, 5]}})  # within the constants: accepted
    assert {lp.weight.bits for lp in quant_state(model).layers if lp.weight is not None} == {5}
