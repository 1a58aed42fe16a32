"""lowbit.export: packing, BN folding, quantizer rules, NumPy integer reference, ONNX, C, run export."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import create_model, quantize
from lowbit.config import Config
from lowbit.errors import ConfigError
from lowbit.export import (
    IntegerReference,
    compile_c,
    export_run,
    fold_bn,
    format_report,
    load_package,
    lower,
    pack_codes,
    packed_size_table,
    run_c,
    save_package,
    to_onnx,
    unpack_codes,
    write_c,
)
from lowbit.export.fold import bn_affine
from lowbit.export.levels import act_quant, integer_form
from lowbit.export.numpy_ref import prepare
from lowbit.quant import build_quantizer
from lowbit.quantize import weight_param
from lowbit.train import run

W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small ops: one thread (conftest.py)


def quantized_resnet(plan: dict, width: float = 0.25, seed: int = 0) -> nn.Module:
    """A randomly initialised quantized ResNet-8 whose BN statistics, activation ranges and LSQ
    steps were set by three training-mode forward passes (no optimizer step)."""
    torch.manual_seed(seed)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=width)
    quantize(m, plan)
    m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 28, 28, generator=g))
    return m.eval()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def torch_logits(m: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return m(x).numpy()


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------
def test_pack_hand_cases():
    # LSB first: code j occupies stream bits j*b .. j*b+b-1; stream bit t is bit t%8 of byte t//8
    assert pack_codes([3, 1, 2, 0], 2).tolist() == [0b00100111]
    assert pack_codes([1, 0, 1, 1, 0, 0, 0, 0, 1], 1).tolist() == [0b00001101, 0b1]
    # 3 bits straddle bytes: 5=101, 6=110, 7=111 -> bits 1,0,1, 0,1,1, 1,1 | 1
    assert pack_codes([5, 6, 7], 3).tolist() == [0b11110101, 0b00000001]
    assert unpack_codes([0b11110101, 0b1], 3, 3).tolist() == [5, 6, 7]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 1001])
def test_pack_roundtrip_every_bitwidth_and_odd_sizes(bits, n):
    codes = np.random.default_rng(bits * 1000 + n).integers(0, 2**bits, n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)  # ceil: the physical limit
    assert np.array_equal(unpack_codes(packed, bits, n), codes)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ConfigError, match="0..3"):
        pack_codes([0, 4], 2)
    with pytest.raises(ConfigError, match="bits 1..8"):
        pack_codes([0], 9)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------
def test_bn_affine_hand_case():
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    bn.weight.data.fill_(2.0)
    bn.bias.data.fill_(1.0)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(4.0)
    g, h = bn_affine(bn)  # g = 2/sqrt(4) = 1, h = 1 - 1*3 = -2
    assert g.tolist() == [1.0] and h.tolist() == [-2.0]


def test_fold_bn_preserves_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(5)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3)
    bn.eval()
    x = torch.randn(4, 3, 8, 8)
    w, b = fold_bn(conv.weight.detach().numpy(), conv.bias.detach().numpy(), bn)
    with torch.no_grad():
        want = bn(conv(x))
        got = nn.functional.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conv(x), want, atol=1e-2)  # the BN did change the output


def test_bn_folded_into_fp_layers_and_kept_after_quantized_ones():
    m = quantized_resnet(W2A2)
    ops = {op.name: op for op in lower(m, inputs(2)).ops}
    assert ops["conv1"].bn == "folded" and isinstance(ops["conv1"].weight, np.ndarray)
    q = ops["layers.0.0.conv1"]
    assert q.bn == "affine" and q.quantized
    bn = m.layers[0][0].bn1
    g = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert np.allclose(q.scale, g.numpy(), rtol=1e-6)
    # codes index the quantizer's levels: decoding them gives the quantized weight exactly
    assert np.array_equal(q.weight.dequantize(), m.layers[0][0].conv1.weight.detach().numpy())


# ---------------------------------------------------------------------------------------------
# quantizer rules
# ---------------------------------------------------------------------------------------------
def test_integer_form_hand_cases():
    m, s, off = integer_form(np.array([-0.3, -0.1, 0.1, 0.3]))  # symmetric 2-bit grid: odd integers
    assert m.tolist() == [[-3, -1, 1, 3]] and np.allclose(s, 0.1) and off.tolist() == [0.0]
    m, s, off = integer_form(np.array([-1.0, -0.5, 0.5, 1.0]))  # power-of-two: shifts
    assert m.tolist() == [[-2, -1, 1, 2]] and s.tolist() == [0.5]
    m, s, off = integer_form(np.array([-0.25, 0.15, 0.55, 0.95]))  # grid with 0 off the lattice
    assert m.tolist() == [[0, 1, 2, 3]] and np.allclose(s, 0.4) and np.allclose(off, -0.25)
    assert integer_form(np.array([-1.0, 0.3, 1.0])) is None  # no common base: float MACs


def test_level_sets_are_stored_compactly_and_exactly():
    from lowbit.export.levels import describe_levels
    from lowbit.quant.uniform import grid_levels

    sawb = grid_levels(-0.3, 0.6 / 3, 4).numpy()  # as SAWB computes its levels
    lsq = (torch.arange(-128, 128, dtype=torch.float32) * torch.tensor(0.0123)).numpy()  # LSQ 8 bit: k*s
    odd = np.array([-1.0, 0.3, 1.0], dtype=np.float32)
    for levels, kind, floats in ((sawb, "grid", 2), (lsq, "lattice", 2), (odd, "table", 3)):
        spec = describe_levels(levels)
        assert (spec.kind, spec.n_floats) == (kind, floats)
        assert np.array_equal(spec.levels32()[0], levels)  # bit for bit


def test_pact_codes_hand_case():
    q = build_quantizer("pact", 2, role="act", init=3.0).eval()
    x = torch.tensor([-1.0, 0.4, 0.5, 1.5, 2.5, 7.0])
    with torch.no_grad():
        q(x)
    a = act_quant(q, "t")  # step = 3/3 = 1; round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert a.codes(x.numpy()).tolist() == [0, 0, 0, 2, 2, 3]


@pytest.mark.parametrize("name,options", [("pact", {}), ("lsq", {}), ("lsq", {"signed": True}), ("uniform", {}),
                                          ("minmax", {}), ("dorefa", {})])
@pytest.mark.parametrize("bits", [2, 3])
def test_activation_rules_reproduce_the_quantizer_bit_for_bit(name, options, bits):
    torch.manual_seed(bits)
    q = build_quantizer(name, bits, role="act", **options)
    q.train()
    q(torch.randn(512) * 2)  # running range / LSQ step initialisation
    q.eval()
    q(torch.zeros(1))
    a = act_quant(q, "t")
    lv = q.levels().numpy()
    mids = (lv[1:] + lv[:-1]) / 2  # exact rounding ties
    x = np.concatenate([np.random.default_rng(0).normal(0, 2, 4000), mids, lv, [lv[0] - 5, lv[-1] + 5]])
    x = torch.tensor(x, dtype=torch.float32)
    with torch.no_grad():
        want = q(x).numpy()
    got = a.values(a.codes(x.numpy()))
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# NumPy integer reference
# ---------------------------------------------------------------------------------------------
PLANS = {
    "sawb2+pact2": (W2A2, "int"),
    "lsq3/ch+lsq3": ({"weight": {"name": "lsq", "bits": 3, "per_channel": True}, "act": {"name": "lsq", "bits": 3}},
                     "int"),
    "bwn (fp acts)": ({"weight": {"name": "bwn", "bits": 1}}, "float"),
    "twn/ch+uniform4": ({"weight": {"name": "twn", "bits": 2, "per_channel": True},
                         "act": {"name": "uniform", "bits": 4}}, "int"),
    "po2-4+dorefa8": ({"weight": {"name": "po2", "bits": 4}, "act": {"name": "dorefa", "bits": 8}}, "int"),
    "valueset+minmax3": ({"weight": {"name": "valueset", "values": [-1, 0.3, 1], "scale": "max"},
                          "act": {"name": "minmax", "bits": 3}}, "float"),
    "sgt po2-2bit+pact2 (levels from the weight)": ({"weight": {"name": "valueset", "values": "po2-2bit"},
                                                     "act": {"name": "pact", "bits": 2}, "method": {"name": "sgt"}},
                                                    "int"),
    "minmax3/ch+minmax5, first layer quantized": (
        {"weight": {"name": "minmax", "bits": 3, "per_channel": True}, "act": {"name": "minmax", "bits": 5},
         "keep_first": False}, "int"),
}


@pytest.mark.parametrize("label", list(PLANS))
def test_numpy_reference_predicts_what_pytorch_predicts(label, tmp_path):
    plan, mode = PLANS[label]
    m = quantized_resnet(plan)
    x = inputs(64)
    graph = lower(m, x[:2])
    save_package(graph, tmp_path)
    pkg = load_package(tmp_path / "model.json")
    for a, b in zip(graph.conv_ops(), pkg.conv_ops()):  # the file holds exactly the codes
        if a.quantized:
            assert np.array_equal(a.weight.codes, b.weight.codes)
    ref = IntegerReference(pkg)
    modes = ref.modes()
    quantized = [op.name for op in pkg.conv_ops() if op.quantized]
    assert quantized and all(modes[n] == mode for n in quantized)
    want, got = torch_logits(m, x), ref.run(x.numpy())
    assert np.array_equal(got.argmax(1), want.argmax(1))
    # float32 rounding (integer sums vs PyTorch's float sums) can move an activation across a
    # rounding boundary of a later quantizer, one code step: rare, small, never the class here
    d = np.abs(got - want)
    assert np.median(d) < 1e-5 and d.max() < 2e-3


def test_offset_terms_are_exercised_by_grids_without_zero():
    # a min-max weight grid keeps an offset (K term); min-max on the signed network input has
    # code 0 != 0.0 (M and n terms): every term of the integer rescale is in use
    m = quantized_resnet(PLANS["minmax3/ch+minmax5, first layer quantized"][0])
    k = {kk.op.name: kk for kk in prepare(lower(m, inputs(2))) if hasattr(kk, "mode")}["conv1"]
    assert k.mode == "int" and all(getattr(k, c) is not None for c in ("ca", "cb", "cc", "cd"))


def test_packed_file_is_at_the_physical_limit(tmp_path):
    for plan in (W2A2, {"weight": {"name": "bwn", "bits": 1}}):
        m = quantized_resnet(plan, width=1.0)
        sz = save_package(lower(m, inputs(2)), tmp_path / plan["weight"]["name"])
        ideal_bits = sum(mod.weight.numel() * weight_param(mod).bits
                         for mod in m.modules() if weight_param(mod) is not None)
        assert sz.ideal_bits == ideal_bits
        assert sz.file_bytes <= 1.02 * ideal_bits / 8 + sz.float_bytes
        fp32 = 4 * sum(p.numel() for n, p in m.named_parameters() if "alpha" not in n)
        assert sz.file_bytes * 10 < fp32


def test_packed_size_table_lists_layers_and_total():
    m = quantized_resnet(W2A2)
    text = packed_size_table(m)
    n = m.layers[2][0].conv2.weight.numel()
    row = next(line for line in text.splitlines() if line.startswith("layers.2.0.conv2"))
    assert "sawb2" in row and f"{n * 2 // 8:,}" in row.split()
    assert "total" in text and "smaller than FP32" in text


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["sawb2+pact2", "lsq3/ch+lsq3"])
def test_onnx_qdq_passes_checker_and_matches_pytorch(label):
    import onnx
    import onnxruntime as ort

    m = quantized_resnet(PLANS[label][0])
    x = inputs(64)
    graph = lower(m, x[:2])
    model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 8 and "DequantizeLinear" in ops
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.INT4 in types  # 2/3-bit weight integers in int4 containers
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])
    got = sess.run(None, {graph.input: x.numpy()})[0]
    want = torch_logits(m, x)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4)
    fp32 = to_onnx(graph, qdq=False)
    onnx.checker.check_model(fp32, full_check=True)
    assert not any(n.op_type.endswith("QuantizeLinear") for n in fp32.graph.node)
    for mm in (model, fp32):  # what the input must be (no normalisation recorded for a bare model: it says so)
        props = {p.key: p.value for p in mm.metadata_props}
        assert props["input"].startswith(f"{graph.input}: float32 N x 1 x 28 x 28") and "no normalisation" in props["input"]
        assert props["lowbit_version"] and "input_mean" not in props


@pytest.mark.parametrize("label", ["valueset+minmax3", "sgt po2-2bit+pact2 (levels from the weight)", "bwn (fp acts)",
                                   "lsq3/ch+lsq3"])
def test_onnx_qdq_runs_as_exported_in_a_default_onnxruntime_session(label):
    """A user's InferenceSession keeps onnxruntime's WeightBiasQuantization pass on: before session 24 it
    re-quantized a value-set layer's float weights to int8 (16 of 1,000 predictions changed on a one-epoch model).
    The conv inputs of such layers now carry per-channel scales, so a default session equals lowbit's own."""
    import onnxruntime as ort

    m = quantized_resnet(PLANS[label][0])
    x = inputs(64).numpy()
    graph = lower(m, torch.from_numpy(x[:2]))
    model = to_onnx(graph)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        default = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ours = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["WeightBiasQuantization"])  # as lowbit's sessions run
        assert np.array_equal(default.run(None, {graph.input: x})[0], ours.run(None, {graph.input: x})[0])


