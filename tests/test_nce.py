"""NCE (seed 004): the channel super-network, its cost term, the expansion rule and a tiny search."""

import json

import pytest
import torch
from torch import nn

from lowbit.cli import main
from lowbit.cost import profile
from lowbit.models import create_model
from lowbit.quantize import layer_bits, quantize
from lowbit.search.nce import _cost_dict, fit_to_target, resource_loss
from lowbit.search.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}


def _narrow_from_cap(sn: SuperNet, widths: list[int], size: int) -> nn.Module:
    """A network built with these widths, holding the cap network's weights sliced to fit."""
    narrow = create_model(sn.model_name, in_channels=1, num_classes=10, image_size=size, channels=sn.channels(widths))
    cap = sn.net.state_dict()
    sliced = {}
    for k, v in narrow.state_dict().items():
        src = cap[k]
        sliced[k] = src[tuple(slice(0, n) for n in v.shape)] if v.dim() else src
    narrow.load_state_dict(sliced)
    return narrow


@pytest.mark.parametrize("model,size", [("resnet8", 12), ("lenet5", 28)])
def test_sliced_candidates_equal_a_narrower_network(model, size):
    torch.manual_seed(0)
    sn = SuperNet(model, 1, 10, size, cap=1.5)
    for m in sn.net.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    sn.net.eval()
    x = torch.randn(4, 1, size, size)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        widths = [g.widths[int(torch.randint(len(g.widths), (1,), generator=gen))] for g in sn.groups]
        sn.set_widths(widths)
        ref = _narrow_from_cap(sn, widths, size).eval()
        with torch.no_grad():
            torch.testing.assert_close(sn.net(x), ref(x), rtol=1e-4, atol=1e-5)
    # a mixture of two candidates is the weighted sum of their masked outputs, up to the nonlinearity:
    # at one layer's output it is exact; check the mask itself
    g = sn.groups[0]
    sn.set_mix([torch.tensor([0.25, 0.75] + [0.0] * (gg.active - 2)) for gg in sn.groups])
    mask = sn._mask[0]
    assert torch.allclose(mask[: g.widths[0]], torch.ones(g.widths[0]))
    assert torch.allclose(mask[g.widths[0]: g.widths[1]], torch.full((g.widths[1] - g.widths[0],), 0.75))
    assert float(mask[g.widths[1]:].abs().sum()) == 0.0


@pytest.mark.parametrize("model,size", [("resnet8", 16), ("vgg_small", 8)])
def test_resource_term_equals_cost_model_on_one_hot(model, size):
    sn = SuperNet(model, 1, 10, size, cap=1.3)
    quantize(sn.net, W2A2)
    sn.set_bits_table(layer_bits(sn.net))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        choice = []
        for lg, g in zip(sn.logits, sn.groups):
            g.active = len(g.widths)
            k = int(torch.randint(g.active, (1,), generator=gen))
            lg.fill_(-1e9)
            lg[k] = 0.0
            choice.append(k)
    expected = {k: v.detach() for k, v in sn.cost().items()}  # from the softmax-expected widths
    derived = quantize(create_model(model, in_channels=1, num_classes=10, image_size=size,
                                    channels=sn.channels(sn.widths_of(choice))), W2A2)
    ref = profile(derived, torch.zeros(1, 1, size, size), layer_bits(derived))
    assert float(expected["params"]) == ref.params
    assert float(expected["macs"]) == ref.macs
    assert float(expected["max_act"]) == ref.max_act_elems
    assert float(expected["mem_bits"]) == ref.mem_bits
    # and it is differentiable in the logits
    for lg in sn.logits:
        lg.data.normal_()
    sn.cost()["macs"].backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in sn.logits)


