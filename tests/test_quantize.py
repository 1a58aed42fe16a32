"""quantize(model, plan): which layers get quantized, how, and what layer.weight becomes."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowbit.errors import ConfigError
from lowbit.models import create_model
from lowbit.plan import Plan
from lowbit.quantize import layer_bits, quant_state, quantize, weight_param

W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}


class UserNet(nn.Module):
    """Not one of ours: functional activations, a Conv1d, nested containers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8))
        self.head = nn.ModuleDict({"fc1": nn.Linear(8 * 16, 32), "fc2": nn.Linear(32, 5)})

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x)).flatten(1)
        return self.head["fc2"](torch.relu(self.head["fc1"](x)))


def resnet(**kw):
    torch.manual_seed(0)
    return create_model("resnet8", in_channels=1, num_classes=10, image_size=28, **kw)


def test_first_and_last_layer_stay_full_precision_by_default():
    m = quantize(resnet(), W2A2)
    layers = quant_state(m).layers
    assert layers[0].name == "conv1" and layers[-1].name == "fc"
    assert not parametrize.is_parametrized(m.conv1) and not hasattr(m.conv1, "input_quantizer")
    assert not parametrize.is_parametrized(m.fc) and not hasattr(m.fc, "input_quantizer")
    inner = [lp for lp in layers[1:-1]]
    assert inner and all(parametrize.is_parametrized(lp.module, "weight") for lp in inner)
    assert all(hasattr(lp.module, "input_quantizer") for lp in inner)


def test_option_quantizes_first_and_last_too():
    m = quantize(resnet(), {**W2A2, "keep_first": False, "keep_last": False})
    assert parametrize.is_parametrized(m.conv1) and parametrize.is_parametrized(m.fc)


@pytest.mark.parametrize("spec", [
    {"name": "sawb", "bits": 2}, {"name": "minmax", "bits": 3}, {"name": "bwn", "bits": 1},
    {"name": "twn", "bits": 2}, {"name": "lsq", "bits": 2, "per_channel": False}, {"name": "po2", "bits": 2},
])
def test_layer_weight_takes_at_most_2_pow_bits_values(spec):
    m = quantize(resnet(), {"weight": spec})
    m(torch.randn(2, 1, 28, 28))
    for lp in quant_state(m).layers[1:-1]:
        values = torch.unique(lp.module.weight.detach())
        assert 1 <= values.numel() <= 2 ** spec["bits"], lp.name
        assert torch.isin(values, weight_param(lp.module).quantizer.levels()).all()
    # the latent weight is still full precision and trainable
    latent = m.layers[0][0].conv1.parametrizations.weight.original
    assert latent.requires_grad and torch.unique(latent).numel() > 16