# ---------------------------------------------------------------------------------------------
# C
# ---------------------------------------------------------------------------------------------
def lenet_w2a2() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("lenet5", in_channels=1, num_classes=10, image_size=28, width=0.5, batch_norm=True)
    quantize(m, W2A2)
    m.train()
    with torch.no_grad():
        m(inputs(16, seed=3))
    return m.eval()


@pytest.mark.parametrize("label", ["sawb2+pact2", "valueset+minmax3", "minmax3/ch+minmax5, first layer quantized",
                                   "lenet"])
def test_c_code_compiles_and_is_bit_exact_with_numpy(label, tmp_path):
    assert shutil.which("gcc"), "the C export test needs gcc"
    m = lenet_w2a2() if label == "lenet" else quantized_resnet(PLANS[label][0])
    x = inputs(4, seed=5).numpy()
    graph = lower(m, torch.from_numpy(x[:2]))
    want = IntegerReference(graph).run(x)
    ce = write_c(graph, tmp_path, samples=x[:2], expected=want[:2])
    exe = compile_c(tmp_path)
    got = run_c(exe, x, want.shape[1])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
    st = subprocess.run([str(exe)], capture_output=True, text=True, check=False)  # the embedded self-test
    assert st.returncode == 0 and "2/2 samples bit-exact" in st.stdout
    assert ce.flash_bytes > 0 and ce.ram_bytes >= 4 * max(x[0].size, 10)


