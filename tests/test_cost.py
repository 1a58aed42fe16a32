"""Tests of lowbit.cost against numbers computed by hand (never by re-running the formulas)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowbit.cost import CostSummary, LayerBits, count_params, mem_002, profile, training_memory
from lowbit.errors import ConfigError


def tiny_net(inplace: bool = False) -> nn.Sequential:
    # names: 0 conv, 1 bn, 2 relu, 3 depthwise conv, 4 pool, 5 flatten, 6 linear
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


X = torch.randn(2, 1, 8, 8)  # batch of 2: every number below is per sample
MID = {"3": LayerBits(weight=2, act=2, n_scales=2)}


# ---------------------------------------------------------------------------------------------
# tiny net by hand
# ---------------------------------------------------------------------------------------------
def test_tiny_net_params_macs_bitops_size():
    s = profile(tiny_net(), X, MID)
    assert isinstance(s, CostSummary)
    by = {lc.name: lc for lc in s.layers}
    assert list(by) == ["0", "3", "6"]
    # params: conv 4*1*3*3 + 4 = 40; BN 2*4 = 8; depthwise 4*(4/4)*3*3 + 4 = 40; linear 3*4 + 3 = 15
    assert [by[n].params for n in by] == [40, 40, 15]
    assert s.params == 40 + 8 + 40 + 15 == 103
    assert by["3"].weight_shape == (4, 1, 3, 3)
    assert by["0"].kind == "conv" and by["6"].kind == "linear"
    # MACs: conv out 4*8*8 = 256 elems, each 1*9 products -> 2304; depthwise 256 * (4/4)*9 = 2304
    # (NOT 256*4*9 = 9216, which would ignore groups); linear 3*4 = 12
    assert [by[n].macs for n in by] == [2304, 2304, 12]
    assert s.macs == 4620
    # BitOPs: FP layers 32*32 per MAC, the w2/a2 conv 2*2 per MAC
    assert by["0"].bitops == 2304 * 1024 == 2359296
    assert by["3"].bitops == 2304 * 4 == 9216
    assert by["6"].bitops == 12 * 1024 == 12288
    assert s.bitops == 2359296 + 9216 + 12288 == 2380800
    assert (by["3"].w_bits, by["3"].a_bits, by["0"].w_bits, by["0"].a_bits) == (2, 2, 32, 32)
    # size: depthwise 36 weights * 2 + 4 bias * 32 + 2 scales * 32 = 72 + 128 + 64 = 264
    assert by["3"].size_bits == 264
    assert by["0"].size_bits == 40 * 32 == 1280
    # total: conv0 1280 + BN 8*32 = 256 + 264 + linear 15*32 = 480
    assert s.size_bits == 1280 + 256 + 264 + 480 == 2280
    assert s.fp32_size_bits == 103 * 32 == 3296
    assert s.size_bytes == 285.0 and s.fp32_size_bytes == 412.0
    assert s.compression == pytest.approx(3296 / 2280)
    # activations per sample: input 64, conv/bn/relu/depthwise outputs 4*8*8 = 256, pool 4, linear 3
    assert (by["0"].in_elems, by["0"].out_elems) == (64, 256)
    assert (by["6"].in_elems, by["6"].out_elems) == (4, 3)
    assert s.max_act_elems == 256
    # Mem: params without scales 2280 - 2*32 = 2216 bits; b_a = 2 -> max(2, 4) = 4; 256 * 4 = 1024
    assert s.act_bits == 2
    assert s.mem_bits == 2216 + 1024 == 3240


def test_full_precision_and_batch_independence():
    s1 = profile(tiny_net(), X[:1])
    s8 = profile(tiny_net(), torch.randn(8, 1, 8, 8))
    for s in (s1, s8):
        assert s.size_bits == s.fp32_size_bits == 3296
        assert s.compression == 1.0
        assert s.macs == 4620 and s.bitops == 4620 * 1024
        # FP32 model: N_p*32 + N_a*32
        assert s.mem_bits == 103 * 32 + 256 * 32
        assert s.act_bits == 32


def test_linear_leading_dims_and_conv_transpose():
    s = profile(nn.Linear(4, 3), torch.randn(2, 5, 4))
    assert s.layers[0].name == "" and s.macs == 5 * 3 * 4  # 5 tokens per sample
    assert s.max_act_elems == 5 * 4
    # transposed conv 2->3, k=2, stride 2 on 2x4x4: each of the 32 input elements feeds 3*2*2
    # outputs = 384 MACs (= 192 output elements * 2 input channels * 1 kernel tap each)
    s = profile(nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False), torch.randn(1, 2, 4, 4))
    assert s.macs == 384 and s.layers[0].out_elems == 3 * 8 * 8


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_layer_called_twice_adds_macs():
    s = profile(Twice(), torch.randn(3, 4))
    assert s.params == 20 and s.macs == 2 * 16 and s.bitops == 32 * 1024


def test_uniform_model_matches_mem_002():
    # all parameters are conv/linear weights (no bias, no BN): N_p = 8*3*9 + 8*8*9 + 10*8 = 872
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10, bias=False),
    )
    x = torch.randn(1, 3, 16, 16)
    for b in (2, 3, 4, 8):
        bits = {n: LayerBits(b, b, n_scales=1) for n in ("0", "2", "5")}
        s = profile(net, x, bits)
        assert s.params == 216 + 576 + 80 == 872
        assert s.max_act_elems == 8 * 16 * 16 == 2048
        assert s.mem_bits == mem_002(872, 2048, b) == 872 * b + 2048 * max(b, 4)


# ---------------------------------------------------------------------------------------------
# seed 002's numbers
# ---------------------------------------------------------------------------------------------
def test_mem_002_seed_table():
    mb = lambda bits: bits / 8 / 1e6  # noqa: E731  (MB = 1e6 bytes)
    # parameters: ResNet-20, N_p = 0.27M
    assert mb(mem_002(270_000, 0, 32)) == pytest.approx(1.08)  # 270000*32/8 = 1,080,000 bytes
    assert round(mb(mem_002(270_000, 0, 3)), 2) == 0.10  # 270000*3/8 = 101,250 bytes
    # largest activation 16*32*32 = 16384 elements
    assert mb(mem_002(0, 16384, 32)) == pytest.approx(0.065536)  # table: 0.07
    # 3 bits -> activations at max(3, 4) = 4 bits: 16384*4/8 = 8192 bytes = 0.008 MB.
    # Seed 002's table prints 0.006 for W3A3 (16384*3/8 = 6144 bytes), i.e. it used 3 bits; its
    # formula says max(b_p, 4), and the formula is the spec.
    assert mb(mem_002(0, 16384, 3)) == pytest.approx(0.008192)
    # totals: W32A32 1.08 + 0.0655 = 1.15 (table: 1.15)
    assert round(mb(mem_002(270_000, 16384, 32)), 2) == 1.15
    assert mem_002(10, 5, 8) == 10 * 8 + 5 * 8
    for bad in (0, 33, None):
        with pytest.raises(ConfigError):
            mem_002(10, 5, bad)


def resnet20_shaped() -> nn.Sequential:
    """ResNet-20's conv/BN/FC shapes as a plain chain (no shortcuts), CIFAR-10 input."""
    layers: list[nn.Module] = []
    c_in = 3
    plan = [(16, 1)] + [(16, 1)] * 6 + [(32, 2)] + [(32, 1)] * 5 + [(64, 2)] + [(64, 1)] * 5
    for c, stride in plan:
        layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_resnet20_shaped_training_table():
    net = resnet20_shaped()
    x = torch.randn(1, 3, 32, 32)
    s = profile(net, x)
    # convs: 3*16*9 + 6*16*16*9 + 16*32*9 + 5*32*32*9 + 32*64*9 + 5*64*64*9 = 267,696
    # BN 2*(16*7 + 32*6 + 64*6) = 1,376; FC 64*10 + 10 = 650
    assert s.params == 267_696 + 1_376 + 650 == 269_722  # seed 002: 0.27M
    assert s.max_act_elems == 16 * 32 * 32
    t = training_memory(net, x, stored="layer_inputs")
    assert round(t["latent_params_mb"], 2) == 1.08 and round(t["optimizer_mb"], 2) == 1.08
    # conv/linear inputs: 3072 + 6*16384 + (16384 + 5*8192) + (8192 + 5*4096) + 64 = 187,456
    assert t["activation_bits_per_sample"] == 187_456 * 32
    assert t["activations_mb"] == pytest.approx(0.749824)  # seed 002: 0.77 x B (same order)
    # 269722*32/8e6 + 16384*32/8e6 = 1.0789 + 0.0655 = 1.144 (seed 002: 1.08 + 0.07 = 1.15)
    assert t["inference_total_mb"] == pytest.approx(1.144424)
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    t3 = training_memory(net, x, {n: LayerBits(3, 3) for n in names}, stored="layer_inputs")
    assert t3["activation_bits_per_sample"] == 187_456 * 3
    assert round(t3["activations_mb"], 2) == 0.07  # seed 002: 0.07 x B
    assert t3["latent_params_mb"] == t["latent_params_mb"]  # latent params stay 32 bit