def test_activation_quantizer_quantizes_the_layer_input():
    m = quantize(resnet(), {"act": {"name": "pact", "bits": 2, "init": 3.0}})
    seen = {}
    layer = m.layers[0][0].conv2
    layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    m(torch.randn(4, 1, 28, 28))
    # PACT hook was registered first, so this hook sees the quantized input: 4 levels of 3/3 = 1.0
    assert set(torch.unique(seen["x"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_overrides_by_pattern_and_name_and_fp():
    plan = {**W2A2, "layers": {"layers.2.*": {"weight": {"bits": 4}}, "layers.1.0.conv1": "fp",
                               "layers.0.*": {"act": "fp"}}}
    m = quantize(resnet(), plan)
    by = {lp.name: lp for lp in quant_state(m).layers}
    assert by["layers.2.0.conv1"].weight.bits == 4 and by["layers.2.0.conv1"].weight.name == "sawb"
    assert by["layers.2.0.conv1"].act.bits == 2
    assert by["layers.1.0.conv1"].weight is None and by["layers.1.0.conv1"].act is None
    assert by["layers.0.0.conv1"].act is None and by["layers.0.0.conv1"].weight.bits == 2
    bits = layer_bits(m)
    assert bits["layers.2.0.conv1"].weight == 4 and "layers.1.0.conv1" not in bits
    # a new quantizer name in an override replaces the default spec instead of merging
    m2 = quantize(resnet(), {**W2A2, "layers": {"layers.1.*": {"weight": {"name": "bwn", "bits": 1}}}})
    assert weight_param(m2.layers[1][0].conv1).quantizer.alias == "bwn"


def test_override_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="'layer9.*' matches no layer"):
        quantize(resnet(), {**W2A2, "layers": {"layer9.*": "fp"}})


@pytest.mark.parametrize("plan, msg", [
    ({"weight": {"name": "nope", "bits": 2}}, "unknown quantizer 'nope'"),
    ({"weight": {"name": "bwn", "bits": 2}}, "'bwn' supports bits 1"),
    ({"weight": {"name": "minmax", "bits": 9}}, "supports bits 1..8"),
    ({"weight": {"name": "minmax"}}, "bits is required"),
    # not coerced (session 21: True was one bit, 2.0 and "2" two)
    ({"weight": {"name": "minmax", "bits": True}}, r"plan.weight.bits: Input should be a valid integer"),
    ({"weight": {"name": "minmax", "bits": 2.0}}, r"plan.weight.bits: Input should be a valid integer"),
    ({"act": {"name": "pact", "bits": "2"}}, r"plan.act.bits: Input should be a valid integer"),
    ({"weight": {"name": "sawb", "bits": 2, "colour": 1}}, "no option colour"),
    ({"act": {"name": "bwn", "bits": 1}}, "cannot quantize role 'act'"),
    ({"method": {"name": "magic"}}, "unknown method 'magic'"),
    ({"wieght": {"name": "sawb", "bits": 2}}, "plan.wieght: unknown field"),
])
def test_bad_plans_give_clear_errors(plan, msg):
    with pytest.raises(ConfigError, match=msg):
        quantize(resnet(), plan)


def test_works_on_a_user_module_and_trains():
    torch.manual_seed(0)
    net = UserNet()
    quantize(net, {"weight": {"name": "minmax", "bits": 2}, "act": {"name": "lsq", "bits": 4, "signed": True}})
    names = [lp.name for lp in quant_state(net).layers]
    assert names == ["stem", "body.0", "head.fc1", "head.fc2"]
    assert parametrize.is_parametrized(net.body[0]) and parametrize.is_parametrized(net.head["fc1"])
    x, y = torch.randn(64, 2, 16), torch.randint(0, 5, (64,))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert torch.unique(net.body[0].weight.detach()).numel() <= 4


def test_state_dict_round_trip_after_quantize():
    m = quantize(resnet(), {"weight": {"name": "lsq", "bits": 2, "per_channel": True}, "act": {"name": "lsq", "bits": 2}})
    x = torch.randn(3, 1, 28, 28)
    m.train()
    m(x)
    m.eval()
    ref = m(x)
    m2 = quantize(resnet(), {"weight": {"name": "lsq", "bits": 2, "per_channel": True}, "act": {"name": "lsq", "bits": 2}})
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert torch.equal(m2(x), ref)


def test_quantizing_twice_is_refused():
    m = quantize(resnet(), W2A2)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(m, W2A2)


def test_plan_table_lists_every_layer_with_bits():
    m = quantize(resnet(), W2A2)
    table = quant_state(m).table()
    assert "layers.0.0.conv1" in table and "sawb2" in table and "pact2" in table
    first_row = next(line for line in table.splitlines() if line.startswith("conv1 "))
    assert first_row.split()[3:5] == ["fp32", "fp32"]


def test_plan_from_yaml(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("weight: {name: lsq, bits: 3, per_channel: true}\nact: fp\nkeep_first: false\n")
    plan = Plan.from_yaml(str(p))
    assert plan.weight.options == {"per_channel": True} and plan.act is None and not plan.keep_first
    with pytest.raises(ConfigError, match="plan file not found"):
        Plan.from_yaml(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("raw, msg", [("# Größe\nweight: {name: sawb, bits: 2}\n".encode("latin-1"),
                                      ": not UTF-8 text (byte 0xf6 at offset 4); a plan is a YAML text file"),
                                     (b"weight: {name: sawb, bits: 2\n",
                                      ": not valid YAML (while parsing a flow mapping)"),
                                     (b"", ": the file is empty"), (None, " is a folder; a plan is a YAML file")])
def test_a_malformed_plan_file_is_one_line(tmp_path, raw, msg):
    """lowbit.quantize(model, "plan.yaml") reads the file as the CLI reads a config: a latin-1 comment, a YAML syntax
    error or a folder was a yaml ReaderError/ParserError or an IsADirectoryError, and an empty file the default plan."""
    p = tmp_path / "plan.yaml"
    p.mkdir() if raw is None else p.write_bytes(raw)
    with pytest.raises(ConfigError) as e:
        quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1)), str(p))
    assert str(e.value).startswith(f"{p}{msg}"), str(e.value)


def test_plan_from_yaml_reads_utf8_whatever_the_locale(tmp_path, c_locale):
    """Before: opened in the locale's encoding, a UTF-8 comment was a UnicodeDecodeError traceback under
    LC_ALL=C PYTHONUTF8=0 (lowbit.quantize(model, "plan.yaml")); the CLI's configs were read as bytes already."""
    p = tmp_path / "plan.yaml"
    p.write_bytes("# W2: weights in {±1} — see docs\nweight: {name: sawb, bits: 2}\n".encode("utf-8"))
    assert Plan.from_yaml(str(p)).weight.bits == 2
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1))
    quantize(model, str(p))
    assert {k: (b.weight, b.act) for k, b in layer_bits(model).items()} == {"1": (2, None)}


