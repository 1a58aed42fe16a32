"""BinaryRelax: the original (η·Q(w) + w)/(1 + η) and 003's mixture form (eq. 8), their schedules,
the purely quantized phase, and a short real run. Expected values are computed by hand here."""

import json
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.methods import build_method
from lowbit.methods.mixture import ScheduledMixture
from lowbit.quant import build_quantizer
from lowbit.quantize import quant_state
from lowbit.train import run

MM = lambda b: {"name": "minmax", "bits": b}  # noqa: E731


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(torch.relu(self.c0(x)))).mean((2, 3)))


def tiny(method, weight=MM(2)):
    torch.manual_seed(0)
    return lowbit.quantize(Tiny(), {"weight": weight, "method": method})


def layer(m):
    return m.c1.parametrizations.weight[0]


def latent(m):
    return m.c1.parametrizations.weight.original.detach()


def test_original_form_is_eta_q_plus_w_over_one_plus_eta():
    m = tiny({"name": "binaryrelax"})
    br = layer(m)
    assert isinstance(br, ScheduledMixture) and br.labels() == ["minmax2", "fp32"] and br.bits == 2
    w = latent(m)
    q = build_quantizer("minmax", 2)(w)
    for eta in (1.0, 3.0):
        br.omega = eta
        assert torch.allclose(m.c1.weight, (eta * q + w) / (1 + eta), atol=1e-7)


def test_eta_to_infinity_is_q_of_w():
    m = tiny({"name": "binaryrelax"})
    br, w = layer(m), latent(m)
    q = build_quantizer("minmax", 2)(w)
    br.omega = 1e9
    assert torch.allclose(m.c1.weight, q, atol=1e-7)
    br.omega = math.inf  # the purely quantized phase: exactly Q(w)
    assert torch.equal(m.c1.weight, q)
    assert torch.unique(m.c1.weight.detach()).numel() <= 4


def test_mixture_form_is_003_eq8():
    m = tiny({"name": "binaryrelax", "form": "mixture", "mixture": [MM(8), MM(4)]})
    br, w = layer(m), latent(m)
    assert br.labels() == ["minmax2", "minmax4", "minmax8"]
    q1, q2, q3 = (build_quantizer("minmax", b)(w) for b in (2, 4, 8))
    br.omega = 2.0
    assert torch.allclose(m.c1.weight, (2 * q1 + q2 + q3) / 4, atol=1e-7)


def test_gradient_to_the_latent_weight_is_straight_through():
    m = tiny({"name": "binaryrelax"})
    layer(m).omega = 3.0
    c = torch.arange(m.c1.weight.numel(), dtype=torch.float32).reshape(m.c1.weight.shape)
    (m.c1.weight * c).sum().backward()
    # (η·STE(Q(w)) + w)/(1 + η): η/(1+η)·c + 1/(1+η)·c = c
    assert torch.allclose(m.c1.parametrizations.weight.original.grad, c)


def test_schedules_spread_the_papers_growth_over_the_run():
    m = tiny({"name": "binaryrelax"})
    br = quant_state(m).method
    br.setup(m, total_steps=100, steps_per_epoch=10)  # B_relax = 75 (last 25% purely quantized)
    assert br.relax_steps == 75
    assert br.omega_at(0) == 1.0
    assert br.omega_at(30) == pytest.approx(1.04 ** (150 * 30 / 75))
    assert br.omega_at(74) == pytest.approx(1.04 ** (150 * 74 / 75))
    assert br.omega_at(75) == math.inf and br.omega_at(99) == math.inf
    br.on_step(m, 30)
    assert layer(m).omega == pytest.approx(1.04**60)
    assert br.log() == {"eta": pytest.approx(1.04**60), "c1": pytest.approx(1.04**60 / (1.04**60 + 1))}
    br.on_step(m, 80)
    assert br.log()["c1"] == 1.0 and torch.equal(m.c1.weight, build_quantizer("minmax", 2)(latent(m)))

    m = tiny({"name": "binaryrelax", "growth_epochs": "run", "hard_fraction": 0})
    lit = quant_state(m).method
    lit.setup(m, total_steps=100, steps_per_epoch=10)
    assert lit.omega_at(20) == pytest.approx(1.04**2)  # start of epoch 3: ×1.04 per epoch, literally
    assert lit.omega_at(99) == pytest.approx(1.04**9.9)

    m = tiny({"name": "binaryrelax", "form": "mixture", "mixture": [MM(4), MM(8)]})
    mix = quant_state(m).method
    mix.setup(m, total_steps=200, steps_per_epoch=20)  # 003: ×1.02 per epoch over 300 epochs
    assert mix.relax_steps == 200
    assert mix.omega_at(100) == pytest.approx(1.02**150)
    assert mix.omega_at(199) == pytest.approx(1.02 ** (300 * 199 / 200))


@pytest.mark.parametrize("options, message", [
    ({"form": "relaxed"}, "form must be one of original, mixture"),
    ({"form": "mixture"}, "needs option mixture"),
    ({"growth": 0.9}, "growth must be >= 1"),
    ({"hard_fraction": 1.0}, "hard_fraction must be in [0, 1)"),
    ({"growth_epochs": "all"}, "growth_epochs must be a number > 0"),
    ({"mixture": [MM(4), {"name": "pact", "bits": 8}]}, "mixture[1]: quantizer 'pact' cannot quantize role 'weight'"),
])
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError) as e:
        build_method("binaryrelax", **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_original_run_ends_purely_quantized_and_exact(tmp_path, fmnist_small):
    cfg = load_config(None, [
        "model.name=resnet8", "model.width=0.25", "data.limit=1200", "train.epochs=2", "train.batch_size=128",
        "train.lr=0.05", "train.progress=false", "train.threads=1", "plan.weight={name: sawb, bits: 2}",
        "plan.method={name: binaryrelax, form: original, hard_fraction: 0.5}"])
    res = run(cfg, tmp_path / "r", data=fmnist_small)
    r = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # 9 batches per epoch, B_relax = round(0.5·18) = 9: epoch 1 relaxed, epoch 2 purely quantized
    assert r[0]["eta"] == pytest.approx(1.04 ** (150 * 8 / 9)) and r[0]["c1"] < 1
    assert r[1]["c1"] == 1.0 and r[1]["attention"]["layers.0.0.conv1"] == [1.0, 0.0]
    assert res.summary["method_info"]["exact Q1"].startswith("yes: 8/8")
    assert all(n <= 4 for n in res.summary["distinct_weight_values"].values())