# ---------------------------------------------------------------------------------------------
# parameter counting rule
# ---------------------------------------------------------------------------------------------
class ScaleParam(nn.Module):
    """A trivial parametrization holding its own learned parameter (like a quantizer step)."""

    def __init__(self):
        super().__init__()
        self.step = nn.Parameter(torch.ones(()))

    def forward(self, w):
        return w * self.step


class DropLastColumn(nn.Module):
    """Stored tensor (3, 6) -> used weight (3, 5): the model's weight shape differs from original."""

    def forward(self, w):
        return w[:, :5]


def test_parametrized_weight_counted_by_used_shape():
    lin = nn.Linear(5, 3)
    parametrize.register_parametrization(lin, "weight", ScaleParam())
    model = nn.Sequential(lin, nn.ReLU())
    assert sum(p.numel() for p in model.parameters()) == 15 + 3 + 1  # original + bias + step
    s = profile(model, torch.randn(2, 5), {"0": LayerBits(4, 8, n_scales=1)})
    assert s.params == count_params(model) == 15 + 3  # the step is quantizer state, not N_p
    assert s.layers[0].weight_shape == (3, 5)
    assert s.size_bits == 15 * 4 + 3 * 32 + 1 * 32
    assert s.macs == 15

    lin2 = nn.Linear(6, 3, bias=False)
    parametrize.register_parametrization(lin2, "weight", DropLastColumn(), unsafe=True)
    assert lin2.parametrizations.weight.original.shape == (3, 6)
    s2 = profile(lin2, torch.randn(1, 5))
    assert s2.params == 15 and s2.layers[0].weight_shape == (3, 5) and s2.macs == 15


class StepQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.step = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        return torch.round(x / self.step) * self.step


class MarkedQuant(nn.Module):
    is_quantizer = True

    def __init__(self):
        super().__init__()
        self.clip = nn.Parameter(torch.tensor(6.0))

    def forward(self, x):
        return torch.minimum(x.clamp(min=0), self.clip)


class QConv(nn.Conv2d):
    def __init__(self):
        super().__init__(2, 2, 1, bias=False)
        self.alpha = nn.Parameter(torch.ones(2))  # registered on the conv: quantizer state
        self.wq = StepQuantizer()

    def forward(self, x):
        return self._conv_forward(x, self.wq(self.weight), None)


def test_quantizer_modules_not_counted():
    model = nn.Sequential(MarkedQuant(), QConv(), nn.BatchNorm2d(2))
    # parameters(): clip 1 + weight 4 + alpha 2 + step 1 + BN 4 = 12; N_p: weight 4 + BN 4 = 8
    assert sum(p.numel() for p in model.parameters()) == 12
    s = profile(model, torch.randn(1, 2, 3, 3))
    assert s.params == 8
    assert [lc.name for lc in s.layers] == ["1"] and s.layers[0].macs == 2 * 3 * 3 * 2
    # the quantizer's output is not an activation of its own, but the input (18) is counted
    assert s.max_act_elems == 18


def test_shared_parameter_counted_once():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    s = profile(nn.Sequential(a, b), torch.randn(1, 4))
    assert s.params == 16 and s.size_bits == 16 * 32 and s.macs == 32


# ---------------------------------------------------------------------------------------------
# training memory
# ---------------------------------------------------------------------------------------------
def test_training_memory_scales_with_batch():
    net = tiny_net()
    t1 = training_memory(net, X, MID, batch_size=1, optimizer_slots=2)
    t8 = training_memory(net, X, MID, batch_size=8, optimizer_slots=2)
    # trainable numbers: N_p 103 + 2 scales = 105 -> latent 105*32 = 3360, Adam 2*3360 = 6720
    for t in (t1, t8):
        assert t["latent_params_bits"] == 3360 and t["optimizer_bits"] == 6720
    # stored per sample: input 64 @32 (conv0 is FP), conv0 out 256 @32, BN out 256 @32,
    # ReLU out 256 @2 (consumed by the w2/a2 conv), depthwise out 256 @32, pool out 4 @32 (the
    # Flatten view of it is the same memory, consumed by the FP linear), linear out 3 @32
    per_sample = 64 * 32 + 256 * 32 + 256 * 32 + 256 * 2 + 256 * 32 + 4 * 32 + 3 * 32
    assert per_sample == 27360
    assert t1["activations_bits"] == 27360 and t8["activations_bits"] == 8 * 27360
    assert t8["total_bits"] == 3360 + 6720 + 8 * 27360
    assert t8["total_mb"] == pytest.approx(t8["total_bits"] / 8 / 1e6)
    assert t1["activations_mb"] == pytest.approx(27360 / 8e6)
    # inference part = profile's Mem, independent of the batch
    assert t1["inference_total_bits"] == t8["inference_total_bits"] == 3240
    assert t1["inference_params_bits"] == 2216 and t1["inference_activation_bits"] == 1024