def test_an_unsigned_activation_quantizer_on_a_signed_input_warns_once_per_layer():
    """PACT in front of a layer whose input is not a ReLU output drops the negative half: one warning
    naming that layer, on its first input only; a ReLU'd input or a signed quantizer is silent."""
    import warnings

    class Bottleneck(nn.Module):  # fc2 reads fc1's linear output (signed), fc3 reads a ReLU
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc4(self.fc3(torch.relu(self.fc2(self.fc1(torch.relu(self.fc0(x)))))))

    def caught(plan):
        torch.manual_seed(0)
        m = quantize(Bottleneck(), plan)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m(torch.randn(64, 6))
            m(torch.randn(64, 6))
        return [str(x.message) for x in w]

    msgs = caught(W2A2)
    assert len(msgs) == 1 and "layer 'fc2'" in msgs[0] and "become 0" in msgs[0], msgs
    assert caught({**W2A2, "layers": {"fc2": {"act": {"name": "lsq", "bits": 2, "signed": True}}}}) == []
    assert caught({"weight": {"name": "sawb", "bits": 2}}) == []  # no activation quantizer
    assert caught({**W2A2, "signed_act": {"name": "lsq", "signed": True}}) == []  # found by the trace


def test_a_shared_layer_checks_the_input_of_each_call_for_dropped_negatives():
    """A conv the forward calls twice, first on a ReLU output, then on its own (signed) output: PACT drops the
    second call's negative half. Before session 28 only the layer's first input was checked: no warning."""
    import warnings

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c(self.c(torch.relu(self.c1(x))))).mean((2, 3)))

    def caught(plan):
        torch.manual_seed(0)
        m = quantize(Twice(), plan)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m(torch.randn(4, 1, 8, 8))
            m(torch.randn(4, 1, 8, 8))
        return [str(x.message) for x in w]

    msgs = caught(W2A2)
    assert len(msgs) == 1 and msgs[0].startswith("layer 'c' (its call 2 of 2 in the forward): "), msgs
    assert "become 0" in msgs[0]
    assert caught({**W2A2, "signed_act": {"name": "lsq", "signed": True}}) == []  # the trace finds the signed call