def test_expansion_rule_on_hand_made_logits():
    sn = SuperNet("resnet8", 1, 10, 16, ratios=(0.5, 0.75, 1.0), cap=1.2, expand_step=0.1)
    g0, g1 = sn.groups[0], sn.groups[1]
    assert g0.widths == [8, 12, 16, 18, 19] and g0.active == 3  # 16 * {.5, .75, 1} then 16 * {1.1, 1.2}
    with torch.no_grad():
        sn.logits[0][:3] = torch.tensor([0.0, 0.0, 1.0])  # p(16) = e/(e+2) = 0.576
        sn.logits[1][:3] = torch.tensor([1.0, 1.0, 0.0])  # p(16) = 1/(1+2e) = 0.155
        for lg in sn.logits[2:]:
            lg[:3] = torch.tensor([0.0, 0.0, 0.0])  # p = 1/3
    done = sn.expand_step(0.4)
    assert done == [(0, 18)]
    assert g0.active == 4 and g1.active == 3
    assert float(sn.logits[0][3].detach()) == 1.0  # the widest logit copied
    assert sn.expand_step(0.3) == [(0, 19), *[(i, sn.groups[i].widths[3]) for i in range(2, len(sn.groups))]]
    assert g0.active == 5
    # at the cap nothing more is added (the two equal widest logits give p = e/(2e+2) = 0.37 >= 0.3)
    assert all(gi != 0 for gi, _ in sn.expand_step(0.3))


def test_resource_loss_signs_and_fit_to_target():
    e = torch.tensor(80.0, requires_grad=True)
    assert float(resource_loss(e, 120.0, 100.0, 0.05).detach()) == pytest.approx(torch.log(torch.tensor(0.8)).item())
    assert float(resource_loss(e, 90.0, 100.0, 0.05).detach()) == pytest.approx(-torch.log(torch.tensor(0.8)).item())
    assert float(resource_loss(e, 97.0, 100.0, 0.05).detach()) == 0.0
    sn = SuperNet("resnet8", 1, 10, 16, cap=1.0)
    widest = [g.active - 1 for g in sn.groups]
    full = float(sn.cost([float(w) for w in sn.widths_of(widest)])["macs"])
    choice, steps = fit_to_target(sn, widest, "macs", 0.7 * full)
    assert steps > 0 and float(sn.cost([float(w) for w in sn.widths_of(choice)])["macs"]) <= 0.7 * full


def test_derived_param_count_equals_cost_model():
    sn = SuperNet("resnet8", 1, 10, 16, cap=2.0)
    widths = [g.widths[i % len(g.widths)] for i, g in enumerate(sn.groups)]
    net = create_model("resnet8", in_channels=1, num_classes=10, image_size=16, channels=sn.channels(widths))
    assert sum(p.numel() for p in net.parameters()) == float(sn.cost([float(w) for w in widths])["params"])


def test_tiny_search_end_to_end(tmp_path, capsys):
    out = tmp_path / "nce"
    was = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's; the search computes with its own train.threads=1
    try:
        rc = main(["search", "nce", "configs/nce_resnet8_w2a2.yaml", "data.limit=100", "train.batch_size=40",
                   "train.progress=false", "train.threads=1", "--warmup", "1", "--epochs", "1", "--threshold", "0.1",
                   "--cap", "1.2", "--out", str(out)])
        assert torch.get_num_threads() == 2  # before session 28 the search left its own
    finally:
        torch.set_num_threads(was)
    assert rc == 0
    text = capsys.readouterr().out
    assert "meets target    True" in text
    res = json.loads((out / "search.json").read_text())
    key, target = next(iter(res["target"].items()))
    assert key == "macs" and res["cost"]["macs"] <= target == res["original"]["macs"]
    # T = 0.1 < 1/8: every architecture step expands every group until the cap
    assert len(res["expansions"]) > 0
    assert any(len(c) > 8 for c in res["candidates"])
    assert res["history"][-1]["nce_active_max"] != res["history"][0]["nce_widths"] or res["expansions"]
    assert (out / "widths.png").is_file() and (out / "expansions.png").is_file()
    derived = (out / "derived.yaml").read_text()
    assert "channels:" in derived and "layers.2.0.conv2" in derived