class GroupedNet(nn.Module):
    """Depthwise (groups = channels, stride 2) and grouped (groups=3: 2 inputs, 3 outputs per group) convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False), nn.BatchNorm2d(6),
                                nn.ReLU())
        self.gc = nn.Sequential(nn.Conv2d(6, 9, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(9, 5, 1))
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(5, 3))

    def forward(self, x):
        return self.fc(self.gc(self.dw(self.stem(x))))


@pytest.mark.parametrize("plan", [None, W2A2], ids=["fp32", "sawb2+pact2"])
def test_grouped_convs_run_the_float_kernel_bit_exact_in_c_and_match_pytorch(plan, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    m = GroupedNet()
    if plan is not None:
        quantize(m, plan)
    m.train()
    with torch.no_grad():
        m(inputs(16, seed=3)[:, :, :9, :11])
    m.eval()
    x = inputs(4, seed=5)[:, :, :9, :11]  # odd sizes
    graph = lower(m, x[:2])
    kernels = [k for k in prepare(graph) if hasattr(k, "mode")]
    assert [k.G for k in kernels] == [1, 6, 3, 1, 1]
    assert all(k.mode == "float" for k in kernels if k.G > 1)
    want = IntegerReference(graph).run(x.numpy())
    ref = torch_logits(m, x)
    assert np.allclose(want, ref, atol=1e-5, rtol=1e-4)
    write_c(graph, tmp_path)
    got = run_c(compile_c(tmp_path), x.numpy(), want.shape[1])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
    sess = ort.InferenceSession(to_onnx(graph, qdq=plan is not None).SerializeToString(),
                                providers=["CPUExecutionProvider"], disabled_optimizers=["WeightBiasQuantization"])
    assert np.allclose(sess.run(None, {graph.input: x.numpy()})[0], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# run folders and errors
# ---------------------------------------------------------------------------------------------
def test_export_run_end_to_end(tmp_path, fmnist_small):
    cfg = Config.model_validate({
        "name": "tiny", "model": {"name": "resnet8", "width": 0.25},
        "data": {"name": "fashion-mnist", "limit": 1200, "val_fraction": 0.05}, "plan": W2A2,
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "seed": 0, "threads": 1}})
    run(cfg, tmp_path / "run", data=fmnist_small)
    rep = export_run(tmp_path / "run", limit=300, c_images=3, latency_batch=32, latency_repeats=2)
    assert rep["numpy"]["images"] == 300 and rep["numpy"]["mismatches"] == 0
    assert rep["onnx"]["checker"] == "ok" and rep["onnx"]["agreement"] == 1.0
    assert rep["c"]["bit_exact_images"] == 3 and rep["c"]["self_test_ok"]
    assert (tmp_path / "run" / "export" / "packed" / "model.safetensors").is_file()
    assert rep["packed"]["codes_bytes"] == sum(-(-r * 2 // 8) for r in (144, 144, 288, 576, 32, 1152, 2304, 128))
    text = format_report(rep)
    assert "3/3 images bit-exact" in text and "300/300 predictions agree" in text
    # which weights were exported: best.pt's epoch and checksum, in the report, the manifest and the ONNX file
    import onnx

    sha = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["sha256"]
    assert rep["epoch"] == 1 and rep["checkpoint_sha256"] == sha and "best.pt of epoch 1)" in text
    meta = load_package(tmp_path / "run" / "export" / "packed").meta
    assert meta["epoch"] == 1 and meta["checkpoint_sha256"] == sha
    onnx_files = sorted((tmp_path / "run" / "export").rglob("*.onnx"))
    assert onnx_files and all({p.key: p.value for p in onnx.load(f).metadata_props}["checkpoint_sha256"] == sha
                              for f in onnx_files)
    # no checkpoint / not a run folder / unknown format: one-line ConfigErrors naming the problem
    (tmp_path / "run" / "best.pt").unlink()
    with pytest.raises(ConfigError, match="no best.pt"):
        export_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="no config.yaml"):
        export_run(tmp_path)
    with pytest.raises(ConfigError, match="allowed: packed, onnx, c"):
        export_run(tmp_path / "run", formats=("tflite",))


def test_unsupported_layer_is_a_config_error_naming_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.act = nn.GELU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    m = quantize(Net(), W2A2)
    with pytest.raises(ConfigError, match=r"layer 'act' \(GELU\) is not supported"):
        lower(m, torch.randn(1, 1, 6, 6))


def test_a_conv_padded_same_or_valid_is_zero_padding():
    """padding="same" (odd kernel) and "valid" are zero padding, which the export supports: before session 28 both were
    refused as "Conv2d with dilation=(1, 1), padding='same', padding_mode=zeros is not supported; supported: Conv2d
    (any groups, dilation=1, zero padding)". An even kernel's "same" pads one side more: refused, saying so."""
    class Net(nn.Module):
        def __init__(self, k=3):
            super().__init__()
            self.c1, self.relu = nn.Conv2d(1, 4, 3, padding="valid"), nn.ReLU()
            self.c2, self.c3 = nn.Conv2d(4, 4, k, padding="same"), nn.Conv2d(4, 4, 1)
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

        def forward(self, x):
            x = self.relu(self.c3(self.relu(self.c2(self.relu(self.c1(x))))))
            return self.fc(self.pool(x).flatten(1))

    torch.manual_seed(0)
    m, x = quantize(Net(), W2A2), torch.randn(4, 1, 8, 8)
    m.train()
    m(x)
    m.eval()
    g = lower(m, x[:1])
    assert [op.attrs["padding"] for op in g.conv_ops()][:3] == [[0, 0], [1, 1], [0, 0]]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.array_equal(IntegerReference(g).run(x.numpy()).argmax(1), ref.argmax(1))
    assert np.abs(IntegerReference(g).run(x.numpy()) - ref).max() < 1e-5
    with pytest.raises(ConfigError, match=r"padding='same' on an even kernel \(padded on one side more"):
        lower(quantize(Net(k=2), W2A2), x[:1])