def test_a_functional_conv_at_an_end_is_named_with_what_keep_first_and_keep_last_keep():
    """The image goes through F.conv2d on an nn.Parameter, the logits come from F.linear: quantize leaves both in
    full precision (not modules), and keep_first / keep_last keep c2 / c4, modules in the middle. Before session 28
    neither was said."""
    import warnings

    import torch.nn.functional as F

    class FuncEnds(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.fc_w = nn.Parameter(torch.randn(4, 1, 3, 3)), nn.Parameter(torch.randn(3, 4))
            self.c2, self.c3, self.c4 = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

        def forward(self, x):
            x = torch.relu(F.conv2d(x, self.w, padding=1))
            x = torch.relu(self.c4(torch.relu(self.c3(torch.relu(self.c2(x))))))
            return F.linear(x.mean((2, 3)), self.fc_w)

    def caught(plan):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = quantize(FuncEnds(), plan)
        return m, [str(x.message) for x in w]

    m, msgs = caught(W2A2)
    assert [(lp.name, lp.weight is None) for lp in quant_state(m).layers] == [("c2", True), ("c3", False), ("c4", True)]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("the forward's first conv/linear is a functional call, conv2d (F.conv2d): ")
    assert "keep_first keeps 'c2'" in msgs[0] and "{c2: {weight: {}, act: {}}}" in msgs[0]
    assert msgs[1].startswith("the forward's last conv/linear is a functional call, linear (F.linear): ")
    assert "keep_last keeps 'c4'" in msgs[1]
    m, msgs = caught({**W2A2, "layers": {"c2": {"weight": {}, "act": {}}}})  # the advice: c2 quantized, said once
    assert quant_state(m).layers[0].weight.label() == "sawb2" and "keep_first" not in msgs[0]


@pytest.mark.parametrize("aux_first", [False, True])
def test_an_eval_forward_before_training_does_not_use_up_a_training_only_calls_check(aux_first):
    """A shared conv with a training-only call (an aux branch) on a signed tensor: PACT drops its negative half. One
    eval forward first (the baseline of a pretrained model) used up the check of the trace's call 1: with the aux
    call second it was never checked (no warning), with it first it was named "call 2 of 2"."""
    import warnings

    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            y = self.c1(x)  # signed
            aux = self.fc(self.c(y).mean((2, 3))) if self.training and aux_first else 0
            out = aux + self.fc(torch.relu(self.c(torch.relu(y))).mean((2, 3)))
            if self.training and not aux_first:
                out = out + self.fc(self.c(y).mean((2, 3)))
            return out

    torch.manual_seed(0)
    m = quantize(Aux(), W2A2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.eval()
        with torch.no_grad():
            m(torch.randn(4, 1, 8, 8))
        m.train()
        for _ in range(3):
            m(torch.randn(4, 1, 8, 8))
    msgs = [str(x.message) for x in w]
    call = 1 if aux_first else 2
    assert len(msgs) == 1 and msgs[0].startswith(f"layer 'c' (its call {call} of 2 in the forward): "), msgs


def test_a_functional_linear_on_parameters_only_is_no_end_of_the_forward():
    """Attention pooling with a learned query, q = F.linear(self.query, self.wq): it reads no input, yet before the fix
    it was named "the forward's first conv/linear", and the warning said the stem, which reads the image, was not the
    layer that reads the network input (advising to quantize it). A functional conv on the image is still named."""
    import warnings

    import torch.nn.functional as F

    class AttnPool(nn.Module):
        def __init__(self, branch=False):
            super().__init__()
            self.stem, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)
            self.query, self.wq = nn.Parameter(torch.randn(1, 8)), nn.Parameter(torch.randn(8, 8))
            self.w, self.branch = nn.Parameter(torch.randn(8, 3, 3, 3)), branch

        def forward(self, x):
            h = self.stem(x) + F.conv2d(x, self.w, padding=1) if self.branch else self.stem(x)
            f = torch.relu(self.c2(torch.relu(h))).flatten(2).transpose(1, 2)
            a = torch.softmax(f @ F.linear(self.query, self.wq).t(), dim=1)
            return self.fc((a * f).sum(1))

    def caught(branch):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            quantize(AttnPool(branch), W2A2)
        return [str(x.message) for x in w]

    assert caught(False) == []
    msgs = caught(True)
    assert len(msgs) == 1 and msgs[0].startswith("the forward's first conv/linear is a functional call, conv2d "
                                                 "(F.conv2d): "), msgs
    # the stem reads the image beside the functional conv: it is an end too (said "not the layer that reads the
    # network input" before session 29)
    assert "keep_first keeps 'stem', the first conv/linear module, in full precision too, which also reads the " \
           "network input: to quantize it" in msgs[0], msgs


def test_signed_act_goes_where_the_input_can_be_negative():
    """plan.signed_act: the layers reading a linear output (MobileNetV2's bottleneck: every expand conv
    after the first block, and the last 1x1 conv; the stem reads the signed image) get it, at act's bits;
    ResNet's convs read ReLU outputs except the stem. The same layers as the MobileNetV2 benchmark's
    hand-written plan.layers patterns."""
    from lowbit.plan import signed_input_layers

    mb = create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25)
    expect = ["features.0"] + [f"features.{i}.conv.0" for i in range(4, 20)] + ["features.20"]
    assert signed_input_layers(mb) == expect
    assert signed_input_layers(resnet()) == ["conv1"]
    plan = Plan.from_dict({**W2A2, "signed_act": {"name": "lsq", "signed": True},
                           "layers": {"features.20": {"act": {"bits": 4}}}})
    acts = {lp.name: lp.act for lp in plan.resolve(mb)}
    assert acts["features.0"] is None  # keep_first
    assert acts["features.4.conv.0"].name == "lsq" and acts["features.4.conv.0"].bits == 2
    assert acts["features.4.conv.0"].options == {"signed": True}
    assert acts["features.4.conv.3"].name == "pact" and acts["features.3.conv.0"].name == "pact"
    assert acts["features.20"].label() == "lsq4,signed=True"  # plan.layers patches on top
    sig = {"act": {"name": "lsq", "bits": 2, "signed": True}}
    hand = Plan.from_dict({**W2A2, "layers": {"features.[4-9].conv.0": sig, "features.1[0-9].conv.0": sig,
                                              "features.20": sig}})
    auto = Plan.from_dict({**W2A2, "signed_act": {"name": "lsq", "signed": True}})
    assert [lp.act for lp in auto.resolve(mb)] == [lp.act for lp in hand.resolve(mb)]
    class Shifted(nn.Module):  # relu(x) + (-1) is signed; relu(a) + relu(b) is not
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x)) + torch.relu(self.b(x))
            return self.d(torch.relu(self.c(y)) + (-1.0))

    assert signed_input_layers(Shifted()) == ["a", "b", "d"]
    with pytest.raises(ConfigError, match="signed_act needs plan.act"):
        Plan.from_dict({"weight": {"name": "sawb", "bits": 2}, "signed_act": {"name": "lsq"}}).resolve(mb)

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    with pytest.raises(ConfigError, match="signed_act needs a model torch.fx can trace"):
        quantize(Branchy(), {**W2A2, "keep_first": False, "signed_act": {"name": "lsq", "signed": True}})