def test_training_memory_inplace_and_layer_inputs():
    # ReLU(inplace=True) overwrites the BN output: one tensor of 256, stored at 2 bits
    t = training_memory(tiny_net(inplace=True), X, MID)
    assert t["activation_bits_per_sample"] == 32 * (64 + 256 + 256 + 4 + 3) + 256 * 2 == 19168
    assert t["optimizer_bits"] == 3360  # default optimizer_slots=1 (SGD momentum)
    # only conv/linear inputs: input 64 @32, ReLU out 256 @2, flattened pool 4 @32
    t = training_memory(tiny_net(), X, MID, stored="layer_inputs")
    assert t["activation_bits_per_sample"] == 64 * 32 + 256 * 2 + 4 * 32 == 2688
    for bad in ({"batch_size": 0}, {"optimizer_slots": -1}, {"stored": "some"}):
        with pytest.raises(ConfigError):
            training_memory(tiny_net(), X, **bad)


# ---------------------------------------------------------------------------------------------
# hooks, modes, errors, output
# ---------------------------------------------------------------------------------------------
def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_profile_restores_modes_and_removes_hooks():
    net = tiny_net()
    net.train()
    net[1].eval()  # a frozen BN inside a training model keeps its own flag
    bn_mean = net[1].running_mean.clone()
    profile(net, X, MID)
    assert net.training and not net[1].training and net[0].training
    assert _no_hooks(net)
    assert torch.equal(net[1].running_mean, bn_mean)  # ran in eval: BN statistics untouched
    net.eval()
    profile(net, X)
    assert not any(m.training for m in net.modules())


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_profile_cleans_up_when_forward_raises():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), Boom())
    net.train()
    with pytest.raises(RuntimeError, match="boom"):
        profile(net, torch.randn(1, 1, 5, 5))
    assert _no_hooks(net)
    assert all(m.training for m in net.modules())


def test_config_errors():
    net = tiny_net()
    with pytest.raises(ConfigError, match="nope"):
        profile(net, X, {"nope": LayerBits(2, 2), "0": LayerBits(2, 2)})
    with pytest.raises(ConfigError, match="not Conv/Linear"):
        profile(net, X, {"1": LayerBits(2, 2)})  # the BatchNorm
    with pytest.raises(ConfigError):
        profile(net, X, {"0": (2, 2)})  # not a LayerBits
    for w, a in ((0, 2), (33, 2), (2, 0), (2, 33), (True, 2), (2.0, 2)):
        with pytest.raises(ConfigError):
            LayerBits(w, a)
    with pytest.raises(ConfigError):
        LayerBits(2, 2, n_scales=-1)
    assert LayerBits(1, 32).w_bits == 1 and LayerBits(None, None).a_bits == 32


def test_table_and_to_dict():
    s = profile(tiny_net(), X, MID)
    text = s.table()
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["layer", "kind"]
    assert "4x1x3x3" in text and "2,380,800" in text and "103" in text
    # aligned: header, rules and rows have the same width up to the last column
    assert len({len(lines[i]) for i in (1, 5)}) == 1
    d = s.to_dict()
    assert d["params"] == 103 and d["layers"][1]["weight_shape"] == [4, 1, 3, 3]
    assert d["compression"] == pytest.approx(3296 / 2280) and d["size_bytes"] == 285.0
    import json

    json.dumps(d)


def test_largest_activation_counts_a_layer_input_made_by_a_functional_op():
    """Session 25 (a user's own model): N_a counted module outputs and the model input only, so a torch.cat of two
    branches feeding a conv (1,024 elements here) was missed and N_a read 512: seed 002's memory, the budget widths
    and NCE's mem target were too low."""
    import torch
    from torch import nn

    from lowbit.cost import profile

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
            self.mix = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.mix(torch.cat([self.a(x), self.b(x)], 1))

    assert profile(Cat(), torch.zeros(1, 1, 16, 16), {}).max_act_elems == 4 * 16 * 16