def test_weight_off_its_level_set_is_a_config_error():
    m = quantized_resnet(W2A2)
    layer = m.layers[0][0].conv1
    wp = weight_param(layer)
    quantizer = wp.quantizer

    class Relaxed(nn.Module):  # a relaxed weight (BinaryRelax-like mixture) not on the levels
        def __init__(self):
            super().__init__()
            self.quantizer = quantizer

        def forward(self, w):
            return 0.5 * (self.quantizer(w) + w)

    layer.parametrizations.weight[0] = Relaxed()
    with pytest.raises(ConfigError, match="layer 'layers.0.0.conv1': its weight is not on its quantizer's level set"):
        lower(m, inputs(2))


def test_compile_c_with_a_relative_folder(tmp_path, monkeypatch):
    """gcc runs inside the folder; a relative folder must still give the executable there."""
    from lowbit.export.c_export import compile_c

    d = tmp_path / "c"
    d.mkdir()
    (d / "model.c").write_text("int lb_answer(void) { return 42; }\n")
    (d / "main.c").write_text("int lb_answer(void);\nint main(void) { return lb_answer() == 42 ? 0 : 1; }\n")
    monkeypatch.chdir(tmp_path)
    exe = compile_c("c")
    assert exe.is_file() and exe.parent == d


def test_a_corrupt_package_is_one_line_naming_the_file(tmp_path):
    """Both packed formats (the float-activation package and the integer one): a truncated, empty or foreign file, a
    truncated manifest or a missing numbers file is a one-line ConfigError naming the file (before session 21:
    safetensors' and json's own errors, without the file), and one changed byte in the numbers fails the manifest's
    SHA-256 (before: it loaded and gave other logits), as does one in the manifest itself (since session 23)."""
    from lowbit.export.intgraph import load_int_package, save_int_package
    from lowbit.intmode import int_graph

    m = quantized_resnet({"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    save_package(lower(m, inputs(2)), tmp_path / "f")
    torch.manual_seed(0)
    mi = quantized_resnet({"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True})
    save_int_package(int_graph(mi, inputs(1)), tmp_path / "i")
    load_package(tmp_path / "f"), load_int_package(tmp_path / "i")  # as written: they load
    for kind, load in (("f", load_package), ("i", load_int_package)):
        st = tmp_path / kind / "model.safetensors"
        good = st.read_bytes()
        path = tmp_path / kind / ("model.json" if kind == "f" else "model.safetensors")
        for what, blob in (("truncated", good[: len(good) // 2]), ("empty", b""), ("foreign", b"not a package" * 9)):
            st.write_bytes(blob)
            with pytest.raises(ConfigError, match=rf"^{st}: cannot read the package, the file is truncated or corrupt \("):
                load(path)
        flipped = bytearray(good)
        flipped[-5] ^= 0x10  # a byte of the numbers (codes or floats): the file still parses
        st.write_bytes(bytes(flipped))
        with pytest.raises(ConfigError, match=rf"^{st}: the numbers do not match the manifest's checksums \(\w+\)"):
            load(path)
        st.write_bytes(good)
        # one digit of the manifest (a stride, a bias offset: before session 23 it loaded and gave other logits)
        mpath = path if kind == "f" else st
        raw = mpath.read_bytes()
        at = raw.index(b"stride")
        at = next(i for i in range(at, len(raw)) if raw[i:i + 1].isdigit())  # the first digit of the first stride
        mpath.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])
        with pytest.raises(ConfigError, match=rf"^{mpath}: the manifest does not match its checksum"):
            load(path)
        mpath.write_bytes(raw)
    mf = tmp_path / "f" / "model.json"
    mf.write_text(mf.read_text()[:100])
    with pytest.raises(ConfigError, match=rf"^{mf}: cannot read the package, the file is truncated or corrupt"):
        load_package(mf)
    (tmp_path / "i" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no integer package at"):
        load_int_package(tmp_path / "i")


def test_an_inconsistent_package_is_one_line_naming_the_layer(tmp_path):
    """Session 25 (an FPGA engineer writing packages with a reader of their own): a manifest that does not fit its
    numbers, written with valid checksums, was read as it came. A codes run longer than its bits need (bits edited
    2 -> 1) loaded silently and gave other logits; a code past the layer's levels failed later with an IndexError;
    an edited model.json beside an integer package loaded without a word (the .safetensors' copy is what runs)."""
    import json

    from safetensors.numpy import load_file, save_file

    from lowbit.export.intgraph import load_int_package, save_int_package
    from lowbit.export.package import sealed
    from lowbit.intmode import int_graph

    m = quantized_resnet({"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    save_package(lower(m, inputs(2)), tmp_path / "f")
    mf = tmp_path / "f" / "model.json"
    good = json.loads(mf.read_text())
    first = next(d for d in good["ops"] if "weight" in d)

    def write(edit):
        man = json.loads(json.dumps(good))
        edit(next(d for d in man["ops"] if d["name"] == first["name"])["weight"])
        mf.write_text(json.dumps(sealed({k: v for k, v in man.items() if k != "manifest_sha256"})))

    write(lambda w: w.update(bits=1))
    with pytest.raises(ConfigError, match=rf"^{mf}: layer {first['name']}: \d+ bytes of codes where \d+ codes at 1 bits "
                                          r"take \d+: the package is inconsistent$"):
        load_package(mf)
    write(lambda w: w["levels"].update(n=3))  # SAWB's 4 levels said to be 3: the codes 3 name no level
    with pytest.raises(ConfigError, match=rf"^{mf}: layer {first['name']}: code 3 where the layer has 3 levels"):
        load_package(mf)

    torch.manual_seed(0)
    mi = quantized_resnet({"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True})
    save_int_package(int_graph(mi, inputs(1)), tmp_path / "i")
    st, js = tmp_path / "i" / "model.safetensors", tmp_path / "i" / "model.json"
    man = json.loads(js.read_text())
    js.write_text(js.read_text().replace('"stride": [\n     1,', '"stride": [\n     2,', 1))
    with pytest.raises(ConfigError, match=rf"^{js} differs from the manifest inside model.safetensors, which is what "
                                          "runs"):
        load_int_package(tmp_path / "i")
    js.unlink()  # the .safetensors alone is a whole package
    load_int_package(st)
    w = next(d for d in man["ops"] if "weight" in d)
    w["weight"]["bits"] = 1  # the 8-bit first conv
    man = sealed({k: v for k, v in man.items() if k != "manifest_sha256"})
    save_file(load_file(str(st)), str(st), metadata={"manifest": json.dumps(man)})
    with pytest.raises(ConfigError, match=rf"^{st}: layer {w['name']}: \d+ bytes of codes where"):
        load_int_package(st)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_a_module_called_twice_exports_to_c(tmp_path):
    """Session 24: a conv the forward calls three times (shared weights) gave C that did not compile ('redefinition
    of blk_codes'): one op per call, now each named apart (blk, blk.call2, blk.call3)."""
    from lowbit.export import export_model

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.blk = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

        def forward(self, x):
            h = self.relu(self.stem(x))
            for _ in range(3):
                h = self.relu(self.blk(h))
            return self.fc(torch.flatten(self.pool(h), 1))

    torch.manual_seed(0)
    m = quantize(Shared(), W2A2)
    m.train()
    with torch.no_grad():
        m(inputs(16, seed=3))
    m.eval()
    m.train()  # and the export hands the model back in the mode it was given
    r = export_model(m, inputs(16), tmp_path, formats=("packed", "c"), c_images=4)
    assert not r.get("failed_checks") and r["c"]["bit_exact_images"] == 4 and m.training
    with pytest.raises(ConfigError, match="plan must be a Plan, a dict or a YAML path, got list"):
        quantize(Shared(), [1, 2])
    names = [op.name for op in lower(m, inputs(2)).conv_ops()]
    assert names == ["stem", "blk", "blk.call2", "blk.call3", "fc"]


def test_export_without_latency_measurement(tmp_path):
    """``latency_repeats=0`` (``lowbit export --latency-repeats 0``) checks the ONNX model without timing it, as the
    integer export does (the measurement was most of an export's time; before, the float export failed on it
    with statistics.StatisticsError "no median for empty data")."""
    from lowbit.export import export_model

    m = quantized_resnet(W2A2)
    r = export_model(m, inputs(16), tmp_path, formats=("onnx",), latency_repeats=0)
    assert r["onnx"]["mismatches"] == 0 and "latency_ms" not in r["onnx"]
    assert "ONNX QDQ" in format_report(r) and "onnxruntime" not in format_report(r)


def test_po2_5bit_weights_export_to_onnx_and_c(tmp_path):
    """po2 at 5 bits (no zero) has the integer form ±2^15, one past int16: before session 26 its ONNX export was a
    raw ValueError and its C export refused ('does not fit int16'), though 4 and 6 bits exported. Such a row now
    takes the float kernel, as po2 6-8 bits do."""
    from lowbit.export import export_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    quantize(m, {"weight": {"name": "po2", "bits": 5}, "act": {"name": "pact", "bits": 4}})
    m.eval()
    formats = ("packed", "onnx", "c") if shutil.which("gcc") or shutil.which("cc") else ("packed", "onnx")
    rep = export_model(m, torch.randn(4, 1, 6, 6), tmp_path, formats=formats, latency_batch=2, latency_repeats=1)
    assert rep["failed_checks"] == [] and rep["onnx"]["mismatches"] == 0


@pytest.mark.parametrize("act", [{"name": "lsq", "bits": 4}, {"name": "lsq", "bits": 3, "signed": True},
                                 {"name": "sat", "bits": 4, "calibrated": True}])
def test_onnx_qdq_mul_clip_input_codes_at_half_steps(act):
    """The mul_clip rule is rint(x·f32(1/s)); QuantizeLinear divides by s, which gave another code at inputs within
    a rounding of a half step (before session 26 the float QDQ graph used it; the integer ONNX did not)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64, bias=False))
    quantize(m, {"weight": {"name": "sawb", "bits": 8}, "act": act, "keep_first": False, "keep_last": False})
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(5):  # a trained step
        loss = m(torch.randn(32, 64) * 2).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    g = lower(m, torch.randn(2, 64))
    a = g.ops[0].act
    k = np.arange(a.qmin - 2, a.qmax + 2, dtype=np.float32)
    x = np.concatenate([(k + np.float32(0.5)) * np.float32(a.step), (k + np.float32(0.5)) / np.float32(a.inv)])
    x = np.concatenate([x, ((k + 0.5) * np.float64(a.step)).astype(np.float32)])
    for _ in range(3):  # and the float32 neighbours of each
        x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    x = np.resize(x, (len(x) // 64 + 1) * 64).reshape(-1, 64).astype(np.float32)
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {g.input: x})[0]
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_a_layer_whose_int32_accumulator_could_overflow_runs_the_float_kernel():
    """po2 5-bit weights with zero have integers up to 2^14; over 8-bit input codes and 576 taps the int32 bound is
    passed. Before session 26 that refused the whole export, though the float kernel runs such a layer (as it runs
    po2 at 6-8 bits)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 2))
    quantize(m, {"weight": {"name": "po2", "bits": 5, "zero": True}, "act": {"name": "pact", "bits": 8}})
    m.train()
    m(torch.randn(8, 1, 6, 6))
    m.eval()
    x = torch.randn(4, 1, 6, 6)
    ref = IntegerReference(lower(m, x[:2]))
    assert ref.modes()["2"] == "float"
    with torch.no_grad():
        want = m(x).numpy()
    assert np.allclose(ref.run(x.numpy()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_a_nan_input_is_refused_by_numpy_and_defined_in_c(tmp_path):
    """A NaN input's activation code: NumPy cast it to int32 (INT_MIN: logits of 1e8), the float C cast it too
    (undefined behaviour; code 0 on x86), onnxruntime's QuantizeLinear gives code 0."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    quantize(m, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "minmax", "bits": 4},
                 "keep_first": False, "keep_last": False})
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 4))
    m.eval()
    g = lower(m, torch.randn(2, 4))
    x = np.array([[np.nan, 0.5, -0.5, 1.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    with pytest.raises(ConfigError, match="NaN"):
        IntegerReference(g).run(x)
    write_c(g, tmp_path, samples=x[1:], expected=IntegerReference(g).run(x[1:]))
    got = run_c(compile_c(tmp_path), x, 3)
    want = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {g.input: x})[0]
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("integer", [False, True])
def test_export_under_autocast_exports_and_checks_the_float32_network(integer, tmp_path):
    """An export called under torch.autocast (a script whose evaluation runs in mixed precision) runs its PyTorch
    reference with autocast off: the exported network and its reference are float32, so the report is the one
    outside autocast. Before session 29 a float model's export failed with "TypeError: Got unsupported ScalarType
    BFloat16" (the reference's bfloat16 logits), and an integer model's references ran the integer network's convs
    in bfloat16: NumPy-vs-PyTorch mismatches, or a C self-test of 0/3 samples bit-exact, that were not there."""
    from lowbit.export import export_model

    m = quantized_resnet({**W2A2, "act": {"name": "pact", "bits": 4}, "integer": integer})
    x = inputs(16)
    reps = []
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            r = export_model(m, x, tmp_path / str(amp), formats=("packed",), latency_repeats=0)
        assert r["numpy"]["agreement"] == 1.0 and r["numpy"]["mismatches"] == 0 and r["failed_checks"] == []
        reps.append(r["numpy"]["max_logit_diff"])
    assert reps[1] == reps[0]


def test_a_c_build_that_cannot_write_its_binary_says_so_not_that_the_code_does_not_compile(tmp_path):
    """Session 29: on a full disk the linker could not write the binary, and `lowbit export` said 'the generated C code
    does not compile: collect2: error: ld returned 1 exit status', pointing at the exporter, not at the disk."""
    from lowbit.export.c_export import build_host

    def fake_cc(*stderr):
        cc = tmp_path / "cc"
        cc.write_text("#!/bin/sh\n" + "".join(f"echo '{ln}' >&2\n" for ln in stderr) + "exit 1\n")
        cc.chmod(0o755)
        return str(cc)

    with pytest.raises(ConfigError) as e:
        build_host(tmp_path, ["model.c"], cc=fake_cc("/usr/bin/ld: final link failed: No space left on device",
                                                     "collect2: error: ld returned 1 exit status"))
    assert str(e.value) == (f"export: the generated C code could not be built in {tmp_path.resolve()}: /usr/bin/ld: "
                            "final link failed: No space left on device; is the disk full or the folder read-only?")
    with pytest.raises(ConfigError) as e:  # an error of the code is still one
        build_host(tmp_path, ["model.c"], cc=fake_cc("model.c:3:1: error: unknown type name lb_t"))
    assert str(e.value) == "export: the generated C code does not compile: model.c:3:1: error: unknown type name lb_t"