def test_keep_first_and_last_follow_the_forward_not_the_registration_order():
    """A user's module that registers its classifier before its convs: before session 23 keep_first kept the
    classifier and keep_last the second conv, and the real first conv read the normalised image at 2 bits."""
    import torch
    from torch import nn

    from lowbit import quant_state, quantize
    from lowbit.quantize import ends_full_precision

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.c1, self.c2 = nn.Linear(16, 10), nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)

        def forward(self, x):
            return self.head(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3), keepdim=True), 1))

    m = quantize(HeadFirst(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    plans = {lp.name: (lp.weight is None, lp.act is None) for lp in quant_state(m).layers}
    assert plans == {"head": (True, True), "c1": (True, True), "c2": (False, False)}
    assert ends_full_precision(m) == [True, True]


def test_quantize_refuses_what_it_would_get_wrong_and_says_when_it_guesses():
    """Session 24 (a researcher's own models): a weight_norm layer was quantized and then broke set_bits, unquantize
    and layer_bits; per-channel scales on a ConvTranspose2d were per input channel; on a model torch.fx cannot trace,
    keep_first/keep_last silently took registration order (a classifier registered first was kept, the real first
    conv quantized)."""
    import warnings as w

    from torch.nn.utils.parametrizations import weight_norm

    from lowbit import quantize as q
    from lowbit.errors import ConfigError

    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), weight_norm(nn.Conv2d(4, 4, 3)), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ConfigError, match="layer 2: its weight already has a parametrization .*_WeightNorm"):
        q(m, {"weight": {"name": "sawb", "bits": 2}})
    assert not hasattr(m[0], "parametrizations")  # nothing changed
    t = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Conv2d(2, 1, 3))
    with pytest.raises(ConfigError, match="layer 1: per_channel weights on a ConvTranspose2d"):
        q(t, {"weight": {"name": "sawb", "bits": 2, "per_channel": True}})
    with pytest.raises(ConfigError, match="layer 1: per_channel weights on a ConvTranspose2d"):  # lqnet's default
        q(t, {"weight": {"name": "lqnet", "bits": 2}})
    q(t, {"weight": {"name": "lqnet", "bits": 2, "per_channel": False}})

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first
            self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = -x
            return self.head(self.c2(self.c1(x)).mean((2, 3)))

    with w.catch_warnings(record=True) as got:
        w.simplefilter("always")
        q(Branchy(), {"weight": {"name": "sawb", "bits": 2}})
    assert any("registration order: 'head' and 'c2'" in str(x.message) for x in got)