def test_nce_budget_meets_the_002_budget(tmp_path, monkeypatch):
    import lowbit.search.nce as nce_mod
    from lowbit.config import load_config
    from lowbit.search.nce import NCEOptions, nce_budget

    cfg = load_config("configs/nce_resnet8_w2a2.yaml", ["data.limit=80", "train.batch_size=40", "train.progress=false"])
    opts = NCEOptions(warmup_epochs=0, epochs=1, ratios=(0.5, 0.75, 1.0), cap=1.0)
    res = nce_budget(cfg, [2], ratio=24, opts=opts, out_dir=tmp_path, train=False)
    (row,) = res["rows"]
    assert row["bits"] == 2 and row["act_bits"] == 4  # 002: b_a = max(b_p, 4) below 4 bits
    assert row["uniform_mem"] <= res["budget_bits"] and row["nce_mem"] <= res["budget_bits"]
    assert (tmp_path / "budget.md").is_file()
    # a second call reads the finished row back instead of searching again
    monkeypatch.setattr(nce_mod, "search_nce", lambda *a, **k: pytest.fail("searched a finished row again"))
    assert nce_budget(cfg, [2], ratio=24, opts=opts, out_dir=tmp_path, train=False)["rows"] == [row]


def test_counting_bits_runs_no_forward_pass():
    """LSQ initialises its step from the first input it sees: counting the cost must not feed it zeros."""
    sn = SuperNet("resnet8", 1, 10, 16, cap=1.2)
    quantize(sn.net, {"weight": {"name": "lsq", "bits": 2}, "act": {"name": "lsq", "bits": 2}})
    sn.set_bits_table(layer_bits(sn.net))
    assert sn.structure.weight_bits == 2 and sn.structure.act_bits == 2
    acts = [m.input_quantizer for m in sn.net.modules() if hasattr(m, "input_quantizer")]
    assert acts and not any(bool(q.initialized) for q in acts)


@pytest.mark.parametrize("extra,msg", [(["--threshold", "0"], "threshold must be in (0, 1]"),
                                       (["plan.method={name: binaryrelax}"], "NCE searches with plain STE"),
                                       (["model.name=mobilenetv2"], "NCE supports the ResNets"),
                                       # before session 23: "layer ... has 8 inputs, not a multiple of its input
                                       # width 16"
                                       (["model.width=0.5"], "NCE: model.width is set (0.5); NCE searches the widths")])
