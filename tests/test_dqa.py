"""DQA (003 Algorithm 1): schedule, eq. 7 init, std normalisation, penalty, gradients, hardening,
and a short training run on real Fashion-MNIST. Expected values are computed by hand here."""

import json
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.methods import build_method
from lowbit.methods.dqa import network_weights, temperature
from lowbit.methods.mixture import AttentionMixture, eq7_init, mixture_layers
from lowbit.quant import build_quantizer
from lowbit.quantize import quant_state
from lowbit.train import BatchLoader, evaluate, run

MM = lambda b: {"name": "minmax", "bits": b}  # noqa: E731
DQA_MM = {"name": "dqa", "mixture": [MM(4), MM(8)]}


class Tiny(nn.Module):
    """conv(1->2) [FP, first] -> conv(2->3) -> conv(3->4) -> linear(4->5) [FP, last]."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 2, 3, padding=1, bias=False)   # 18 weights
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)   # 54
        self.c2 = nn.Conv2d(3, 4, 1, bias=False)              # 12
        self.fc = nn.Linear(4, 5)                             # 20 (+5 bias, not a weight)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.c0(x))))))
        return self.fc(x.mean((2, 3)))


def tiny(plan):
    torch.manual_seed(0)
    return lowbit.quantize(Tiny(), plan)


def att(model, layer):
    return model.get_submodule(layer).parametrizations.weight[0]


# -- schedule, init, normalisation --------------------------------------------------------------
def test_temperature_schedule_endpoints_and_psi():
    B = 250
    psi = math.exp(math.log(0.03 / 100) / B)
    assert temperature(0, 100, 0.03, B) == 100
    assert temperature(B, 100, 0.03, B) == pytest.approx(0.03, rel=1e-12)
    assert temperature(1, 100, 0.03, B) == pytest.approx(100 * psi)
    m = tiny({"weight": MM(2), "method": DQA_MM})
    meth = quant_state(m).method
    meth.setup(m, B, 50)
    assert att(m, "c1").temperature == 100  # before the first batch: T(0)
    meth.on_step(m, 0)  # batch b = 1
    assert meth.temperature == pytest.approx(100 * psi) and att(m, "c1").temperature == meth.temperature
    meth.on_step(m, B - 1)  # the last batch, b = B
    assert meth.temperature == pytest.approx(0.03, rel=1e-9) and att(m, "c2").temperature == meth.temperature
    assert meth.log() == {"temperature": meth.temperature}


def test_eq7_initial_attention_logits():
    assert eq7_init([2, 4, 8]) == pytest.approx([12 / 14, 10 / 14, 6 / 14])  # 6/7, 5/7, 3/7
    assert eq7_init([1, 2, 32]) == pytest.approx([34 / 35, 33 / 35, 3 / 35])  # BWN, TWN, FP
    m = tiny({"weight": {"name": "bwn", "bits": 1},
              "method": {"name": "dqa", "mixture": [{"name": "fp"}, {"name": "twn"}]}})
    a = att(m, "c1")
    assert a.labels() == ["bwn1", "twn2", "fp32"]  # sorted by bits, Q_1 = the plan's weight
    assert a.alpha.tolist() == pytest.approx([34 / 35, 33 / 35, 3 / 35])
    assert a.bits == 1 and a.quantizer is a.members[0]


def test_std_normalisation_each_step():
    m = tiny({"weight": MM(2), "method": DQA_MM})
    a = att(m, "c1")
    a.alpha.data = torch.tensor([6.0, 2.0, 4.0])  # unbiased std = 2
    a.normalize_()
    assert a.alpha.tolist() == pytest.approx([3.0, 1.0, 2.0])
    a.alpha.data = torch.tensor([0.5, 0.5, 0.5])  # std 0: left alone, no inf/NaN
    a.normalize_()
    assert a.alpha.tolist() == [0.5, 0.5, 0.5]
    # the method normalises every layer before each batch (Algorithm 1)
    meth = quant_state(m).method
    meth.setup(m, 10, 5)
    att(m, "c2").alpha.data = torch.tensor([1.0, 5.0, 3.0])  # std 2
    meth.on_step(m, 0)
    assert att(m, "c2").alpha.tolist() == pytest.approx([0.5, 2.5, 1.5])
    assert att(m, "c2").alpha.std().item() == pytest.approx(1.0)


# -- penalty and gradients ----------------------------------------------------------------------
def test_penalty_on_a_hand_computed_case():
    m = tiny({"weight": MM(2), "method": {**DQA_MM, "lam": 2.0}})
    meth = quant_state(m).method
    meth.setup(m, 10, 5)
    assert meth.S == network_weights(m) == 18 + 54 + 12 + 20
    for layer, logits in (("c1", [0.0, math.log(2), math.log(3)]), ("c2", [0.0, 0.0, 0.0])):
        att(m, layer).alpha.data = torch.tensor(logits)
        att(m, layer).temperature = 1.0
    # c1: a = [1, 2, 3]/6, gᵀa = (1 + 8 + 48)/6 = 9.5; c2: a = 1/3 each, gᵀa = 21/3 = 7
    expected = 2.0 * (9.5 + 7.0) / 104
    assert meth.extra_loss(m).item() == pytest.approx(expected, rel=1e-6)
    assert build_method("dqa", mixture=[MM(4)], lam=0).extra_loss(m) is None


def test_gradients_reach_alpha_and_weights_as_the_softmax_chain_rule_says():
    m = tiny({"weight": MM(2), "method": DQA_MM})
    a = att(m, "c1")
    a.temperature = 0.7
    w = m.c1.parametrizations.weight.original
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (m.c1.weight * c).sum().backward()  # dL/dq = c
    # independent: Q_k(w) from fresh quantizers, a = softmax(α/T), dL/dα_k = a_k(<c,Q_k> - Σ_j a_j<c,Q_j>)/T
    qs = [build_quantizer("minmax", b)(w.detach()) for b in (2, 4, 8)]
    s = torch.tensor([(c * q).sum().item() for q in qs])
    p = torch.softmax(a.alpha.detach() / 0.7, 0)
    assert a.alpha.grad.tolist() == pytest.approx((p * (s - (p * s).sum()) / 0.7).tolist(), rel=1e-4, abs=1e-6)
    # min-max never clips: the straight-through gradient of the mixture is Σ a_k · c = c
    assert torch.allclose(w.grad, c, atol=1e-6)


def test_forward_is_the_attention_weighted_sum_of_independent_quantizers():
    m = tiny({"weight": {"name": "sawb", "bits": 2}, "method": {"name": "dqa", "mixture": [
        {"name": "sawb", "bits": 4}, {"name": "sawb", "bits": 8}]}})
    a = att(m, "c2")
    a.temperature = 2.0
    w = m.c2.parametrizations.weight.original.detach()
    p = torch.softmax(a.alpha.detach() / 2.0, 0)
    expect = sum(p[k] * build_quantizer("sawb", b)(w) for k, b in enumerate((2, 4, 8)))
    assert torch.allclose(m.c2.weight, expect, atol=1e-7)
    m.eval()  # eval_mode "final": evaluation sees Q_1 alone
    assert torch.equal(m.c2.weight, build_quantizer("sawb", 2)(w))


# -- the end of training ------------------------------------------------------------------------
def test_hardened_layer_is_exactly_q1_and_the_summary_says_so():
    m = tiny({"weight": {"name": "twn", "bits": 2}, "method": {"name": "dqa", "mixture": [MM(4), MM(8)]}})
    meth = quant_state(m).method
    meth.setup(m, 10, 5)
    for _, _, a in mixture_layers(m):
        a.temperature = 0.5
    # soft attention: far more than 2^2 values (the check below can fail)
    assert torch.unique(m.c1.weight.detach()).numel() > 4
    assert "exact Q1" not in meth.summary(m)  # training mode: the network is still a mixture
    m.eval()  # evaluation (lowbit eval) sees Q_1 alone: the check applies
    assert meth.summary(m)["exact Q1"].startswith("yes: 2/2")
    meth.finalize(m)
    m.train()
    for layer in ("c1", "c2"):
        w = getattr(m, layer).parametrizations.weight.original.detach()
        assert torch.equal(getattr(m, layer).weight, build_quantizer("twn", 2)(w))
        assert torch.unique(getattr(m, layer).weight.detach()).numel() <= 3  # {-β, 0, β}
    s = meth.summary(m)
    assert s["exact Q1"].startswith("yes: 2/2")
    # Q_1's weight just before hardening, at T = 0.5 with eq. 7 logits [6/7, 5/7, 3/7]
    p = torch.softmax(torch.tensor(eq7_init([2, 4, 8])) / 0.5, 0)[0].item()
    assert s["Q1 weight at end"].startswith(f"min {p:.4f}")
    # hardening survives a save/load (it is a buffer)
    m2 = tiny({"weight": {"name": "twn", "bits": 2}, "method": {"name": "dqa", "mixture": [MM(4), MM(8)]}})
    m2.load_state_dict(m.state_dict())
    assert bool(att(m2, "c1").hardened)


def test_members_not_above_a_layers_bits_are_left_out():
    plan = {"weight": MM(2), "layers": {"c2": {"weight": {"bits": 4}}}, "method": DQA_MM}
    m = tiny(plan)
    assert att(m, "c1").labels() == ["minmax2", "minmax4", "minmax8"]
    assert att(m, "c2").labels() == ["minmax4", "minmax8"]
    assert att(m, "c2").alpha.tolist() == pytest.approx([8 / 12, 4 / 12])


@pytest.mark.parametrize("options, message", [
    ({}, "needs option mixture"),
    ({"mixture": [MM(4), MM(4)]}, "distinct bits"),
    ({"mixture": [{"name": "minmx", "bits": 4}]}, "mixture[0]: unknown quantizer 'minmx'"),
    ({"mixture": [{"name": "minmax"}]}, "mixture[0]: quantizer 'minmax' needs bits"),
    ({"mixture": [MM(4), MM(8)], "g": [1, 4]}, "option g must be a list of 3 numbers"),
    ({"mixture": [MM(4)], "g": [1, float("nan")]}, "option g must be a list of 2 numbers"),  # else 'loss became nan'
    ({"mixture": [MM(4)], "t0": 0.01}, "t_end must be below t0"),
    ({"mixture": [MM(4)], "eval_mode": "soft"}, "eval_mode must be one of final, mixture"),
    ({"mixture": [MM(4)], "temp": 3}, "has no option temp"),
])
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError) as e:
        build_method("dqa", **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_schedule_refuses_to_run_without_setup():
    m = tiny({"weight": MM(2), "method": DQA_MM})
    with pytest.raises(RuntimeError, match="call setup"):
        quant_state(m).method.on_step(m, 0)


def test_act_mixture_needs_an_act_quantizer():
    m = tiny({"weight": MM(2), "method": {**DQA_MM, "act_mixture": [MM(4)]}})
    with pytest.raises(ConfigError, match="act_mixture is set but no layer"):
        quant_state(m).method.setup(m, 10, 5)


def test_a_mixture_whose_members_all_have_q1s_bits_or_fewer_is_an_error():
    """Before session 23 every member was dropped (members must have more bits than Q_1) and the run was plain STE,
    with the summary still printing the DQA schedule."""
    for opt, plan in (("mixture", {"weight": MM(2)}), ("act_mixture", {"weight": MM(2), "act": MM(4)})):
        m = tiny({**plan, "method": {**DQA_MM, opt: [MM(2)]}} if opt == "mixture" else
                 {**plan, "method": {**DQA_MM, opt: [MM(2), MM(4)]}})
        with pytest.raises(ConfigError, match=rf"plan.method.{opt}: no member has more bits"):
            quant_state(m).method.setup(m, 10, 5)


def test_act_mixture_attention_is_trained_and_penalised():
    m = tiny({"weight": MM(2), "act": MM(2), "method": {**DQA_MM, "act_mixture": [MM(4), MM(8)], "lam": 1.0}})
    meth = quant_state(m).method
    meth.setup(m, 10, 5)
    aq = m.c1.input_quantizer
    assert isinstance(aq, AttentionMixture) and aq.role == "act" and aq.bits == 2
    assert len(meth._att) == 4  # two weight and two activation attention vectors
    meth.on_step(m, 0)
    loss = m(torch.randn(2, 1, 6, 6)).square().sum() + meth.extra_loss(m)
    loss.backward()
    assert aq.alpha.grad is not None and aq.alpha.grad.abs().sum() > 0
    # at the end the input quantizer *is* Q_1 (what export reads), trained state included
    q1 = aq.members[0]
    meth.finalize(m)
    assert m.c1.input_quantizer is q1 and not any(r == "act" for _, r, _ in mixture_layers(m))
    s = meth.summary(m)
    assert s["act mixture"] == "minmax2+minmax4+minmax8" and s["exact Q1"].startswith("yes: 2/2")


# -- a real run ---------------------------------------------------------------------------------
def cfg(*overrides, epochs=2):
    base = ["model.name=resnet8", "model.width=0.25", "data.limit=1200", f"train.epochs={epochs}",
            "train.batch_size=128", "train.lr=0.05", "train.progress=false", "train.threads=1",
            "plan.weight={name: minmax, bits: 2}",
            "plan.method={name: dqa, mixture: [{name: minmax, bits: 4}, {name: minmax, bits: 8}], lam: 5}"]
    return load_config(None, base + list(overrides))


def rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, fmnist_small):
    d = tmp_path_factory.mktemp("dqa") / "full"
    return run(cfg(), d, data=fmnist_small)


def test_dqa_run_records_attention_cools_to_q1_and_ends_exact(full_run):
    r = rows(full_run.run_dir)
    assert r[-1]["temperature"] == pytest.approx(0.03, rel=1e-6)
    assert r[0]["temperature"] == pytest.approx(100 * (0.03 / 100) ** 0.5, rel=1e-6)  # halfway
    layers = list(r[-1]["attention"])
    assert len(layers) == 8 and r[-1]["mixture"][layers[0]] == ["minmax2", "minmax4", "minmax8"]
    assert all(r[-1]["attention"][n][0] > 0.99 for n in layers)  # Q_1 wins at T = 0.03
    w, q = r[-1]["qfunc"][layers[0]]
    assert len(w) == len(q) > 10 and w == sorted(w)
    s = full_run.summary
    assert s["weight_bits"] == [2]
    assert all(n <= 4 for n in s["distinct_weight_values"].values())
    assert s["method_info"]["exact Q1"].startswith("yes: 8/8")
    assert r[1]["train_loss"] < r[0]["train_loss"]  # it learns (18 steps of a quarter-width ResNet-8)


def test_validation_saw_the_network_that_is_finalized_and_tested(full_run, fmnist_small):
    # eval_mode "final": the best-validation epoch was chosen on Q_1 alone, so the hardened model
    # (what the test accuracy and export use) scores exactly that validation accuracy again
    v = evaluate(full_run.model, BatchLoader(fmnist_small.val, fmnist_small.info, 500))
    assert v["acc"] == full_run.summary["best_val_acc"]


def test_dqa_resume_reproduces_an_uninterrupted_run(tmp_path, fmnist_small, full_run):
    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg(), tmp_path / "cut", data=fmnist_small, callbacks=[stop])
    run(cfg(), tmp_path / "cut", resume=True, data=fmnist_small)
    full, cut = rows(full_run.run_dir), rows(tmp_path / "cut")
    assert len(cut) == 2
    for a, b in zip(full, cut):
        a.pop("epoch_time"), b.pop("epoch_time")
        assert a == b


def test_q1_weight_at_end_is_read_at_the_best_epochs_temperature(tmp_path, fmnist_small, monkeypatch):
    # the tested network is best.pt's; when that is not the last epoch, its c_1 is the one at the end of that
    # epoch (its own T), not best.pt's alpha read at the last step's T = 0.03 (where the softmax is one-hot)
    import importlib

    fit_module = importlib.import_module("lowbit.fit")
    real, calls = fit_module.evaluate, []

    def first_epoch_best(model, batches, device=None):
        out = real(model, batches, device)
        calls.append(1)
        return {**out, "acc": 1.0 - 0.1 * len(calls)}

    monkeypatch.setattr(fit_module, "evaluate", first_epoch_best)
    res = run(cfg(), tmp_path / "r", data=fmnist_small)
    assert res.summary["best_epoch"] == 1
    first = rows(tmp_path / "r")[0]
    c1 = min(v[0] for v in first["attention"].values())
    assert c1 < 0.9  # T ≈ 1.7 after the first of two epochs: still a mixture
    assert res.summary["method_info"]["Q1 weight at end"].startswith(f"min {c1:.4f} ")


def test_penalty_is_computed_on_the_models_device():
    # g was built on the CPU and dotted with the attention on the model's device: on CUDA the first step failed
    # ("Expected all tensors to be on the same device"); the meta device stands in where there is no GPU
    m = tiny({"weight": MM(2), "method": DQA_MM})
    meth = quant_state(m).method
    meth.setup(m, 10, 10)
    dev = "cuda" if torch.cuda.is_available() else "meta"
    m.to(dev)
    assert meth.extra_loss(m).device.type == dev


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_mixture_trains_and_records_on_cuda():
    # on CUDA the penalty's g (CPU) and Figure 3's transfer curve (CPU grid searched in CUDA weights) failed
    m = tiny({"weight": MM(2), "method": DQA_MM}).to("cuda")
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,))
    hist = lowbit.fit(m, [(x, y)], epochs=2, device="cuda")
    assert len(hist) == 2 and len(hist[-1]["qfunc"]) == 2


def test_mixture_computes_in_float32_under_autocast():
    """A quantizer mixture under torch.autocast computes Σ c_k·Q_k(x) in float32 with autocast off, as its members
    do (lowbit.quant.functional.autocast_off): the fused activation kernel calls no member's forward, and before
    session 29 it computed in the layer input's bfloat16 (another mixture than the float32 one on the same input)."""
    torch.manual_seed(0)
    mix = AttentionMixture([build_quantizer("minmax", b, role="act") for b in (2, 4, 8)]).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, 6, generator=g) * 2
    with torch.no_grad():
        mix(x)  # the activation members' running ranges start here
    for m in mix.members:
        m.eval()  # the ranges stay: both calls below see the same quantizers
    xb = x.to(torch.bfloat16)  # a layer input under autocast
    with torch.no_grad():
        want = mix(xb.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mix(xb)
    assert torch.equal(got.float(), want) and got.dtype == torch.float32
