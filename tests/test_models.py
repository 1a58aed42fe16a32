"""Tests of the model zoo (lowbit.models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models import create_model, list_models, model_keywords, register_model

ALL_MODELS = ["lenet5", "mobilenetv2", "resnet8", "resnet18", "resnet20", "resnet32", "resnet56", "vgg_small"]
CIFAR_RESNETS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet56": 9}  # name -> n, depth = 6n + 2


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_conv_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_registry_lists_all_models():
    assert list_models() == ALL_MODELS


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("in_channels,num_classes,image_size", [(1, 10, 28), (3, 100, 32)])
def test_forward_backward(name, in_channels, num_classes, image_size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_resnet20_parameter_count_by_hand():
    # CIFAR ResNet-20, width 1, 3 input channels, 10 classes, option-B (1x1 conv + BN) shortcuts.
    # conv k x k: cin * cout * k * k weights (no bias); BN: 2 * channels (weight, bias).
    stem = 3 * 16 * 9 + 2 * 16  # 432 + 32
    stage1 = 3 * (2 * (16 * 16 * 9) + 2 * (2 * 16))  # 3 identity blocks: 3 * 4672
    stage2 = (
        (16 * 32 * 9 + 32 * 32 * 9 + 2 * (2 * 32))  # first block, stride 2
        + (16 * 32 + 2 * 32)  # projection shortcut: 1x1 conv + BN
        + 2 * (2 * (32 * 32 * 9) + 2 * (2 * 32))  # 2 identity blocks
    )
    stage3 = (
        (32 * 64 * 9 + 64 * 64 * 9 + 2 * (2 * 64))
        + (32 * 64 + 2 * 64)
        + 2 * (2 * (64 * 64 * 9) + 2 * (2 * 64))
    )
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + fc
    assert expected == 272_474  # the "0.27M" of He et al. (option A has no shortcut params: 0.27M too)
    assert n_params(create_model("resnet20", in_channels=3, num_classes=10, image_size=32)) == expected


def test_cifar_resnet_counts_grow_with_depth():
    # Each extra block per stage (n -> n + 1) adds one identity block to each of the 3 stages.
    per_n = (
        (2 * 16 * 16 * 9 + 2 * 2 * 16)
        + (2 * 32 * 32 * 9 + 2 * 2 * 32)
        + (2 * 64 * 64 * 9 + 2 * 2 * 64)
    )
    assert per_n == 97_216
    resnet20 = 272_474
    counts = {name: n_params(create_model(name)) for name in CIFAR_RESNETS}
    for name, n in CIFAR_RESNETS.items():
        assert counts[name] == resnet20 + (n - 3) * per_n, name
    assert counts["resnet8"] < counts["resnet20"] < counts["resnet32"] < counts["resnet56"]


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet18", "vgg_small"])
def test_width_two_quadruples_conv_params(name):
    base = create_model(name, width=1.0)
    wide = create_model(name, width=2.0)
    # Every conv doubles both its in and out channels except the stem, whose input stays at 3.
    stem = convs(base)[0].weight.numel()
    assert n_conv_params(wide) == 4 * n_conv_params(base) - 2 * stem
    assert 3.9 < n_conv_params(wide) / n_conv_params(base) <= 4.0


def test_width_scales_and_rounds_channels():
    model = create_model("resnet20", width=0.5)
    assert [c.out_channels for c in convs(model)][:1] == [8]
    assert linears(model)[-1].in_features == 32
    tiny = create_model("resnet8", width=0.01)  # rounds to at least 1 channel
    assert all(c.out_channels >= 1 for c in convs(tiny))
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenetv2_width_uses_multiples_of_eight():
    model = create_model("mobilenetv2", width=0.5)
    assert all(c.out_channels % 8 == 0 for c in convs(model))
    assert convs(model)[0].out_channels == 16  # make_divisible(32 * 0.5)
    assert convs(model)[-1].out_channels == 1280  # the last conv is not shrunk below 1280


@pytest.mark.parametrize("name", ALL_MODELS)
def test_stem_first_and_classifier_last(name):
    model = create_model(name, in_channels=1, num_classes=7, image_size=28)
    stem = convs(model)[0]
    assert stem.in_channels == 1
    assert stem.stride == (1, 1)
    classifier = linears(model)[-1]
    assert classifier.out_features == 7


@pytest.mark.parametrize("name", ALL_MODELS)
def test_registration_order_is_execution_order(name):
    """Leaf modules run in the order they are registered, each exactly once (so hooks are unambiguous)."""
    model = create_model(name, in_channels=3, num_classes=10, image_size=32)
    leaves = [m for m in model.modules() if not list(m.children())]
    executed: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: executed.append(mod)) for m in leaves]
    model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert [id(m) for m in executed] == [id(m) for m in leaves]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layer_conventions(name):
    model = create_model(name, batch_norm=True) if name == "lenet5" else create_model(name)
    mods = list(model.modules())
    relus = [m for m in mods if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_resnet_uses_option_b_shortcuts():
    model = create_model("resnet20")
    stage1, stage2, stage3 = model.layers
    assert isinstance(stage1[0].shortcut, nn.Identity)
    for stage in (stage2, stage3):
        proj = stage[0].shortcut
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
        assert all(isinstance(block.shortcut, nn.Identity) for block in stage[1:])


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet18", "vgg_small", "mobilenetv2"])
def test_digits_sized_input(name):
    model = create_model(name, in_channels=1, num_classes=10, image_size=8)
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_lenet5_sizes_and_batch_norm():
    for size in (28, 32):
        model = create_model("lenet5", in_channels=1, image_size=size)
        assert linears(model)[0].in_features == 16 * 5 * 5
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in create_model("lenet5").modules())
    bn = create_model("lenet5", batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2
    assert all(c.bias is None for c in convs(bn))
    rect = create_model("lenet5", in_channels=3, image_size=(32, 40))
    assert rect(torch.randn(2, 3, 32, 40)).shape == (2, 10)


def test_lenet5_rejects_tiny_images():
    with pytest.raises(ConfigError, match=r"lenet5.*8x8.*too small.*12x12"):
        create_model("lenet5", in_channels=1, image_size=8)


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_model_name():
    with pytest.raises(ConfigError) as err:
        create_model("resnet21")
    msg = assert_one_line(err)
    assert "resnet21" in msg and "resnet20" in msg and "vgg_small" in msg


def test_unknown_keyword():
    with pytest.raises(ConfigError) as err:
        create_model("resnet20", depth=20)
    msg = assert_one_line(err)
    assert "resnet20" in msg and "depth" in msg and "width" in msg
    with pytest.raises(ConfigError, match="batch_norm"):
        create_model("lenet5", bn=True)
    assert model_keywords("lenet5") == ["width", "batch_norm", "channels", "bias"]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("width", [0, -1.0, float("nan"), "2"])
def test_bad_width(name, width):
    with pytest.raises(ConfigError) as err:
        create_model(name, width=width)
    msg = assert_one_line(err)
    assert name in msg and "width" in msg


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (32,)}, "image_size"),
        ({"image_size": 2}, "too small"),
        ({"batch_norm": "yes"}, "batch_norm"),
    ],
)
def test_bad_common_values(kwargs, field):
    name = "lenet5" if "batch_norm" in kwargs else "resnet20"
    with pytest.raises(ConfigError) as err:
        create_model(name, **kwargs)
    msg = assert_one_line(err)
    assert name in msg and field in msg


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        create_model("nope")


def test_register_model_rejects_duplicates_and_bad_builders():
    with pytest.raises(ConfigError, match="resnet20"):
        register_model("resnet20")(lambda in_channels, num_classes, image_size: nn.Identity())
    with pytest.raises(TypeError):
        register_model("_bad_builder")(lambda channels: nn.Identity())
    assert "_bad_builder" not in list_models()


def test_resnet_activation_option():
    """hardtanh (BinaryNet-style, signed activations for sign quantizers) replaces every ReLU."""
    import torch.nn as nn

    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, activation="hardtanh")
    acts = [type(x) for x in m.modules() if isinstance(x, (nn.ReLU, nn.Hardtanh))]
    assert acts and set(acts) == {nn.Hardtanh}
    with pytest.raises(ConfigError, match="activation must be one of relu, hardtanh"):
        create_model("resnet20", activation="gelu")


def test_ones_own_model_trains_from_a_config(tmp_path):
    """Session 25: the README's way to one's own model in a config (lowbit.register_model, then lowbit.run); the
    searches audit found no documented way."""
    import lowbit

    @lowbit.register_model("_own_net_s25")
    def build(in_channels, num_classes, image_size, width=1.0):
        c = max(1, int(8 * width))
        return nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(c, num_classes))

    cfg = lowbit.load_config("configs/w2a2_pact_sawb.yaml", overrides=[
        "model.name=_own_net_s25", "data.name=digits", "data.limit=200", "train.epochs=1", "train.progress=false"])
    r = lowbit.run(cfg, tmp_path / "run")
    assert r.summary["model"] == "_own_net_s25" and lowbit.layer_bits(r.model)["3"].weight == 2