def test_a_refused_plan_leaves_the_model_as_it_was():
    """A quantize that failed part-way kept the parametrizations of the layers done before the bad one, so a second
    quantize stacked another on them (and since session 24 is refused as 'already parametrized')."""
    from lowbit import quantize as q
    from lowbit.errors import ConfigError

    m = create_model("resnet8", in_channels=1, num_classes=10, width=0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="plan.layers.fc"):
        q(m, {"weight": {"name": "sawb", "bits": 2}, "keep_last": False, "layers": {"fc": {"weight": {"name": "nope"}}}})
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    assert not any(hasattr(mod, "input_quantizer") for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    q(m, {"weight": {"name": "sawb", "bits": 2}})  # and it quantizes afterwards


def test_a_deep_copy_unquantizes_on_its_own():
    """Session 25: a deep copy (copy.deepcopy, AveragedModel) shares torch's injected parametrized class with its
    original (pytorch#80811), so unquantizing one deleted `weight` from both: the other failed with
    "'ParametrizedConv2d' object has no attribute 'weight'"."""
    import copy

    from lowbit.quantize import unquantize

    torch.manual_seed(0)
    m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25),
                 {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    y = m(x)
    d = copy.deepcopy(m)
    assert type(d.layers[0][0].conv1) is type(m.layers[0][0].conv1)  # torch's sharing, which this test is about
    unquantize(d)
    assert torch.equal(m(x), y)  # the original still computes what it did
    quantize(d, {"weight": {"name": "sawb", "bits": 4}})  # and the copy can be quantized again
    unquantize(m, keep="latent")
    assert type(m.layers[0][0].conv1) is nn.Conv2d and parametrize.is_parametrized(d.layers[0][0].conv1)
    d.eval()
    d(x)


def test_evaluating_before_calibration_warns_and_starts_nothing(recwarn):
    """Session 25 (a PyTorch user): min-max activations evaluated before any training batch output zeros without a
    word (8.6 % for 96.4 % on digits), and LSQ, centroid and LQ-Net activations started on their first call in any
    mode, so an evaluation or a zero-image cost probe fixed LSQ's step at 1e-8 (55.7 % for 94.7 % after training).
    Data-initialised activation quantizers now start on their first training batch that is not all zeros (like
    BatchNorm's statistics), and evaluating before that warns once per model."""
    import warnings

    from lowbit.quantize import UncalibratedWarning, quiet_calibration

    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    for act in ("minmax", "uniform", "lsq", "centroids", "lqnet"):
        m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25),
                     {"weight": {"name": "sawb", "bits": 4}, "act": {"name": act, "bits": 4}})
        acts = [q for q in m.modules() if getattr(q, "is_quantizer", False) and q.role == "act"]
        m.eval()
        with quiet_calibration(), warnings.catch_warnings():
            warnings.simplefilter("error", UncalibratedWarning)
            m(x)  # a cost probe: quiet
        with pytest.warns(UncalibratedWarning, match=rf"first: layer 'layers.0.0.conv1', {act}\)") as w:
            m(x)
        assert len([r for r in w if r.category is UncalibratedWarning]) == 1, act  # once for the model
        m.train()
        m(torch.zeros(2, 1, 8, 8))  # an all-zero batch starts nothing either
        assert all(q.awaits_data() for q in acts), act
        m(x)
        assert not any(q.awaits_data() for q in acts), act
        if act == "lsq":
            assert min(float(q.step) for q in acts) > 1e-3
        m.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UncalibratedWarning)
            m(x)


def test_a_module_shared_with_a_quantized_model_is_named_so():
    """Session 25: a layer shared between two models, quantized through one, was refused in the other as "already
    has a parametrization (QuantizedWeight, e.g. weight_norm) ... remove it first", advice that breaks the first."""
    shared = nn.Conv2d(1, 4, 3)
    quantize(nn.Sequential(nn.Conv2d(1, 1, 1), shared, nn.Conv2d(4, 2, 1)), {"weight": {"name": "sawb", "bits": 2}})
    assert parametrize.is_parametrized(shared, "weight")
    with pytest.raises(ConfigError, match="layer 1 is already quantized by lowbit, though this model is not: the "
                                          "module is shared with a quantized model"):
        quantize(nn.Sequential(nn.Conv2d(1, 1, 1), shared, nn.Conv2d(4, 2, 1)), {"weight": {"name": "sawb", "bits": 2}})


