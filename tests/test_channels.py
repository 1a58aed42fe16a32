"""Per-layer channel counts (lowbit.models.channels): shapes, residual rules, width, round trip, errors,
and that config, cost, export and `lowbit info` follow them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lowbit import quantize
from lowbit.cli import main
from lowbit.config import load_config
from lowbit.cost import profile
from lowbit.errors import ConfigError
from lowbit.export import IntegerReference, lower
from lowbit.models import create_model, list_models, model_channels

CONFIG = Path(__file__).parent.parent / "configs" / "resnet8_channels.yaml"

#: non-uniform counts for every model of the zoo (odd numbers, blocks whose input and output differ)
NON_UNIFORM = {
    "lenet5": {"features.0": 5, "features.3": 11, "classifier.0": 33, "classifier.2": 17},
    "mobilenetv2": {"features.0": 24, "features.3.conv.3": 12, "features.5.conv.0": 100, "features.5.conv.6": 20,
                    "features.20": 600},
    "resnet8": {"conv1": 4, "layers.0.0.conv1": 3, "layers.0.0.conv2": 5, "layers.1.0.conv1": 6,
                "layers.1.0.conv2": 7, "layers.2.0.conv1": 9, "layers.2.0.conv2": 11},
    "resnet18": {"conv1": 30, "layers.2.0.conv2": 250, "layers.3.1.conv1": 100},
    "resnet20": {"layers.0.1.conv1": 7, "layers.1.2.conv2": 29, "layers.2.0.conv1": 13},
    "resnet32": {"layers.0.1.conv1": 7, "layers.1.2.conv2": 29, "layers.2.0.conv1": 13},
    "resnet56": {"layers.0.1.conv1": 7, "layers.1.2.conv2": 29, "layers.2.0.conv1": 13},
    "vgg_small": {"features.0": 20, "features.7": 45, "features.17": 70},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops: one thread (conftest.py)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def one_line_error(match: str, name: str, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as err:
        create_model(name, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_every_model_has_an_entry():
    assert sorted(NON_UNIFORM) == sorted(list_models())


@pytest.mark.parametrize("name", sorted(NON_UNIFORM))
def test_non_uniform_channels_forward_backward_and_round_trip(name):
    torch.manual_seed(0)
    listed = NON_UNIFORM[name]
    m = create_model(name, in_channels=1, num_classes=7, image_size=32, channels=listed)
    built = model_channels(m)
    assert {n: built[n] for n in listed} == listed
    assert set(listed) <= set(m.channel_layers) <= set(built)
    out = m(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    again = create_model(name, in_channels=1, num_classes=7, image_size=32, channels=built)
    assert model_channels(again) == built
    assert shapes(again) == shapes(m)


@pytest.mark.parametrize("name", sorted(NON_UNIFORM))
def test_uniform_round_trip_and_unlisted_layers_keep_their_counts(name):
    base = create_model(name, width=0.5)
    assert shapes(create_model(name, channels=model_channels(base))) == shapes(base)
    one = base.channel_layers[1]
    changed = model_channels(create_model(name, width=0.5, channels={one: 6}))  # 6 * 0.5 = 3
    diff = {n for n in changed if changed[n] != model_channels(base).get(n)}
    assert one in diff and changed[one] == 3
    assert diff <= {one} | {n for n in changed if n not in base.channel_layers}  # only followers move with it


def test_resnet8_exact_shapes_and_projection_rule():
    m = create_model("resnet8", in_channels=1, channels=NON_UNIFORM["resnet8"])
    s = shapes(m)
    assert s["conv1.weight"] == (4, 1, 3, 3)
    assert s["layers.0.0.conv1.weight"] == (3, 4, 3, 3)
    assert s["layers.0.0.conv2.weight"] == (5, 3, 3, 3)
    # stride 1 but 4 -> 5 channels: a 1x1 projection (option B) with stride 1
    assert s["layers.0.0.shortcut.0.weight"] == (5, 4, 1, 1)
    assert m.layers[0][0].shortcut[0].stride == (1, 1)
    assert s["layers.1.0.conv1.weight"] == (6, 5, 3, 3)
    assert s["layers.1.0.shortcut.0.weight"] == (7, 5, 1, 1)
    assert s["layers.2.0.conv2.weight"] == (11, 9, 3, 3)
    assert s["fc.weight"] == (10, 11)
    # a block whose input and output agree keeps its identity shortcut
    r20 = create_model("resnet20", channels={"layers.0.1.conv1": 7})
    assert isinstance(r20.layers[0][1].shortcut, nn.Identity)
    assert r20.layers[0][1].conv2.weight.shape == (16, 7, 3, 3)
    r20 = create_model("resnet20", channels={"layers.0.1.conv2": 12})
    assert r20.layers[0][1].shortcut[0].weight.shape == (12, 16, 1, 1)
    assert r20.layers[0][2].shortcut[0].weight.shape == (16, 12, 1, 1)  # 12 back to 16: projection too
    assert m.channel_layers == tuple(NON_UNIFORM["resnet8"])


def test_mobilenetv2_depthwise_follows_expansion_and_residuals():
    m = create_model("mobilenetv2", channels=NON_UNIFORM["mobilenetv2"])
    s = shapes(m)
    assert s["features.3.conv.0.weight"] == (24, 1, 3, 3)  # ratio 1: the depthwise follows the stem
    assert s["features.3.conv.3.weight"] == (12, 24, 1, 1)
    assert s["features.4.conv.0.weight"] == (96, 12, 1, 1)  # unlisted: 6 x the uniform input 16
    assert s["features.5.conv.0.weight"] == (100, 24, 1, 1)
    assert s["features.5.conv.3.weight"] == (100, 1, 3, 3) and m.features[5].conv[3].groups == 100
    assert s["features.5.shortcut.0.weight"] == (20, 24, 1, 1)  # a repeat block keeps its residual
    assert m.features[4].use_residual is False and m.features[4].shortcut is None
    assert m.features[6].conv[0].weight.shape == (144, 20, 1, 1)  # unlisted: the uniform 6 x 24
    assert m.features[7].use_residual and m.features[7].shortcut is None  # 32 -> 32: identity
    assert s["features.20.weight"] == (600, 320, 1, 1) and s["fc.weight"] == (10, 600)


def test_width_multiplies_listed_counts():
    m = create_model("resnet8", width=2.0, channels={"conv1": 5, "layers.1.0.conv1": 3})
    built = model_channels(m)
    assert (built["conv1"], built["layers.1.0.conv1"], built["layers.1.0.conv2"]) == (10, 6, 64)
    assert model_channels(create_model("resnet8", width=0.5, channels={"conv1": 5}))["conv1"] == 3  # 2.5 up
    # WRPN x2 of a found network: a model_channels dict (classifier and shortcuts included) at width 2
    found = model_channels(create_model("resnet8", channels=NON_UNIFORM["resnet8"]))
    wide = model_channels(create_model("resnet8", width=2.0, channels=found))
    assert wide == {n: (c if n == "fc" else 2 * c) for n, c in found.items()}
    assert model_channels(create_model("mobilenetv2", width=0.5, channels={"features.0": 9}))["features.0"] == 5


def test_nested_mapping_is_flattened():
    nested = {"conv1": 4, "layers": {0: {0: {"conv1": 3}}}}
    assert model_channels(create_model("resnet8", channels=nested)) == model_channels(
        create_model("resnet8", channels={"conv1": 4, "layers.0.0.conv1": 3}))


def test_bad_channels_are_one_line_errors():
    msg = one_line_error("names no conv/linear layer", "resnet8", channels={"layers.9.conv1": 4, "bn1": 3})
    assert "'resnet8'" in msg and "layers.9.conv1, bn1" in msg and "its layers: conv1, layers.0.0.conv1" in msg
    long = one_line_error("names no", "resnet56", channels={"conv9": 4})
    assert "... (55 in all)" in long
    one_line_error(r"channels\['conv1'\] must be an integer >= 1, got 0", "resnet20", channels={"conv1": 0})
    one_line_error(r"channels\['conv1'\] must be an integer >= 1, got 2.5", "vgg_small", channels={"conv1": 2.5})
    one_line_error(r"must be an integer >= 1, got True", "lenet5", channels={"features.0": True})
    one_line_error(r"channels must be a mapping \{layer name: out channels\}, got \[16, 32\]", "resnet8",
                   channels=[16, 32])
    one_line_error(r"channels\['fc'\] = 12, but fc follows another layer or num_classes and has 10 out channels",
                   "resnet8", channels={"fc": 12})
    one_line_error(r"features.4.conv.3 follows .* has 96 out", "mobilenetv2", channels={"features.4.conv.3": 100})
    # an identity shortcut has no conv to set
    one_line_error("names no conv/linear layer: layers.0.0.shortcut.0", "resnet20",
                   channels={"layers.0.0.shortcut.0": 16})


def test_profile_counts_params_and_macs_by_hand():
    # ResNet-8, 1 input channel, 8x8 images, the NON_UNIFORM counts: both stride-1 and stride-2
    # blocks change their channel count, so all three have a 1x1 projection (conv + BN).
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=8, channels=NON_UNIFORM["resnet8"])
    s = profile(m, torch.randn(1, 1, 8, 8))
    conv_params = {
        "conv1": 1 * 4 * 9,
        "layers.0.0.conv1": 4 * 3 * 9, "layers.0.0.conv2": 3 * 5 * 9, "layers.0.0.shortcut.0": 4 * 5,
        "layers.1.0.conv1": 5 * 6 * 9, "layers.1.0.conv2": 6 * 7 * 9, "layers.1.0.shortcut.0": 5 * 7,
        "layers.2.0.conv1": 7 * 9 * 9, "layers.2.0.conv2": 9 * 11 * 9, "layers.2.0.shortcut.0": 7 * 11,
        "fc": 11 * 10 + 10,
    }
    bn = 2 * (4 + 3 + 5 + 5 + 6 + 7 + 7 + 9 + 11 + 11)  # weight + bias of each BN
    # MACs = out channels * out positions * (in channels * k * k); positions 64, 16 (stride 2), 4
    macs = {
        "conv1": 4 * 64 * 1 * 9,
        "layers.0.0.conv1": 3 * 64 * 4 * 9, "layers.0.0.conv2": 5 * 64 * 3 * 9, "layers.0.0.shortcut.0": 5 * 64 * 4,
        "layers.1.0.conv1": 6 * 16 * 5 * 9, "layers.1.0.conv2": 7 * 16 * 6 * 9, "layers.1.0.shortcut.0": 7 * 16 * 5,
        "layers.2.0.conv1": 9 * 4 * 7 * 9, "layers.2.0.conv2": 11 * 4 * 9 * 9, "layers.2.0.shortcut.0": 11 * 4 * 7,
        "fc": 11 * 10,
    }
    assert {lc.name: lc.params for lc in s.layers} == conv_params
    assert {lc.name: lc.macs for lc in s.layers} == macs
    assert sum(conv_params.values()) == 2_637 and bn == 136
    assert s.params == 2_637 + 136
    assert s.macs == sum(macs.values()) == 36_314


def test_export_numpy_reference_agrees_on_odd_channels():
    torch.manual_seed(0)
    odd = {"conv1": 5, "layers.0.0.conv1": 3, "layers.0.0.conv2": 7, "layers.1.0.conv1": 9,
           "layers.1.0.conv2": 11, "layers.2.0.conv1": 13, "layers.2.0.conv2": 6}
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, channels=odd)
    quantize(m, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    g = torch.Generator().manual_seed(0)
    m.train()
    with torch.no_grad():  # BN statistics and activation ranges, no optimizer step
        for _ in range(3):
            m(torch.randn(16, 1, 28, 28, generator=g))
    m.eval()
    assert model_channels(m) == model_channels(create_model("resnet8", in_channels=1, channels=model_channels(m)))
    x = torch.randn(64, 1, 28, 28, generator=g)
    graph = lower(m, x[:2])
    assert {op.name: op.weight.shape[0] for op in graph.conv_ops() if op.quantized}["layers.0.0.conv2"] == 7
    with torch.no_grad():
        want = m(x).numpy()
    got = IntegerReference(graph).run(x.numpy())
    assert np.array_equal(got.argmax(1), want.argmax(1))
    d = np.abs(got - want)
    assert np.median(d) < 1e-5 and d.max() < 2e-3


def test_config_validates_and_records_channels(tmp_path):
    cfg = load_config(CONFIG)
    assert cfg.model.options["channels"]["layers.0.0.conv2"] == 24
    resolved = tmp_path / "config.yaml"
    resolved.write_text(cfg.to_yaml())  # what a run folder records
    assert load_config(resolved).model.options["channels"] == cfg.model.options["channels"]
    with pytest.raises(ConfigError, match=r"^model.channels: model 'resnet8': channels\['conv1'\] must be an "
                                          r"integer >= 1, got -3$"):
        load_config(CONFIG, ["model.channels.conv1=-3"])
    with pytest.raises(ConfigError, match="model.channels: .*must be a mapping"):
        load_config(CONFIG, ["model.channels=16"])
    # a dotted override nests: model.channels.layers.0.0.conv1=8 sets layers.0.0.conv1
    cfg = load_config(CONFIG, ["model.channels.layers.0.0.conv1=8"])
    m = create_model(cfg.model.name, in_channels=1, **cfg.model.options)
    assert model_channels(m)["layers.0.0.conv1"] == 8 and model_channels(m)["layers.1.0.conv2"] == 40


def test_info_prints_custom_channels(capsys, tmp_path):
    assert main(["info", str(CONFIG), "data.limit=50"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.0.shortcut.0" in out and "24x16x1x1" in out and "12x16x3x3" in out
    assert "per-layer out channels (model.channels" in out and "layers.0.0.conv2 24" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "resnet8", "channels": {"conv7": 8}}}))
    assert main(["info", str(bad), "data.limit=50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: model 'resnet8': channels names no conv/linear layer: conv7;")
    assert "\n" not in err