def test_training_memory_of_a_quantized_model_counts_a_layer_input_once_at_its_bits():
    """Session 26: the cost hooks ran after the input quantizer's pre-hook and saw its fake-quantized copy, so on a
    model quantized by lowbit.quantize a ReLU output read by two 3-bit convs was stored at 32 bits plus one 3-bit
    copy per conv (ResNet-20 W3A3: 2.45 MB/sample "all", more than FP32's 2.37; "layer_inputs" 0.09 for 0.08)."""
    import lowbit
    from lowbit.quantize import layer_bits

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.relu = nn.ReLU()
            self.conv_a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.conv_b = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            h = self.relu(self.conv0(x))
            return self.conv_a(h) + self.conv_b(h)

    torch.manual_seed(0)
    m = Branch()
    lowbit.quantize(m, {"weight": {"name": "sawb", "bits": 3}, "act": {"name": "pact", "bits": 3},
                        "keep_first": True, "keep_last": False})
    m.train()
    m(torch.rand(4, 1, 8, 8))
    lb = layer_bits(m)
    assert set(lb) == {"conv_a", "conv_b"}
    x = torch.rand(1, 1, 8, 8)
    # layer inputs: x 64 @32 (conv0 kept FP), the ReLU output 256 @3 once (both convs read it)
    assert training_memory(m, x, lb, stored="layer_inputs")["activation_bits_per_sample"] == 64 * 32 + 256 * 3
    # all: x, conv0 out, conv_a out, conv_b out @32, the ReLU output @3
    assert training_memory(m, x, lb)["activation_bits_per_sample"] == 32 * (64 + 3 * 256) + 256 * 3


class PeftLoRALinear(nn.Linear):
    """peft's layout: the adapters live in ModuleDicts ('default'), the forward adds the low-rank branch."""

    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(i, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, o, bias=False)})
        self.lora_dropout = nn.ModuleDict({"default": nn.Identity()})

    def forward(self, x):
        a = self.lora_A["default"](self.lora_dropout["default"](x))
        return super().forward(x) + self.lora_B["default"](a)


def test_lora_adapters_in_a_moduledict_are_counted():
    """The inner Linears of a LoRA-style subclass were counted only as the layer's direct children: peft's
    ModuleDicts hid them (params 294 of 402, MACs 288 of 396), and the quantized model's profile(m, x,
    layer_bits(m)) failed with 'bits names modules that are not Conv/Linear layers'."""
    import lowbit
    from lowbit.quantize import layer_bits

    x = torch.randn(2, 3, 4, 4)
    m = nn.Sequential(nn.Flatten(), PeftLoRALinear(48, 6))
    s = profile(m, x)
    # weight 48*6 + bias 6 + A 48*2 + B 2*6 = 402; MACs 288 + 96 + 12 = 396
    assert s.params == 402 and count_params(m) == 402 and s.size_bits == 402 * 32
    assert s.macs == 396
    assert {lc.name: lc.macs for lc in s.layers} == {"1": 288, "1.lora_A.default": 96, "1.lora_B.default": 12}
    q = lowbit.quantize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), PeftLoRALinear(48, 6), nn.Linear(6, 2)),
                        {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    bits = layer_bits(q)
    assert sorted(bits) == ["2", "2.lora_A.default", "2.lora_B.default"]
    sq = profile(q, x, bits)
    # conv 3*16*3 = 144 (FP) + 288 + 96 + 12 at W2A2 + fc 12 (FP)
    assert sq.macs == 552 and sq.bitops == (144 + 12) * 32 * 32 + (288 + 96 + 12) * 2 * 2


def test_largest_activation_counts_a_cat_read_by_a_pool():
    """N_a counted a Conv/Linear's input made by torch.cat (session 25) but not the same tensor read by a
    MaxPool2d: 256 (the conv's output) for the 512-element cat, so seed 002's memory was low."""

    class CatPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.pool, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            a = self.c1(x)  # 4x8x8 = 256
            return self.c2(self.pool(torch.cat([a, a.flip(3)], 1)))  # cat 8x8x8 = 512 -> pool 8x4x4 = 128

    s = profile(CatPool(), torch.randn(2, 1, 8, 8))
    assert s.max_act_elems == 512
    assert s.params == 4 * 9 + 4 + 8 * 2 + 2 and s.mem_bits == 58 * 32 + 512 * 32