def test_other_layers_at_the_ends_are_named():
    """Session 25 (a user's own models): keep_first / keep_last keep one layer each; a second conv reading the image
    (a torch.cat of two branches) and the other of two heads were quantized without a word (the conv's unsigned
    quantizer clipped the image's negative half: 76.6 % for 81.6 %). Now a warning names them; naming them in
    plan.layers silences it, and the zoo's models have one end each."""
    import torch.nn.functional as F

    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.mix, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

        def forward(self, x):
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            return self.fc(F.relu(self.mix(h)).mean((2, 3)))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.ha, self.hb = nn.Conv2d(1, 4, 3), nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.c(x)).mean((2, 3))
            return self.ha(h), self.hb(h)

    plan = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}
    with pytest.warns(UserWarning, match=r"keep_first keeps 'a' in full precision, but these layers also read the "
                                         r"network input .* quantized: 'b'; keep them too with plan.layers \({b: fp}\)"):
        quantize(TwoStems(), plan)
    with pytest.warns(UserWarning, match=r"keep_last keeps 'hb' .* also make an output .* quantized: 'ha'"):
        quantize(TwoHeads(), plan)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(TwoStems(), {**plan, "layers": {"b": "fp"}})
        for name in ("resnet8", "mobilenetv2", "lenet5", "vgg_small"):
            quantize(create_model(name, in_channels=1, num_classes=10, image_size=28), plan)


def _codebook_model_started(act: str):
    """A small ResNet-8 with 4-bit ``act`` (centroids / LQ-Net) activations, started by one training batch, in
    eval mode, and that batch."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25),
                 {"weight": {"name": "sawb", "bits": 4}, "act": {"name": act, "bits": 4}})
    m.train()
    m(x)
    return m.eval(), x


def test_set_bits_that_empties_an_activation_codebook_warns_before_evaluation():
    """Session 26: set_bits on centroid / LQ-Net activations empties their codebook (it is re-initialised on the
    next *training* batch); evaluating before one gave constant outputs (9.8 % for 88.7 % on digits) without the
    UncalibratedWarning that the same state gives before training."""
    import warnings

    from lowbit.quantize import UncalibratedWarning, set_bits

    for act in ("centroids", "lqnet"):
        m, x = _codebook_model_started(act)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UncalibratedWarning)
            m(x)  # started: no warning
        set_bits(m, {"*": {"act": 3}})
        with pytest.warns(UncalibratedWarning, match=act):
            m(x)
        m.train()
        m(x)  # a training batch starts them again
        m.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UncalibratedWarning)
            m(x)


def test_a_refused_set_bits_keeps_trained_codebooks():
    """Session 26: a refused lowbit.set_bits undid the layers done so far with set_bits(old bits), which empties
    centroid and LQ-Net codebooks: the call was refused, and the trained activations were gone (digits 88.7 % ->
    10.3 %)."""
    from lowbit.quantize import set_bits

    for act in ("centroids", "lqnet"):
        m, x = _codebook_model_started(act)
        acts = [q for q in m.modules() if getattr(q, "is_quantizer", False) and q.role == "act"]
        before = [{k: v.clone() for k, v in q.state_dict().items()} for q in acts]
        ref = m(x)
        last = [lp.name for lp in quant_state(m).layers if lp.act is not None][-1]
        with pytest.raises(ConfigError, match="got 9"):
            set_bits(m, {"*": {"act": 3}, last: {"act": 9}})
        assert all(q.bits == 4 and not q.awaits_data() for q in acts), act
        for q, b in zip(acts, before):
            assert all(torch.equal(v, b[k]) for k, v in q.state_dict().items()), act
        assert torch.equal(m(x), ref), act


def test_a_reloaded_model_does_not_recheck_its_quantizers_every_forward():
    """Session 26's emptied-codebook check re-ran the start check on every forward of every layer whose input
    quantizer has no ``initialized`` buffer (PACT, DoReFa...) once a state dict was loaded (lowbit eval, export,
    final_model): _init_seen stays False there."""
    import importlib

    qmod = importlib.import_module("lowbit.quantize")
    m = quantize(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                     torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)),
                 {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    m.train()
    m(torch.randn(2, 1, 8, 8))
    m.load_state_dict(m.state_dict())
    m.eval()
    calls = []
    real = qmod._InputQuantHook._check_started
    qmod._InputQuantHook._check_started = lambda self, q: (calls.append(1), real(self, q))[1]
    try:
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(2, 1, 8, 8))
    finally:
        qmod._InputQuantHook._check_started = real
    assert not calls