def test_bad_input_is_one_line(capsys, extra, msg):
    rc = main(["search", "nce", "configs/nce_resnet8_w2a2.yaml", "data.limit=50", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lowbit: error: ") and msg in err[0], err


def test_every_target_of_the_search_is_a_cli_choice():
    """Session 25: docs/nce.md named --target mem002, which the search supports (TARGETS) but the CLI refused."""
    from lowbit.cli import build_parser
    from lowbit.search.nce import TARGETS

    for t in TARGETS:
        assert build_parser().parse_args(["search", "nce", "c.yaml", "--target", t]).target == t


def test_one_hot_cost_is_exact_above_two_to_the_24():
    """Session 26: SuperNet.cost summed in float32, off by a few MACs above 2^24 (ResNet-20 at 28x28:
    20,810,602 for 20,810,599), so fit_to_target stepped down a network that met its target exactly."""
    sn = SuperNet("resnet20", 1, 10, 28, cap=1.5)
    widths = [14, 16, 22, 6, 38, 25, 32, 32, 51, 25, 96, 19]
    choice = [g.widths.index(w) for g, w in zip(sn.groups, widths)]
    for g, k in zip(sn.groups, choice):
        g.active = max(g.active, k + 1)
    net = create_model("resnet20", in_channels=1, num_classes=10, image_size=28, channels=sn.channels(widths))
    exact = profile(net, torch.zeros(1, 1, 28, 28), {}).macs
    assert float(sn.cost([float(w) for w in widths])["macs"]) == exact
    assert fit_to_target(sn, choice, "macs", float(exact)) == (choice, 0)


def test_init_from_is_refused_before_the_search(tmp_path, capsys):
    """Session 26: model.init_from was ignored by the super-network, kept in derived.yaml, and the search
    ended (after all its epochs) with 'pretrained weights do not fit the model' on the derived widths."""
    ckpt = tmp_path / "fp.pt"
    torch.save(create_model("resnet8", in_channels=1, num_classes=10, image_size=28).state_dict(), ckpt)
    rc = main(["search", "nce", "configs/nce_resnet8_w2a2.yaml", "data.limit=50", f"model.init_from={ckpt}",
               "--out", str(tmp_path / "nce")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "NCE: model.init_from is set" in err[0], err
    assert not (tmp_path / "nce").exists()


def test_unreachable_target_is_refused_before_the_search(capsys):
    """Session 26: a target below the narrowest candidates was found out only after the whole search."""
    rc = main(["search", "nce", "configs/nce_resnet8_w2a2.yaml", "data.limit=50", "--target-value", "1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "even the narrowest candidates cost more than the target 1,000" in err[-1], err
    assert not any("epoch" in line for line in err), err  # refused before the first epoch


def test_mem002_b_p_ignores_a_layer_with_fp_weights():
    """Session 26: a layer with FP weights but a quantized input (plan.layers {weight: fp}) set the search's
    b_p to 32, while the target and the derived network's cost use the quantized layers' bits (2): the
    search counted the original ResNet-8 at 15.8x its target and shrank it to 0.2x."""
    plan = {**W2A2, "layers": {"layers.0.0.conv1": {"weight": "fp"}}}
    sn = SuperNet("resnet8", 1, 10, 8, cap=1.5)
    quantize(sn.net, plan)
    sn.set_bits_table(layer_bits(sn.net))
    net = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=8), plan)
    bits = layer_bits(net)
    assert bits["layers.0.0.conv1"].weight is None and bits["layers.0.0.conv1"].act == 2
    ref = _cost_dict(profile(net, torch.zeros(1, 1, 8, 8), bits))
    assert float(sn.cost([float(g.base) for g in sn.groups])["mem_uniform"]) == ref["mem_uniform"]


def test_quantizing_the_super_network_traces_it_without_a_warning():
    """Session 26: the channel-mask hooks failed under torch.fx (``[1] * proxy``), so every NCE search of a
    ResNet warned that torch.fx cannot trace it and took the ends in registration order."""
    import warnings

    sn = SuperNet("resnet8", 1, 10, 8, cap=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(sn.net, W2A2)
    bits = layer_bits(sn.net)
    assert "conv1" not in bits and "fc" not in bits and "layers.0.0.conv1" in bits  # the ends kept (the trace's)
    x = torch.randn(4, 1, 8, 8)
    a = sn.net.train()(x)
    sn._mask = [torch.zeros_like(c[0]) for c in sn._cands]  # the hooks still mask outside tracing
    assert not torch.equal(a, sn.net(x))


def test_a_mixture_leaves_the_identity_shortcut_unscaled():
    # TAS mixes conv_b's output before the add; a mask after the add scaled the identity path once more per
    # block: over resnet20's 3 first-stage blocks a channel only the wider candidate has kept 0.5^4 = 0.0625 of
    # the stem's activation instead of 0.5
    torch.manual_seed(0)
    sn = SuperNet("resnet20", 3, 10, 32, cap=1.0)
    net = sn.net.eval()
    with torch.no_grad():
        for blk in net.layers[0]:  # each first-stage block is then relu(0 + x) = x
            blk.bn2.weight.zero_()
            blk.bn2.bias.zero_()
    ws = []
    for gi, g in enumerate(sn.groups):
        v = torch.zeros(g.active)
        v[0 if gi == 0 else g.active - 1] += 0.5 if gi == 0 else 1.0
        v[g.active - 1] += 0.5 if gi == 0 else 0.0
        ws.append(v)
    sn.set_mix(ws)
    seen = {}
    hooks = [net.relu.register_forward_hook(lambda m, a, o: seen.__setitem__("stem", o)),
             net.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("stage", o))]
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["stage"], seen["stem"])
