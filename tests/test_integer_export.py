"""Integer-only deployment (issue 17): fixed-point requantization, integer-mode QAT, the integer
package, the C runtime and the integer ONNX model."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from lowbit.export.requant import quantize_multiplier, real_multiplier, requantize, requantize_int

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH")
#: host C builds of the exports under AddressSanitizer and UBSan (LOWBIT_CFLAGS): a read or write outside a
#: buffer fails the build's run instead of passing by luck (session 21: lb_conv's scratch was too small for a
#: linear layer reading codes below 8 bits, and the logits were still right on most images)
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"


def _sanitizer_works() -> bool:
    import tempfile
    from pathlib import Path

    if CC is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.c"
        src.write_text("int main(void) { return 0; }\n")
        r = subprocess.run([CC, *SANITIZE.split(), str(src), "-o", str(Path(d) / "t")], capture_output=True)
        return r.returncode == 0 and subprocess.run([str(Path(d) / "t")], capture_output=True).returncode == 0


def _cases(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    real = np.exp(rng.uniform(np.log(1e-9), np.log(2.0**29), n)) * rng.choice([-1.0, 1.0], n)
    x = rng.integers(-2**31 + 1, 2**31 - 1, n)
    # keep x * real inside int32 (what a requantized output is)
    lim = (2**31 - 2**20) / np.maximum(np.abs(real), 1.0)
    x = np.clip(x, -lim, lim)
    x = x.astype(np.int64)
    x[:200] = rng.integers(-300, 300, 200)  # small accumulators with moderate multipliers
    real[:200] = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 200))
    real[:100] = 0.5
    # near-ties: float32 multipliers a few ulps from (k + 1/2)/x, so that x·r lies within a float32
    # rounding of a half (the MobileNetV2 case: 36·r = 5.4999999697)
    k = 1000
    xt = rng.integers(3, 40000, k) * rng.choice([-1, 1], k)
    half = rng.integers(0, 255, k) + 0.5
    rt = (half / np.abs(xt)).astype(np.float32)
    for _ in range(3):
        step = rng.integers(-1, 2, k)
        rt = np.where(step > 0, np.nextafter(rt, np.float32(np.inf)),
                      np.where(step < 0, np.nextafter(rt, np.float32(0)), rt))
    x[200: 200 + k], real[200: 200 + k] = xt, rt.astype(np.float64)
    return real, x


def test_requantize_is_float32_multiply_and_round_and_integers_compute_it():
    real, x = _cases()
    m, sh = quantize_multiplier(real)
    assert m.dtype == np.int32 and sh.dtype == np.int32
    big = np.abs(real) >= 2.0**-31
    assert np.all(np.abs(np.abs(m[big]) - 2**30.5) <= 2**30.5)  # normalised mantissas
    assert np.all(m[big] % 128 == 0)  # 24 significant bits: a float32 exactly
    assert np.array_equal(real_multiplier(m, sh).astype(np.float32).astype(np.float64), real_multiplier(m, sh))
    assert np.allclose(real_multiplier(m, sh)[big], real[big], rtol=2**-24)
    got = requantize(x, m, sh)
    exact = x.astype(np.float64) * real  # float64 is exact enough here
    small = np.abs(exact) < 2**22  # a code, or a residual in accumulator units: within one
    assert np.abs(got - np.rint(exact))[small].max() <= 1
    assert np.all(np.abs(got - exact) <= 1 + np.abs(exact) * 2.0**-22)  # beyond: float32's relative error
    want = np.rint(x.astype(np.float32) * real_multiplier(m, sh).astype(np.float32))  # IEEE single precision
    assert np.array_equal(got, want)
    # the C runtime's integer-only algorithm gives the same integers, near-ties included
    assert np.array_equal(requantize_int(x, m, sh), got)
    # ... where the fixed-point single rounding (TFLite's, before) differs on a near-tie
    t = 31 - sh.astype(np.int64)
    fixed = (((x * m.astype(np.int64)) >> (t - 1)) + 1) >> 1
    assert np.sum(fixed[200:1200] != got[200:1200]) >= 10
    # exact ties: half to even
    assert requantize(np.array([1, 3, -1, -3, 5]), *quantize_multiplier(np.full(5, 0.5))).tolist() == [0, 2, 0, -2, 2]


def test_requantize_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    real, x = _cases(2000, seed=1)
    m, sh = quantize_multiplier(real)
    assert np.array_equal(requantize(torch.from_numpy(x), m, sh).numpy(), requantize(x, m, sh))

    # a float tensor holding integers (the integer reference's accumulators): the same values, float32
    xf = torch.from_numpy(x.astype(np.float64))
    got = requantize(xf, m, sh)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().astype(np.int64), requantize(x, m, sh))
    assert torch.equal(xf, torch.from_numpy(x.astype(np.float64)))  # the input is not changed in place


def test_rne_shift_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    from lowbit.export.requant import rne_shift

    rng = np.random.default_rng(2)
    v = np.concatenate([rng.integers(-2**45, 2**45, 5000), np.arange(-40, 41)])
    s = np.concatenate([rng.integers(0, 40, 5000), np.full(81, 2)])  # ±2k+1 halves at s = 2: ties both ways
    got = rne_shift(torch.from_numpy(v.astype(np.float64)), s)
    assert got.dtype == torch.float64 and np.array_equal(got.numpy().astype(np.int64), rne_shift(v, s))


def _conv_op(lut, codes, c, hw, k, stride, pad, groups):
    """An integer conv op whose weights are ``lut[row, codes]`` (per-row LUTs, uint8 codes (O, F))."""
    from lowbit.export.intgraph import IntOp

    o = codes.shape[0]
    oh = (hw + 2 * pad - k) // stride + 1
    attrs = {"layer": "conv", "kernel": [k, k], "stride": [stride, stride], "padding": [pad, pad], "groups": groups}
    return IntOp("conv", "t", ["x"], "y", (c, hw, hw), (o, oh, oh), attrs, codes=codes.astype(np.uint8),
                 lut=lut.astype(np.int16), bias=np.zeros(o, np.int32))


def _brute_conv(x, m, c, k, stride, pad, groups):
    """Σ m·x in int64, tap by tap (the definition)."""
    n, _, h, w = x.shape
    o = m.shape[0]
    cg, og = c // groups, o // groups
    wk = m.reshape(o, cg, k, k)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, oh, oh), dtype=np.int64)
    for oc in range(o):
        gi = oc // og
        for ic in range(cg):
            for i in range(k):
                for j in range(k):
                    tap = xp[:, gi * cg + ic, i: i + stride * (oh - 1) + 1: stride, j: j + stride * (oh - 1) + 1: stride]
                    out[:, oc] += tap * wk[oc, ic, i, j]
    return out


@pytest.mark.parametrize("c,groups,k,stride,pad,wmax,dtype", [
    (56, 1, 3, 1, 1, 127, "float32"),    # 504 taps · 255 · 127 just below 2^24: float32, every sum at its largest
    (64, 1, 3, 1, 1, 127, "float64"),    # 576 taps: above 2^24, float64
    (8, 2, 3, 2, 1, 127, "float32"),     # grouped, strided
    (16, 16, 3, 1, 1, 127, "float32"),   # depthwise 3x3
    (16, 16, 3, 2, 1, 2**14, "float64"),  # depthwise with the fine bias's large weights
    (32, 1, 1, 1, 0, 127, "float32"),    # 1x1
])
def test_integer_reference_conv_sums_are_exact(c, groups, k, stride, pad, wmax, dtype):
    """The integer reference sums in float32 only where every partial sum is below 2^24 (else float64):
    its sums equal the int64 definition, also with every input and weight at its largest."""
    torch = pytest.importorskip("torch")
    from lowbit.export import intgraph
    from lowbit.export.intgraph import TensorQ, conv_sums, conv_weights

    rng = np.random.default_rng(c + groups + k)
    o = 8 if groups == 1 else c
    f = (c // groups) * k * k
    lut = rng.integers(-wmax, wmax + 1, (o, 256))
    lut[0] = wmax  # the largest sums: every weight and input at its bound
    op = _conv_op(lut, rng.integers(0, 256, (o, f)), c, 7, k, stride, pad, groups)
    m = op.m()
    x = rng.integers(0, 256, (3, c, 7, 7))
    x[0] = 255
    w = conv_weights(op, TensorQ(8, 0, 1.0))
    platform_f32 = intgraph._f32_exact(0)  # x86 with oneDNN at full precision (the next test)
    assert str(w.dtype) == f"torch.{dtype if platform_f32 else 'float64'}"
    got = conv_sums(torch.from_numpy(x.astype(np.float32)), w, op)
    assert np.array_equal(got.numpy().astype(np.int64), _brute_conv(x, m, c, k, stride, pad, groups))


def test_integer_reference_ops_take_codes_of_any_integer_type():
    """run_op is fed onnxruntime's uint8 outputs (benchmarks/integer_ort.py): a signed input's zero point is
    subtracted without wrapping around (the torch port first subtracted it in uint8)."""
    from lowbit.export.intgraph import IntGraph, IntReference, TensorQ

    rng = np.random.default_rng(1)
    op = _conv_op(np.arange(256)[None].repeat(4, 0) - 128, rng.integers(0, 256, (4, 36)), 4, 5, 3, 1, 1, 1)
    op.inputs, op.output = ["x"], "y"
    op.mult, op.shift = np.full(4, 2**30, np.int32), np.full(4, -6, np.int32)
    g = IntGraph([op], {"x": TensorQ(8, 128, 1.0), "y": TensorQ(8, 128, 1.0)}, "x", "y")
    q = rng.integers(0, 256, (2, 4, 5, 5))
    want = IntReference(g).run_op(op, {"x": q.astype(np.int64)})
    assert len(np.unique(want)) > 10  # not clamped flat
    assert np.array_equal(IntReference(g).run_op(op, {"x": q.astype(np.uint8)}), want)


def test_integer_reference_sums_in_float64_where_float32_would_not_be_full_precision(monkeypatch):
    torch = pytest.importorskip("torch")
    from lowbit.export import intgraph
    from lowbit.export.intgraph import TensorQ, conv_weights

    dw = _conv_op(np.ones((16, 256)), np.zeros((16, 9)), 16, 7, 3, 1, 1, 16)

    def dtype():
        return str(conv_weights(dw, TensorQ(8, 0, 1.0)).dtype)

    monkeypatch.setattr(intgraph, "_ARM", False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
    assert dtype() == "torch.float64"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert dtype() == "torch.float32"
    monkeypatch.setattr(intgraph, "_ARM", True)  # ARM: ATen's Winograd depthwise 3x3 kernel is not integer
    assert dtype() == "torch.float64"
    monkeypatch.setattr(intgraph, "_ARM", False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # without oneDNN, NNPACK (Winograd) may run
    assert dtype() == "torch.float64"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    conv = torch.backends.mkldnn.conv
    was = conv.fp32_precision
    try:
        conv.fp32_precision = "bf16"  # oneDNN allowed to compute float32 convs in bfloat16
        assert dtype() == "torch.float64"
    finally:
        conv.fp32_precision = was
    assert dtype() == "torch.float32"


def test_onnxruntime_qlinearconv_requantizes_as_requantize():
    """The premise of the bit-exact ONNX models: onnxruntime's QLinearConv (MLAS) requantizes
    ``acc + bias`` as ``rint(f32(f32(acc + bias)·scale))``, ties to even, i.e. :func:`requantize`
    with the float32 multiplier; checked on near-ties, where the fixed-point rounding differs."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    real, acc = _cases(20000, seed=4)
    sel = slice(200, 1200)  # the near-ties: acc 3..40,000, results 0..255
    real, acc = real[sel].astype(np.float32), acc[sel]
    keep = acc > 0  # QLinearConv with weight +1: positive accumulators from uint8 x + int32 bias
    real, acc = real[keep], acc[keep]
    n = len(acc)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, n)
    bias = acc - x
    ints = [numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0, np.uint8), "z8"),
            numpy_helper.from_array(np.ones((n, 1, 1, 1), np.int8), "w"), numpy_helper.from_array(real, "ws"),
            numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(bias.astype(np.int32), "b")]
    node = helper.make_node("QLinearConv", ["x", "one", "z8", "w", "ws", "wz", "one", "z8", "b"], ["y"], group=n)
    g = helper.make_graph([node], "rq", [helper.make_tensor_value_info("x", T.UINT8, [1, n, 1, 1])],
                          [helper.make_tensor_value_info("y", T.UINT8, [1, n, 1, 1])], ints)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": x.astype(np.uint8).reshape(1, n, 1, 1)})[0].reshape(n).astype(np.int64)
    m, sh = quantize_multiplier(real)
    assert np.array_equal(real_multiplier(m, sh), real.astype(np.float64))  # float32 multipliers: exact
    assert np.array_equal(y, np.clip(requantize(acc, m, sh), 0, 255))
    fixed = (((acc * m.astype(np.int64)) >> (30 - sh.astype(np.int64))) + 1) >> 1
    assert np.sum(np.clip(fixed, 0, 255) != y) >= 10  # TFLite's rounding would disagree with onnxruntime


@needs_cc
@pytest.mark.parametrize("requant32", [0, 1])
def test_requantize_c_is_bit_exact(tmp_path, requant32):
    """lb_requantize against the float32 definition; ``requant32``: its 32-bit-only common case (LB_REQUANT32, the
    default on ARMv6-M, which has no 64-bit multiply), built here on the host."""
    from lowbit.export.int_c import RUNTIME_DIR

    real, x = _cases(5000, seed=2)
    # and accumulators below 2^24 at every multiplier magnitude (lb_requantize's 32-bit path), near-ties included
    rng = np.random.default_rng(3)
    r2 = np.exp(rng.uniform(np.log(1e-12), np.log(2.0**7), 5000)) * rng.choice([-1.0, 1.0], 5000)
    x2 = rng.integers(-2**24 + 1, 2**24, 5000)
    x2[:1000] = rng.integers(-300, 300, 1000)
    real, x = np.concatenate([real, r2, real[200:1200]]), np.concatenate([x, x2, x[200:1200] * 64])
    m, sh = quantize_multiplier(real)
    # the 32-bit path's edges: accumulators and multipliers at the 12-bit halves' and 24-bit limits, every shift
    xb = np.array([1, 2, 3, 4095, 4096, 4097, 2**12 * 4095, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 2, 2**24 - 1])
    mb = np.array([2**30, 2**30 + 128, 2**30 + 4096 * 128, 3 * 2**29, 2**31 - 4096 * 128, 2**31 - 128])
    xb, mb, sb = (a.reshape(-1) for a in np.meshgrid(np.concatenate([xb, -xb]), np.concatenate([mb, -mb]),
                                                       np.arange(-12, 31), indexing="ij"))
    keep = np.abs(xb * real_multiplier(mb, sb)) < 2**31 - 2**20  # the result is an int32
    m, sh, x = np.concatenate([m, mb[keep]]), np.concatenate([sh, sb[keep]]), np.concatenate([x, xb[keep]])
    drv = tmp_path / "drv.c"
    drv.write_text('#include <stdio.h>\n#include "lowbit_rt.h"\nint main(void){long a,b,c;'
                   'while(scanf("%ld %ld %ld",&a,&b,&c)==3)printf("%d\\n",lb_requantize((int32_t)a,(int32_t)b,(int32_t)c));'
                   'return 0;}\n')
    exe = tmp_path / "drv"
    subprocess.run([CC, "-std=c99", "-O2", f"-DLB_REQUANT32={requant32}", "-I", str(RUNTIME_DIR), str(drv),
                    str(RUNTIME_DIR / "lowbit_rt.c"), "-o", str(exe), "-lm"], check=True)
    inp = "\n".join(f"{a} {b} {c}" for a, b, c in zip(x, m, sh))
    out = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True).stdout.split()
    assert np.array_equal(np.array(out, dtype=np.int64), requantize(x, m, sh))


# ---------------------------------------------------------------------------------------------
# integer-mode QAT and every backend
# ---------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lowbit import create_model, quantize  # noqa: E402
from lowbit.errors import ConfigError  # noqa: E402
from quant_helpers import OddKernelNet  # noqa: E402
from quant_helpers import settled as _settled  # noqa: E402

INT_W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True,
            "integer_residual": "accumulator"}  # the first form; the defaults: test_integer_defaults


def _ready(m: nn.Module, shape, plan=INT_W2A2, **kw) -> nn.Module:
    return _settled(m, shape, plan, **kw)


class GroupedNet(nn.Module):
    """A user model: stem, depthwise (stride 2), grouped conv with bias, max-pool, two linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.gc = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = self.pool(torch.relu(self.gc(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _assert_live(m: nn.Module, x: torch.Tensor) -> None:
    """Every tensor of the integer network takes more than one code over the batch: a constant layer
    (an untrained net whose codes all clamp) would hide a kernel's error from a bit-exact comparison."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    env = IntReference(int_graph(m, x[:1])).tensors(x.numpy())
    assert not [k for k, v in env.items() if len(np.unique(v)) < 2]


def _x(n, shape, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_thresholds_give_the_requantized_clamped_codes():
    # lb_conv_out's thresholds for outputs of few codes (requant.thresholds): for every accumulator within the
    # bound, lo + #{T <= u} (u = -v for a negative multiplier) is clamp(requantize(v) + zero, lo, hi); checked on
    # random accumulators and at every threshold and one below it, for positive, negative, zero and tiny
    # multipliers, 1- and 2-bit ranges, a zero point, a ReLU-clamped range
    from lowbit.export.requant import thresholds

    rng = np.random.default_rng(5)
    real = rng.uniform(1e-5, 0.2, 40) * rng.choice([-1.0, 1.0], 40)
    real[:3] = [0.0, 1e-12, -3e-9]
    m, sh = quantize_multiplier(real)
    bound = 300_000
    for zero, lo, hi in ((0, 0, 3), (2, 0, 3), (2, 2, 3), (0, 0, 1), (1, 1, 1)):
        t = thresholds(m, sh, zero, lo, hi, bound)
        assert t.shape == (40, hi - lo) and t.dtype == np.int32
        assert np.all(np.diff(t.astype(np.int64), axis=1) >= 0)
        v = np.concatenate([rng.integers(-bound, bound + 1, (40, 4000)), t, t.astype(np.int64) - 1,
                            np.full((40, 2), [-bound, bound])], axis=1)
        v = np.clip(v, -bound, bound)
        u = np.where(m[:, None] < 0, -v, v)
        got = lo + (u[:, :, None] >= t[:, None, :].astype(np.int64)).sum(-1)
        want = np.clip(requantize(v, m[:, None], sh[:, None]) + zero, lo, hi)
        assert np.array_equal(got, want), (zero, lo, hi)
    assert not np.all(m < 0) and np.any(m < 0)
    with pytest.raises(ConfigError, match="accumulator bound"):
        thresholds(m, sh, 0, 0, 3, 2**31)


@needs_cc
def test_c_thresholds_with_negative_batchnorm_scales(tmp_path):
    # the C runtime's 2-bit layers compare with thresholds (lb_conv_t.thr); a BatchNorm with negative gammas gives
    # those channels negative multipliers, whose thresholds are on -acc: bit-exact with the integer reference
    from lowbit.export.int_api import export_int_model
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.weight.data[::2] *= -1
    m = _ready(m, (1, 28, 28))
    x = _x(16, (1, 28, 28), seed=4)
    g = int_graph(m, x[:1])
    thr_ops = [op for op in g.ops if op.kind == "conv" and op.output != g.output and g.tensors[op.output].bits <= 2]
    assert thr_ops and any((op.mult < 0).any() for op in thr_ops)
    r = export_int_model(m, x, tmp_path, c_images=None, formats=("packed", "c"))
    assert r["c"]["bit_exact_images"] == 16
    assert "_thr[" in (tmp_path / "c" / "model.c").read_text()
    # only the formats asked for (before session 21 an integer export wrote all three whatever --format said)
    assert "onnx" not in r and not (tmp_path / "onnx").exists() and (tmp_path / "packed" / "model.safetensors").is_file()


@needs_cc
def test_export_model_of_an_integer_model_is_the_integer_export_with_its_formats(resnet_int, tmp_path):
    """export_model on an integer-mode model runs the integer export (before session 21 it ran the float-activation
    export, which is not bit-exact with the integer network), with only the formats asked for: the packed file, the
    source of the NumPy and C backends, goes to a temporary folder when it is not one of them."""
    from lowbit.export import export_model, format_report

    x = _x(8, (1, 28, 28), seed=5)
    r = export_model(resnet_int, x, tmp_path / "c_only", formats="c", c_images=None)
    assert r["integer"] and r["formats"] == ["c"] and r["failed_checks"] == []
    assert r["numpy"]["bit_exact_images"] == 8 and r["c"]["bit_exact_images"] == 8 and "onnx" not in r
    assert sorted(p.name for p in (tmp_path / "c_only").iterdir()) == ["c"]
    assert "integer export of a model" in format_report(r) and "CHECK FAILED" not in format_report(r)
    with pytest.raises(ConfigError, match="--target needs the c format"):
        export_model(resnet_int, x, tmp_path / "x", formats="packed", target="cortex-m4")
    with pytest.raises(ConfigError, match="export format '' unknown"):
        export_model(resnet_int, x, tmp_path / "x", formats="packed,,c")


def test_failed_checks_are_named_and_make_the_cli_fail(monkeypatch, tmp_path, capsys):
    """An export whose C build is not bit-exact, or whose self-test fails, is wrong: the report lists each failed
    check, format_report prints them, and `lowbit export` exits 1 (the audit of session 21: a C build with an
    out-of-bounds write reported 7/8 images bit-exact and exited 0)."""
    from lowbit import cli
    from lowbit.export import api

    ok = {"integer": True, "out_dir": "o", "numpy": {"images": 8, "bit_exact_images": 8},
          "c": {"compiled": True, "self_test_ok": True, "self_test": "3/3", "images": 8, "bit_exact_images": 8,
                "pixel_images": 8, "pixel_bit_exact_images": 8},
          "mcu": {"target": "cortex-m4", "images": 3, "bit_exact_images": 3}}
    assert api.failed_checks(ok) == []
    bad = {**ok, "numpy": {"images": 8, "bit_exact_images": 7},
           "c": {**ok["c"], "self_test_ok": False, "self_test": "2/3 samples bit-exact", "bit_exact_images": 7,
                 "pixel_bit_exact_images": 6},
           "mcu": {"target": "cortex-m4", "images": 3, "bit_exact_images": 2, "pixel_images": 3,
                   "pixel_bit_exact_images": 1}}
    assert api.failed_checks(bad) == [
        "NumPy (packed file) 7/8 images bit-exact with PyTorch", "C self-test failed: 2/3 samples bit-exact",
        "C 7/8 images bit-exact with NumPy", "C from pixels 6/8 images bit-exact with NumPy",
        "cortex-m4 2/3 images bit-exact with NumPy", "cortex-m4 from pixels 1/3 images bit-exact"]
    # a float export's NumPy network agrees with PyTorch up to float rounding: not an exactness check
    assert api.failed_checks({**ok, "integer": False}) == []
    with pytest.warns(UserWarning, match="6 check"):
        flagged = api._flag_failures(dict(bad))
    monkeypatch.setattr("lowbit.export.export_run", lambda *a, **k: flagged)
    monkeypatch.setattr("lowbit.export.format_report", lambda rep: "the report")
    assert cli.main(["export", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "lowbit: export: 6 check(s) failed: NumPy (packed file) 7/8 images bit-exact with PyTorch" in err
    monkeypatch.setattr("lowbit.export.export_run", lambda *a, **k: {**ok, "failed_checks": []})
    assert cli.main(["export", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["integer"] is True and out.err.strip() == "the report"  # stdout: the JSON alone


@pytest.fixture(scope="module")
def resnet_int():
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
    return _ready(m, (1, 28, 28))


def test_integer_mode_forward_equals_integer_reference_from_the_file(resnet_int, tmp_path):
    from lowbit.export.intgraph import IntReference, load_int_package, save_int_package
    from lowbit.intmode import int_graph

    x = _x(40, (1, 28, 28))
    with torch.no_grad():
        y = resnet_int(x).numpy()
    g = int_graph(resnet_int, x[:1])
    # every layer is integer: first conv / last linear got 8-bit quantizers, every tensor has codes
    assert [op.kind for op in g.ops].count("conv") == 10 and all(op.codes is not None for op in g.ops if op.kind == "conv")
    assert {t.bits for t in g.tensors.values()} == {2, 8}
    save_int_package(g, tmp_path / "pkg")
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "pkg" / "model.safetensors").rename(alone / "m.safetensors")  # no model.json beside it
    y2 = IntReference(load_int_package(alone / "m.safetensors")).run(x.numpy())
    assert np.array_equal(y.view(np.uint32), y2.view(np.uint32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_integer_mode_trains_on_a_gpu_and_evaluates_the_same_integer_network():
    """Found on a lent H200 (session 16): the integer graph read CUDA weights straight into NumPy."""
    torch.manual_seed(0)
    m = quantize(GroupedNet(), {**INT_W2A2, "integer_residual": "output"}).to("cuda")
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(3):
        x = torch.randn(16, 1, 12, 12, generator=g).to("cuda")
        nn.functional.cross_entropy(m(x), torch.arange(16, device="cuda") % 10).backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    x = _x(24, (1, 12, 12))
    with torch.no_grad():
        y_gpu = m(x.to("cuda")).cpu()  # the integer network (NumPy), its constants read from CUDA tensors
        m.cpu()
        y_cpu = m(x)
    assert y_gpu.dtype == torch.float32 and torch.equal(y_gpu, y_cpu)


def test_integer_mode_trains(resnet_int):
    m = resnet_int
    m.train()
    try:
        x, t = _x(8, (1, 28, 28)), torch.arange(8) % 10
        loss = nn.functional.cross_entropy(m(x), t)
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert any("alpha" in n for n in grads) and any("original" in n for n in grads)
    finally:
        m.zero_grad()
        m.eval()


def test_recalibrate_bn_in_integer_mode_sees_the_data():
    """recalibrate_bn puts only BatchNorm in train mode: an integer-mode model must then run its
    traced graph (BN sees the batches), not the integer network (BN unused, statistics left reset)."""
    from lowbit.train import recalibrate_bn

    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28))
    x = _x(16, (1, 28, 28), seed=3)
    with torch.no_grad():
        before = m(x)
    bn = recalibrate_bn(m, [(x * 3 + 1, None)], batches=1)
    assert not any(mod.training for mod in m.modules())
    means = [v for k, v in bn.items() if k.endswith("running_mean")]
    # a reset BatchNorm has mean 0: after one batch every layer holds that batch's statistics
    assert means and all(v.abs().sum() > 0 for v in means)
    assert all(not torch.allclose(v, torch.ones_like(v)) for k, v in bn.items() if k.endswith("running_var"))
    with torch.no_grad():  # eval: the integer network again, rebuilt from the new statistics
        assert not torch.equal(m(x), before)


def test_a_conv_row_of_zero_weights_outputs_its_batchnorm_shift():
    """A row whose integer weights are all 0 outputs the constant BatchNorm shift; its own
    accumulator unit (here a huge learned LSQ step) must not round that shift away."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28))
    x = _x(4, (1, 28, 28))
    stem_out = int_graph(m, x[:1]).ops[1].output
    with torch.no_grad():
        m.conv1.parametrizations.weight.original[0].zero_()
        m.conv1.parametrizations.weight[0].quantizer.step[0] = 1e4
        t = int_graph(m, x[:1]).tensors[stem_out]
        m.bn1.running_mean[0], m.bn1.running_var[0], m.bn1.weight[0] = 0.0, 1.0, 1.0
        m.bn1.bias[0] = 2.3 * t.scale  # BN output 2.3 steps: code 2 after the ReLU
    g = int_graph(m, x[:1])
    assert g.ops[1].name == "conv1" and not g.ops[1].m()[0].any()
    codes = IntReference(g).tensors(x.numpy())[stem_out][:, 0]
    assert np.all(codes == min(2, g.tensors[stem_out].qmax) + g.tensors[stem_out].zero)


@pytest.mark.parametrize("which", ["resnet8", "mobilenetv2"])
def test_arena_plan_never_shares_a_live_byte_and_reaches_the_peak_of_live_bytes(which, resnet_int):
    # the C runtime's arena (int_c.plan_arena): tensors whose lives overlap (writer .. last reader) get disjoint
    # bytes, and on these graphs the arena is no larger than the most bytes live at once, its lower bound. In
    # write order alone (before session 20) neither reached it: the ResNet-8 needs largest first, this small
    # MobileNetV2 a shuffled order
    from lowbit.export.int_c import _numel, _shape, plan_arena
    from lowbit.export.pack import packed_nbytes
    from lowbit.intmode import int_graph

    if which == "resnet8":
        m, shape = resnet_int, (1, 28, 28)
    else:
        m, shape = _ready(create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25),
                          (1, 16, 16)), (1, 16, 16)
    g = int_graph(m, _x(1, shape))
    offsets, size = plan_arena(g)
    last = {}
    for i, op in enumerate(g.ops):
        for t in op.inputs:
            last[t] = i
    life = {op.output: (i, max(i, last.get(op.output, i))) for i, op in enumerate(g.ops)
            if op.kind not in ("flatten",) and op.output != g.output}
    nb = {t: packed_nbytes(_numel(_shape(g, t)), g.tensors[t].bits) for t in life}
    for t in life:
        assert 0 <= offsets[t] and offsets[t] + nb[t] <= size
        for u in life:
            if u != t and life[u][0] <= life[t][1] and life[t][0] <= life[u][1]:
                assert offsets[t] + nb[t] <= offsets[u] or offsets[u] + nb[u] <= offsets[t], (t, u)
    peak = max(sum(nb[t] for t in life if life[t][0] <= i <= life[t][1]) for i in range(len(g.ops)))
    assert size == peak


class LeNetLike(nn.Module):
    """LeNet's shape: a conv, max-pool, then a linear layer reading the flattened 2-bit codes (its input is
    unpacked into lb_conv's scratch, the largest of the network), and the classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class FlattenIdiom(LeNetLike):
    """LeNetLike with the flatten written one of the ways hand-written CNNs write it."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        if how == "x.view(-1, 50)":  # two rows per image: the model runs, but it is no flatten
            self.fc1 = nn.Linear(50, 16)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = {"x.flatten(1)": lambda: x.flatten(1), "x.view(x.size(0), -1)": lambda: x.view(x.size(0), -1),
             "x.reshape(x.shape[0], -1)": lambda: x.reshape(x.shape[0], -1),
             "x.view((x.size()[0], -1))": lambda: x.view((x.size()[0], -1)),
             "torch.flatten(x, start_dim=1)": lambda: torch.flatten(x, start_dim=1),
             "x.view(-1, 100)": lambda: x.view(-1, 100), "x.reshape((-1, 100))": lambda: x.reshape((-1, 100)),
             "x.view(-1, 50)": lambda: x.view(-1, 50)}[self.how]()
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("how", ["x.flatten(1)", "x.view(x.size(0), -1)", "x.reshape(x.shape[0], -1)",
                                 "x.view((x.size()[0], -1))", "torch.flatten(x, start_dim=1)", "x.view(-1, 100)",
                                 "x.reshape((-1, 100))", "x.view(-1, 50)"])
def test_the_flatten_idioms_of_hand_written_cnns_export_in_both_modes(how):
    """Before session 21 only nn.Flatten and torch.flatten(x, 1) traced; the usual hand-written forms were refused
    with the name of a size node. They are now one flatten (export.graph.flatten_idioms) for the float export and
    integer mode alike. Since session 22 so is view(-1, N) with N the features per sample (flatten_to checks N when
    the graph runs); a view(-1, N) that splits a sample into rows (view(-1, 50) of 100 features: the model runs,
    with twice the batch) is refused with the forms that work."""
    from lowbit.export.graph import lower
    from lowbit.intmode import int_graph

    x = _x(4, (1, 12, 12), seed=1)
    for integer in (False, True):
        torch.manual_seed(0)
        m = FlattenIdiom(how)
        if how == "x.view(-1, 50)":
            assert m(x).shape == (8, 10)
            with pytest.raises(ConfigError, match=r"^export: view\(-1, 50\) of a tensor of \(4, 5, 5\) per sample "
                                                  r"\(100 elements\) is not a flatten from dim 1; a reshape is supported"):
                quantize(m, {**INT_W2A2, "integer": integer})
                m(x) if integer else lower(m, x[:2])
            continue
        with torch.no_grad():
            y = m(x)
        m = _ready(m, (1, 12, 12), plan={**INT_W2A2, "integer": integer})
        g = int_graph(m, x[:1]) if integer else lower(m, x[:2])
        kinds = [op.kind for op in g.ops]
        assert kinds.count("flatten") == 1 and kinds.index("flatten") == kinds.index("maxpool") + 1
        if integer:  # what is trained is what runs: the integer reference computes the model's logits
            from lowbit.export.intgraph import IntReference

            with torch.no_grad():
                assert np.array_equal(IntReference(g).run(x.numpy()), m(x).numpy())
        else:
            assert y.shape == (4, 10)


@needs_cc
@pytest.mark.parametrize("which", ["resnet8", "grouped", "odd", "lenet"])
def test_every_backend(which, resnet_int, tmp_path, monkeypatch):
    from lowbit.export.int_api import export_int_model, format_int_report

    if which == "resnet8":
        m, shape = resnet_int, (1, 28, 28)
    else:  # a PACT clip of 2 and settled BatchNorm statistics: every layer live (_assert_live)
        net, shape = {"grouped": (GroupedNet(), (1, 12, 12)), "odd": (OddKernelNet(), (1, 11, 11)),
                      "lenet": (LeNetLike(), (1, 12, 12))}[which]
        m = _ready(net, shape, plan={**INT_W2A2, "act": {"name": "pact", "bits": 2, "init": 2.0}}, passes=20)
    x = _x(24, shape, seed=3)
    _assert_live(m, x)
    if _sanitizer_works():  # the C builds below run under ASan + UBSan
        monkeypatch.setenv("LOWBIT_CFLAGS", SANITIZE)
    r = export_int_model(m, x, tmp_path / which, c_images=None, latency_repeats=1, latency_batch=8, calib=8)
    assert r["numpy"]["bit_exact_images"] == 24
    assert r["c"]["self_test_ok"] and r["c"]["bit_exact_images"] == 24 and r["failed_checks"] == []
    if which == "resnet8":  # the 8-bit LSQ ends: per-channel steps, one integer grid: one code table, not one per row
        from lowbit.export.intgraph import load_int_package

        luts = {op.name: op.lut.shape for op in load_int_package(tmp_path / which / "packed").ops if op.kind == "conv"}
        assert luts["conv1"] == (1, 256) and luts["fc"] == (1, 256)
    # the ConvInteger model requantizes as the integer model does (float32 multiply, round half to even):
    # bit-exact, the accumulator-form residual included; QLinearConv too where it has no such residual
    assert r["onnx"]["integer"]["mismatches"] == 0 and r["onnx"]["integer"]["max_logit_diff"] == 0
    if which == "grouped":
        assert r["onnx"]["integer_fused"]["max_logit_diff"] == 0
    # RAM holds packed codes (2-bit tensors: n/4 bytes): the whole arena is under 2 bytes per element
    # of the largest activation, where float32 activations took 4 bytes per element of each live tensor
    largest = {"resnet8": 4 * 28 * 28, "grouped": 8 * 12 * 12, "odd": 6 * 11 * 11, "lenet": 4 * 10 * 10}[which]
    assert r["c"]["arena_bytes"] <= 2 * largest
    assert "bit-exact" in format_int_report(r)
    if which == "grouped":
        import onnx

        ops = {n.op_type for n in onnx.load(str(tmp_path / which / "onnx" / "model_integer.onnx")).graph.node}
        assert {"ConvInteger", "MatMulInteger", "MaxPool"} <= ops


def test_c_scratch_holds_one_band_within_one_packed_input(resnet_int):
    """lb_conv unpacks its input a band of output rows at a time (int_c.conv_band): the unpacked bytes of a band
    are no more than the layer's packed input (or one band of one output row), so RAM stays near 002's Mem."""
    from lowbit.export.int_c import conv_band, conv_scratch
    from lowbit.export.pack import packed_nbytes
    from lowbit.intmode import int_graph

    g = int_graph(resnet_int, _x(1, (1, 28, 28)))
    bands = []
    for op in (op for op in g.ops if op.kind == "conv" and op.attrs["layer"] == "conv"):
        t = g.tensors[op.inputs[0]]
        (c, h, w), (ph, pw), kh = op.in_shape, op.attrs["padding"], op.attrs["kernel"][0]
        fw = op.codes[0].size // 3 * 4 if op.attrs["kernel"][1] == 3 else op.codes[0].size  # the weight row
        unpacked = 2 * (conv_scratch(op, t) - fw) - 4  # without the 4 bytes of slack
        assert unpacked <= max(packed_nbytes(c * h * w, t.bits), c * kh * (w + 2 * pw)) + 1
        bands.append(conv_band(op, t))
    assert any(b > 0 for b in bands)  # the 2-bit layers are split into bands (the C tests run them)


@pytest.mark.parametrize("residual_bits", [None, 8])
def test_mobilenetv2_integer_graph(residual_bits):
    """MobileNetV2 (depthwise convs, fused residual adds) in integer mode equals its integer graph;
    the C build of depthwise/grouped convs and residuals is checked by test_every_backend. Its
    residual stream is a linear bottleneck (no ReLU): with integer_residual_bits it keeps its sign."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    m = _ready(create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25), (1, 16, 16),
               plan={**INT_W2A2, "integer_residual_bits": residual_bits}, passes=1, batch=4)
    x = _x(2, (1, 16, 16))
    with torch.no_grad():
        y = m(x).numpy()
    g = int_graph(m, x[:1])
    assert any(op.attrs.get("groups", 1) > 1 for op in g.ops if op.kind == "conv")  # depthwise
    assert any(len(op.inputs) == 2 for op in g.ops if op.kind == "conv")  # fused residual adds
    assert np.array_equal(y, IntReference(g).run(x.numpy()))
    res = [g.tensors[op.inputs[1]] for op in g.ops if op.kind == "conv" and len(op.inputs) == 2]
    # the bottleneck outputs: signed 8-bit codes (the stem's post-ReLU output: unsigned), or the next conv's
    # unsigned 2-bit codes (negative values lost)
    assert {(t.bits, t.zero) for t in res} == ({(8, 0), (8, 128)} if residual_bits else {(2, 0)})
    assert sum(t.zero == 128 for t in res) == (len(res) - 1 if residual_bits else 0)


@needs_cc
@pytest.mark.parametrize("mid", [None, "observed"])
def test_mobilenetv2_signed_inputs_every_backend_bit_exact(tmp_path, mid):
    """MobileNetV2 with a signed LSQ input quantizer on the layers that read a linear bottleneck
    (codes with zero point 2 at 2 bits, 8 at 4 bits), the output residual add and an 8-bit stream:
    NumPy, C and both ONNX models compute the integer model bit for bit (float32-rounding
    requantization, depthwise convs, global pooling as ReduceSum); also when training rounded the
    residual convs to ``mid`` on the range it observed (``integer_mid_range: observed``: a finer
    ``mid`` that may clamp, QLinearConv's uint8 saturation)."""
    pytest.importorskip("onnxruntime")
    from lowbit.export import onnx_export as ox
    from lowbit.export.c_export import run_c
    from lowbit.export.int_c import compile_int_c, write_int_c
    from lowbit.export.int_onnx import variants
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    signed = {"act": {"name": "lsq", "bits": 4, "signed": True}}
    plan = {"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}, "integer": True,
            "layers": {"features.[4-9].conv.0": signed, "features.1[0-9].conv.0": signed, "features.20": signed},
            **({"integer_train_mid": True, "integer_mid_range": mid} if mid else {})}
    m = _ready(create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25), (1, 16, 16),
               plan=plan, passes=20, batch=8)  # settled BatchNorm statistics: every layer live
    x = _x(6, (1, 16, 16), seed=2)
    _assert_live(m, x)
    with torch.no_grad():
        y = m(x).numpy()
    g = int_graph(m, x[:1])
    signed_in = [g.tensors[op.inputs[0]] for op in g.ops if op.kind == "conv" and g.tensors[op.inputs[0]].bits == 4
                 and g.tensors[op.inputs[0]].zero == 8]
    assert len(signed_in) >= 10  # every expand conv after the first block, and the last 1x1 conv
    xn = x.numpy()
    assert np.array_equal(IntReference(g).run(xn).view(np.uint32), y.view(np.uint32))
    for k, model in variants(g).items():
        if k != "fp32":
            assert np.array_equal(ox.run(ox.session(model), xn).view(np.uint32), y.view(np.uint32)), k
    write_int_c(g, tmp_path / "c")
    assert np.array_equal(run_c(compile_int_c(tmp_path / "c"), xn, 10).view(np.uint32), y.view(np.uint32))


def test_integer_mode_errors():
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)
            self.a = nn.GELU()
            self.f = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.f(torch.flatten(self.a(self.c(x)), 1))

    with pytest.raises(ConfigError, match="integer mode: layer 'a' \\(GELU\\) is not supported"):
        quantize(Gelu(), INT_W2A2)
    with pytest.raises(ConfigError, match="needs a weight and an act quantizer"):
        quantize(GroupedNet(), {"weight": {"name": "sawb", "bits": 2}, "integer": True})
    # a dilated or reflect-padded conv: refused by quantize() itself (before session 21: at the first eval forward)
    for conv in (nn.Conv2d(1, 4, 3, dilation=2), nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")):
        net = Gelu()
        net.c, net.a = conv, nn.ReLU()
        with pytest.raises(ConfigError, match=r"integer mode: layer 'c' \(Conv2d with dilation"):
            quantize(net, INT_W2A2)


# ---------------------------------------------------------------------------------------------
# integer_residual: output (the residual added after the conv's requantization, = QLinearAdd)
# ---------------------------------------------------------------------------------------------
def _qladd_case(rng, res_bits, res_zero, out_bits, relu):
    from lowbit.export.intgraph import TensorQ, residual_output_constants

    t_out = TensorQ(out_bits, 0 if relu else 2 ** (out_bits - 1), float(np.exp(rng.uniform(-3, 1))))
    t_res = TensorQ(res_bits, res_zero, float(t_out.scale * np.exp(rng.uniform(-3, 3))))
    return t_out, t_res, residual_output_constants(t_out, relu, t_res, "case")


def test_output_residual_add_is_onnxruntime_qlinearadd_and_never_clamps_wrongly():
    """onnxruntime's float32 QLinearAdd with the exported scales computes the integer model's add
    for every (mid, residual) code pair; clamping mid to 8 bits never changes an output code."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as T
    from onnx import helper

    from lowbit.export import onnx_export as ox
    from lowbit.export.intgraph import rne_shift

    rng = np.random.default_rng(0)
    a, r = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for case in range(12):
        relu = case % 2 == 0
        t_out, t_res, c = _qladd_case(rng, (2, 4, 8)[case % 3], 0 if case % 4 < 2 else 128, (2, 4, 8)[case // 4],
                                      relu)
        if t_res.zero > t_res.qmax:
            continue
        at, mb, big_s = c["attrs"], int(c["res_mult"]), int(c["res_shift"])
        rr = np.minimum(r, t_res.qmax)
        want = rne_shift((a - at["mid_zero"]) * at["mid_mult"] + (rr - t_res.zero) * mb, big_s) + t_out.zero
        want = np.clip(want, 0, 255)
        s = lambda n, v: helper.make_tensor(n, T.FLOAT, [], [v])  # noqa: E731
        z = lambda n, v: helper.make_tensor(n, T.UINT8, [], [v])  # noqa: E731
        node = helper.make_node("QLinearAdd", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["c"],
                                domain="com.microsoft")
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, T.UINT8, [256, 256]) for n in "ab"],
                              [helper.make_tensor_value_info("c", T.UINT8, [256, 256])],
                              [s("as", at["mid_mult"] * 2.0**-big_s), z("az", at["mid_zero"]),
                               s("bs", mb * 2.0**-big_s), z("bz", t_res.zero), s("cs", 1.0), z("cz", t_out.zero)])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = ox.IR_VERSION
        got = ox.session(model).run(None, {"a": a.astype(np.uint8), "b": rr.astype(np.uint8)})[0]
        assert np.array_equal(got, want), case
        # clamp safety: a conv value beyond mid's range gives the output code its clamped value gives
        s_mid = c["s_mid"]
        lo = t_out.zero if relu else 0
        for conv in (-(at["mid_zero"] + 50) * s_mid, (255 - at["mid_zero"] + 50) * s_mid):
            res_real = (np.arange(t_res.qmax + 1) - t_res.zero) * t_res.scale
            exact = np.clip(np.rint((conv + res_real) / t_out.scale) + t_out.zero, lo, t_out.qmax)
            mid = 0 if conv < 0 else 255
            v = rne_shift((mid - at["mid_zero"]) * at["mid_mult"] + (np.arange(t_res.qmax + 1) - t_res.zero) * mb,
                          big_s)
            assert np.array_equal(np.clip(v + t_out.zero, lo, t_out.qmax), exact), case


@needs_cc
@pytest.mark.parametrize("residual_bits", [None, 8])
def test_output_residual_every_backend_bit_exact(tmp_path, residual_bits):
    """integer_residual: output: the fused onnxruntime model (QLinearConv + QLinearAdd) and the
    ConvInteger one compute the integer model bit for bit, like NumPy and C; also with an 8-bit
    residual stream (integer_residual_bits: 8: the block input is stored at 8 bits, the conv that
    reads it gets it through a requantization to 2 bits)."""
    pytest.importorskip("onnxruntime")
    from lowbit.export import onnx_export as ox
    from lowbit.export.c_export import run_c
    from lowbit.export.int_c import compile_int_c, write_int_c
    from lowbit.export.int_onnx import variants
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
    m = _ready(m, (1, 28, 28), plan={**INT_W2A2, "integer_residual": "output", "integer_residual_bits": residual_bits})
    x = _x(24, (1, 28, 28), seed=3)
    with torch.no_grad():
        y = m(x).numpy()
    g = int_graph(m, x[:1])
    assert sum(op.attrs.get("residual") == "output" for op in g.ops) == 3
    requant = [op for op in g.ops if op.attrs.get("role") == "requant"]
    if residual_bits:
        # the identity block's input (read by its conv1 and its residual add) and the pooled tensor
        # are 8-bit; conv1 reads the block input through the one requantization to 2 bits
        (rq,) = requant
        first = next(op for op in g.ops if op.name == "layers.0.0.conv1")
        assert rq.output == first.inputs[0] and g.tensors[rq.inputs[0]].bits == 8 and g.tensors[rq.output].bits == 2
        assert g.tensors[next(op for op in g.ops if op.kind == "gap").inputs[0]].bits == 8
        assert g.tensors[first.inputs[0]].scale > g.tensors[rq.inputs[0]].scale
        calls = [n.target for n in m._lowbit_state.integer.gm.graph.nodes if n.op == "call_module"]
        assert calls.index("layers.0.0.conv1.input_quantizer") == calls.index("conv1.output_quantizer") + 1
    else:
        assert not requant and all(t.bits in (2, 8) for t in g.tensors.values())
    xn = x.numpy()
    assert np.array_equal(IntReference(g).run(xn).view(np.uint32), y.view(np.uint32))
    ops = set()
    for k, model in variants(g).items():
        if k != "fp32":
            ops |= {n.op_type for n in model.graph.node}
            assert np.array_equal(ox.run(ox.session(model), xn).view(np.uint32), y.view(np.uint32)), k
    assert {"QLinearConv", "QLinearAdd", "ConvInteger"} <= ops
    write_int_c(g, tmp_path / "c")
    assert np.array_equal(run_c(compile_int_c(tmp_path / "c"), xn, 10).view(np.uint32), y.view(np.uint32))
    # the same trained weights with the other residual add: switching the plan is enough (the cached
    # integer network is keyed on it)
    m._lowbit_state.plan.integer_residual = "accumulator"
    with torch.no_grad():
        ya = m(x).numpy()
    ga = int_graph(m, x[:1])
    assert not any(op.attrs.get("residual") == "output" for op in ga.ops)
    assert np.array_equal(IntReference(ga).run(xn).view(np.uint32), ya.view(np.uint32))
    assert not np.array_equal(ya, y)
    with pytest.raises(ConfigError, match="integer_residual is an integer-mode setting"):
        quantize(GroupedNet(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2},
                                "integer_residual": "output"})
    with pytest.raises(ConfigError, match="integer_residual_bits is an integer-mode setting"):
        quantize(GroupedNet(), {"weight": {"name": "sawb", "bits": 2}, "integer_residual_bits": 8})
    with pytest.raises(ConfigError, match="integer_residual_bits"):
        quantize(GroupedNet(), {**INT_W2A2, "integer_residual_bits": 9})
    # the other integer-mode options too (before session 23 accepted silently, changing nothing), except their
    # defaults; a run folder of today's mode that recorded one reads it as its default
    from lowbit.config import saved_config
    from lowbit.plan import Plan

    for k, v in (("integer_init", "max"), ("integer_bias", "coarse"), ("integer_train_mid", True)):
        with pytest.raises(ConfigError, match=f"{k} is an integer-mode setting: set integer: true"):
            quantize(GroupedNet(), {"weight": {"name": "sawb", "bits": 2}, k: v})
        assert saved_config({"plan": {"integer": False, k: v}})["plan"][k] == Plan.model_fields[k].default
    quantize(GroupedNet(), {"weight": {"name": "sawb", "bits": 2}, "integer_init": "lsq", "integer_bias": "fine"})


def test_integer_train_mid_with_the_accumulator_add_is_an_error():
    """Before: integer_train_mid (and integer_mid_range) with integer_residual: accumulator was accepted and changed
    nothing: MidRound models the 8-bit intermediate of the output add only."""
    with pytest.raises(ConfigError, match="integer_train_mid .* takes effect with integer_residual: output"):
        quantize(GroupedNet(), {**INT_W2A2, "integer_residual": "accumulator", "integer_train_mid": True})
    quantize(GroupedNet(), {**INT_W2A2, "integer_residual": "output", "integer_train_mid": True})
    # a run folder that recorded the pair (accepted before) reads as what ran: no mid in training
    from lowbit.config import saved_config

    plan = {**INT_W2A2, "integer_residual": "accumulator", "integer_train_mid": True}
    assert saved_config({"plan": plan})["plan"]["integer_train_mid"] is False


def test_saved_config_turned_integer_gets_the_integer_defaults(tmp_path):
    """A resolved config of a run that is not in integer mode (config.yaml, NCE's derived.yaml, ReLeQ's plans)
    with plan.integer=true is integer mode with its defaults (output add, 8-bit stream), as the source config
    would be; it used to record integer_residual: accumulator and read as the first form."""
    from lowbit.config import load_config

    src = load_config("configs/quickstart.yaml", ["plan.integer=true"]).plan
    saved = tmp_path / "config.yaml"
    saved.write_text(load_config("configs/quickstart.yaml").to_yaml())
    again = load_config(saved, ["plan.integer=true"]).plan
    assert (again.integer_residual, again.integer_residual_bits) == (src.integer_residual, src.integer_residual_bits)
    assert (again.integer_residual, again.integer_residual_bits) == ("output", 8)


def test_integer_defaults_and_run_folders_written_before_them(tmp_path):
    """``integer: true`` alone is the output add with an 8-bit residual stream; ``integer_residual:
    accumulator`` alone is the first form (null bits); an explicit null keeps the conv's bits. A run
    folder (config.yaml, checkpoint) written before the two keys existed is read as the first form,
    while a new config without them gets the defaults; every dumped plan reloads to itself."""
    import torch
    import yaml

    from lowbit.config import load_config
    from lowbit.plan import Plan
    from lowbit.runfolder import check_same_config
    from lowbit.train import load_checkpoint

    W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}
    cases = [({}, None, None), ({"integer": True}, "output", 8),
             ({"integer": True, "integer_residual": "accumulator"}, "accumulator", None),
             ({"integer": True, "integer_residual_bits": None}, "output", None),
             ({"integer": True, "integer_residual": "accumulator", "integer_residual_bits": 8}, "accumulator", 8),
             ({"integer": True, "integer_residual_bits": 4}, "output", 4)]
    for extra, form, bits in cases:
        p = Plan.from_dict({**W2A2, **extra})
        assert (p.integer_residual, p.integer_residual_bits) == (form, bits), extra
        again = Plan.from_dict(p.to_dict())
        assert (again.integer_residual, again.integer_residual_bits) == (form, bits), extra
    # a run folder from before the keys: the first form; the same text as a new config: the defaults
    cfg = {"name": "old", "model": {"name": "resnet8"}, "data": {"limit": 64}, "plan": {**W2A2, "integer": True}}
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    old = load_config(run / "config.yaml", saved=True).plan
    new = load_config(run / "config.yaml").plan
    assert (old.integer_residual, old.integer_residual_bits, old.integer_init, old.integer_bias,
            old.integer_train_mid) == ("accumulator", None, "lsq", "coarse", False)
    assert (new.integer_residual, new.integer_residual_bits, new.integer_init, new.integer_bias,
            new.integer_train_mid, new.integer_mid_range) == ("output", 8, "lsq", "fine", False, "cover")
    # a session 11 run that trained through mid (no integer_mid_range recorded) covered the whole range;
    # without mid in training the range has no effect and reads as the default
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "plan": {**cfg["plan"], "integer_train_mid": True}}))
    assert load_config(run / "config.yaml", saved=True).plan.integer_mid_range == "cover"
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "plan": {**cfg["plan"], "integer_mid_range": "observed"}}))
    assert load_config(run / "config.yaml", saved=True).plan.integer_mid_range == "cover"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # its checkpoint (config recorded without the keys) matches its config.yaml ...
    torch.save({"model": {}, "epoch": 1, "config": cfg}, run / "best.pt")
    load_checkpoint(run / "best.pt", config=load_config(run / "config.yaml", saved=True))
    # ... and re-running it means the first form: the same run; the defaults are another config
    check_same_config(run, load_config(run / "config.yaml", saved=True).to_dict())
    with pytest.raises(ConfigError, match=r"another config \(plan\.integer_bias: 'coarse' -> 'fine'"):
        check_same_config(run, load_config(run / "config.yaml").to_dict())


def test_integer_mode_8bit_quantizers_take_plan_integer_init():
    """The quantizers integer mode adds (network input, 8-bit first/last weights, signed residual
    operands) are LSQ with ``plan.integer_init``; the plan's own quantizers are untouched."""
    import torch

    from lowbit.models import create_model
    from lowbit.quant.uniform import LSQQuantizer
    from lowbit.quantize import quantize

    for init in ("max", "lsq"):
        torch.manual_seed(0)
        m = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=16, width=0.25),
                     {**INT_W2A2, "integer_init": init})
        lsq = [q for q in m.modules() if isinstance(q, LSQQuantizer)]
        assert len(lsq) >= 3 and {q.init for q in lsq} == {init}
        m.train()
        x = torch.randn(8, 1, 16, 16)
        m(x)
        q_in = m.get_submodule("conv1").input_quantizer
        want = float(x.abs().max()) / 127 if init == "max" else 2 * float(x.abs().mean()) / 127 ** 0.5
        assert float(q_in.step.detach()) == pytest.approx(want, rel=1e-5)


def test_onnx_weights_go_uint8_where_int8_kernels_could_saturate():
    """A full-range 8-bit input (integer_init: max) with 8-bit weights up to ±127 at the stem: the
    uint8 x int8 kernels of onnxruntime on AVX2 would saturate int16 pairs, so that layer's weights
    are uint8 (m + 128, zero point 128) and the fused model stays bit-exact; 2-bit layers keep int8."""
    import torch
    from onnx import TensorProto

    from lowbit.export import onnx_export as ox
    from lowbit.export.int_api import onnx_speed_notes
    from lowbit.export.int_onnx import _u8s8_exact, float_layers, uint8_weight_layers, variants
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    assert _u8s8_exact(np.array([64]), 255) and not _u8s8_exact(np.array([-65]), 255) and _u8s8_exact(np.array([127]), 3)
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
    m = _ready(m, (1, 28, 28), plan={**INT_W2A2, "integer_residual": "output", "integer_residual_bits": None,
                                     "integer_init": "max"})
    x = _x(24, (1, 28, 28), seed=3)
    with torch.no_grad():
        y = m(x).numpy()
    g = int_graph(m, x[:1])
    fused = variants(g)["integer_fused"]
    w_type = {i.name.split("__")[0]: i.data_type for i in fused.graph.initializer if i.name.split("__")[0].endswith(".w")}
    stem = next(op for op in g.ops if op.kind == "conv")
    assert np.abs(stem.m()).max() > 64 and g.tensors[stem.inputs[0]].qmax == 255
    assert w_type[stem.name + ".w"] == TensorProto.UINT8
    assert TensorProto.INT8 in w_type.values()  # the 2-bit layers
    # the report names exactly the layers whose weights went as uint8 (the stem and the 8-bit classifier)
    assert {n[:-2] for n, t in w_type.items() if t == TensorProto.UINT8} == set(uint8_weight_layers(g)) >= {stem.name}
    assert float_layers(g) == []
    assert np.array_equal(IntReference(g).run(x.numpy()).view(np.uint32), y.view(np.uint32))
    assert np.array_equal(ox.run(ox.session(fused), x.numpy()).view(np.uint32), y.view(np.uint32))
    u8 = uint8_weight_layers(g)
    notes = onnx_speed_notes({"float_conv_layers": [], "uint8_weight_layers": u8})
    assert len(notes) == 1 and f"{len(u8)} layer(s) ({', '.join(u8)})" in notes[0]


def test_8bit_sawb_weights_are_named_as_split_integer_convs_and_lsq_ones_are_not():
    """8-bit SAWB's levels are odd multiples of half a step (integers up to ±255): no int8 kernel holds them,
    so the integer ONNX runs each such layer as two integer convs (16·hi + lo; float32 Conv before session 22),
    and the export report says which and what to use instead. 8-bit LSQ weights (an int8 grid, the paper's
    init) stay on the fused integer kernels, uint8 x int8."""
    import torch

    from lowbit.export.int_api import onnx_speed_notes
    from lowbit.export.int_onnx import float_layers, uint8_weight_layers
    from lowbit.intmode import int_graph

    x = _x(8, (1, 28, 28), seed=3)
    got = {}
    for w in ({"name": "sawb", "bits": 8}, {"name": "lsq", "bits": 8, "per_channel": True}):
        torch.manual_seed(0)
        m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
        m = _ready(m, (1, 28, 28), plan={"weight": w, "act": {"name": "pact", "bits": 8}, "integer": True})
        g = int_graph(m, x[:1])
        got[w["name"]] = (g, float_layers(g), uint8_weight_layers(g))
    g, fl, u8 = got["sawb"]
    convs = [op.name for op in g.ops if op.kind == "conv"]
    # every SAWB layer; integer mode quantizes the first conv and the classifier by LSQ at 8 bits
    assert fl == [n for n in convs if n not in ("conv1", "fc")] and len(fl) >= 8
    notes = onnx_speed_notes({"float_conv_layers": fl, "uint8_weight_layers": u8})
    assert f"{len(fl)} layer(s) ({', '.join(fl[:3])} and {len(fl) - 3} more)" in notes[0]
    assert "float32 Conv (or, where float32 sums could round, as two ConvInteger" in notes[0]
    assert "(lsq, uniform)" in notes[0]
    # ResNet-8's sums stay below 2^24: float32 convs (exact), and the integer model is computed bit for bit
    from lowbit.export import onnx_export as ox
    from lowbit.export.int_onnx import eff_scales, to_int_onnx
    from lowbit.export.intgraph import IntReference

    mo = to_int_onnx(g, eff_scales(g))
    kinds = [n.op_type for n in mo.graph.node]
    assert kinds.count("Conv") == len(fl) and kinds.count("ConvInteger") == len(convs) - 1 - len(fl)
    assert np.array_equal(ox.run(ox.session(mo), x.numpy()), IntReference(g).run(x.numpy()))
    g, fl, u8 = got["lsq"]
    assert fl == [] and u8 == [] and onnx_speed_notes({"float_conv_layers": fl, "uint8_weight_layers": u8}) == []


@pytest.mark.parametrize("bits", [2, 8])
def test_an_all_zero_weight_row_under_per_channel_steps_is_a_dead_channel(bits):
    """Found by benchmarks/fuzz_integer_export.py (session 22): a conv whose output channel has all-zero weights,
    per-channel SAWB. Its step fell to SAWB's floor, where clip_round raised it and the grid left [-α, α]: 8 bits
    were refused as 'no symmetric integer form', and at 2 bits its ±1 integers over a unit near 0 made the bias
    overflow int32. The channel is now dead (the BatchNorm shift alone), and the integer network is the model."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with torch.no_grad():
        m[0].weight[0].zero_()
    quantize(m, {"weight": {"name": "sawb", "bits": bits, "per_channel": True}, "act": {"name": "pact", "bits": 4},
                 "integer": True, "keep_first": False})
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8))
        m[1].bias[0] = 0.7  # a shift the dead channel passes on
    m.eval()
    x = torch.randn(4, 1, 8, 8)
    g = int_graph(m, x[:1])
    conv = next(op for op in g.ops if op.kind == "conv")
    assert not conv.m()[0].any() and conv.m()[1].any()  # channel 0: integer weights 0
    with torch.no_grad():
        y = m(x).numpy()
    assert np.array_equal(y, IntReference(g).run(x.numpy()))
    codes = IntReference(g).tensors(x.numpy())[conv.output]
    assert np.unique(codes[:, 0]).size == 1 and codes[0, 0, 0, 0] > 0  # the constant code of the 0.7 shift
    # the classifier's row 0 all zero (fuzz seed 2213): its logit is the bias alone
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        m[3].weight[0].zero_()
        m[3].bias[0] = 0.5
    quantize(m, {"weight": {"name": "sawb", "bits": bits, "per_channel": True}, "act": {"name": "pact", "bits": 8},
                 "integer": True, "keep_last": False})
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 1, 8, 8) * 4)
    m.eval()
    g = int_graph(m, x[:1])
    assert not g.ops[-1].m()[0].any()
    with torch.no_grad():
        y = m(x).numpy()
    assert np.array_equal(y, IntReference(g).run(x.numpy())) and np.allclose(y[:, 0], 0.5, rtol=2**-20)


def test_a_pruned_filter_in_a_hidden_linear_is_a_dead_channel():
    """Fuzz seed 822 (replayed): a hidden linear of 432 inputs, 5-bit per-channel SAWB, row 0 all zero (a pruned
    filter) and a BatchNorm shift of −2.6. The row's ±1 integers at SAWB's floor step could still move an 8-bit
    output by 7e-4 of a code, above the 2^-12 criterion, and the bias overflowed int32. An all-zero latent row is
    now dead whatever its step."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 6 * 6, 16),
                      nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        m[3].weight[0].zero_()
    quantize(m, {"weight": {"name": "sawb", "bits": 5, "per_channel": True},
                 "act": {"name": "pact", "bits": 8, "init": 1.0}, "integer": True, "keep_first": False})
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 1, 6, 6))
        m[4].bias[0] = -2.6
    m.eval()
    x = torch.rand(4, 1, 6, 6)
    g = int_graph(m, x[:1])
    fc0 = [op for op in g.ops if op.kind == "conv"][1]
    assert not fc0.m()[0].any() and fc0.m()[1:].any()
    with torch.no_grad():
        assert np.array_equal(m(x).numpy(), IntReference(g).run(x.numpy()))


@pytest.mark.parametrize("between", ["identity", "dropout"])
def test_identity_or_dropout_between_a_conv_and_its_relu(between):
    """Found while reducing a fuzzer case: conv -> Identity/Dropout -> ReLU was refused at quantize() ('ReLU ...
    is not supported; supported: ... Identity, Dropout'). The conv's unit now looks through them (eval's identity;
    training keeps the dropout)."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    mid = {"identity": nn.Identity(), "dropout": nn.Dropout(0.1)}[between]
    torch.manual_seed(0)
    m = _ready(nn.Sequential(nn.Conv2d(1, 4, 3), mid, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (1, 8, 8),
               plan=INT_W2A2)
    x = _x(4, (1, 8, 8))
    g = int_graph(m, x[:1])
    assert [op.kind for op in g.ops] == ["quant_in", "conv", "flatten", "conv"] and g.ops[1].attrs["relu"]
    with torch.no_grad():
        assert np.array_equal(m(x).numpy(), IntReference(g).run(x.numpy()))


def test_a_bias_beyond_int32_names_the_collapsed_step():
    """A layer whose input step collapsed (an activation quantizer that started on a constant tensor) cannot hold its
    BatchNorm shift in int32: the error says which factor of the accumulator unit is off."""
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = _ready(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
               (1, 8, 8), plan=INT_W2A2)
    with torch.no_grad():
        m[1].bias.fill_(5e7)  # a huge shift: the same overflow a collapsed input step gives
    with pytest.raises(ConfigError, match=r"^integer mode: layer '0': channel 0's bias does not fit the int32 "
                                          r"accumulator: shift 5e\+07 over an accumulator unit of .* \(weight step .* x "
                                          r"input step .* x BatchNorm scale .*\); a step that collapsed"):
        int_graph(m, _x(1, (1, 8, 8)))


def test_split_int8_is_exact_within_int8():
    from lowbit.export.int_onnx import split_int8

    m = np.arange(-2047, 2048).reshape(1, -1)
    hi, lo = split_int8(m)
    assert np.array_equal(16 * hi + lo, m) and lo.min() == -8 and lo.max() == 7 and np.abs(hi).max() <= 128
    hi, lo = split_int8(np.arange(-255, 256))
    assert np.abs(hi).max() == 16  # 8-bit SAWB: 2·255·16 < 2^15, exact on the uint8 x int8 kernel without VNNI
    with pytest.raises(ValueError):
        split_int8(np.array([2048]))


def test_onnx_sums_beyond_2_24_are_exact_and_an_inexact_onnx_model_fails_the_export(tmp_path):
    """Found by benchmarks/fuzz_integer_export.py: a classifier of 4096 inputs with 8-bit SAWB weights near ±255
    sums beyond 2^24, where the float32 Conv/MatMul of sessions 9-21 rounded: the ONNX logits differed and no
    check failed. The ONNX model is now exact, and failed_checks holds the exact variants to it."""
    import onnx

    from lowbit.export.api import failed_checks
    from lowbit.export.int_api import export_int_model

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, padding=1)
            self.fc = nn.Linear(16 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    torch.manual_seed(0)
    m = Wide()
    with torch.no_grad():
        m.conv.weight.abs_()
        m.fc.weight.copy_(torch.rand_like(m.fc.weight) * 0.5 + 0.5)
    quantize(m, {"weight": {"name": "sawb", "bits": 8}, "act": {"name": "pact", "bits": 8, "init": 1.0},
                 "integer": True, "keep_first": False, "keep_last": False})
    gen = torch.Generator().manual_seed(0)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 1, 16, 16, generator=gen) + 1.0)
    m.eval()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) + 1.0
    r = export_int_model(m, x, tmp_path / "wide", formats=("packed", "onnx"), latency_repeats=0, calib=8)
    o = r["onnx"]
    assert o["float_conv_layers"] == ["conv", "fc"] and o["exact"] == ["integer", "integer_fused"]
    kinds = [n.op_type for n in onnx.load(str(tmp_path / "wide" / "onnx" / "model_integer.onnx")).graph.node]
    assert kinds.count("Conv") == 1 and kinds.count("MatMulInteger") == 2  # fc's sums pass 2^24: split
    assert o["integer"]["max_logit_diff"] == 0 and o["integer_fused"]["max_logit_diff"] == 0
    assert r["failed_checks"] == []
    bad = {**r, "onnx": {**o, "integer": {**o["integer"], "max_logit_diff": 64.0, "mismatches": 1}}}
    assert failed_checks(bad) == ["ONNX (ConvInteger) logits differ from PyTorch's (max |Δ| 64, 1/8 predictions "
                                  "differ)"]


def test_weight_prescale_makes_the_bias_fine_within_int8_and_float32_limits():
    from lowbit.export.intgraph import weight_prescale

    sawb2 = np.array([[-3, -1, 1, 3]])
    # 2-bit weights, a unit of 0.34 output codes: k = 5 (0.34/32 <= 2^-6), also the int8 limit (3·32 = 96)
    assert weight_prescale(sawb2, np.array([0.34]), 1.0, 9, 3, 3) == 5
    assert weight_prescale(sawb2, np.array([0.2]), 1.0, 9, 3, 3) == 4  # 0.2/16 <= 2^-6 < 0.2/8
    assert weight_prescale(sawb2, np.array([0.01, -0.005]), 1.0, 9, 3, 3) == 0  # already fine
    assert weight_prescale(sawb2, np.array([1e-4]), None, 9, 3, 3) == 5  # float output: as large as allowed
    assert weight_prescale(np.arange(-8, 8)[None], np.array([10.0]), 1.0, 9, 15, 15) == 4  # -8·16 = -128
    # an 8-bit input: onnxruntime's uint8 x int8 kernel stays exact (2·255·10·4 <= 32767 < 2·255·10·8)
    assert weight_prescale(np.array([[-10, 10]]), np.array([10.0]), 1.0, 9, 255, 255) == 2
    # ... unless it was not exact anyway (then int8 alone limits: 100 cannot double)
    assert weight_prescale(np.array([[-100, 100]]), np.array([10.0]), 1.0, 9, 255, 255) == 0
    # the largest accumulator stays below 2^24, exact in float32 (2^20·3·3 < 2^24 <= 2·2^20·3·3)
    assert weight_prescale(sawb2, np.array([10.0]), 1.0, 2**20, 3, 3) == 0
    assert weight_prescale(np.zeros((1, 4), np.int64), np.array([10.0]), 1.0, 9, 3, 3) == 0


def test_fine_bias_integer_network_is_closer_to_the_float_graph_it_trained():
    """plan.integer_bias: fine (the default) scales each layer's integer weights by 2^k so the
    folded BatchNorm shift is kept to 1/128 output code; coarse rounds it to whole units of the
    unscaled accumulator (a third of a 2-bit code and more). Same trained weights, both evaluated:
    fine differs from the fake-quantized float graph in far fewer codes, every requantized conv's
    unit is at most 2^-6 codes unless int8 stops it, and eval is still the integer network."""
    from lowbit.export.intgraph import FINE_UNIT, IntReference
    from lowbit.export.requant import real_multiplier
    from lowbit.intmode import code_agreement, int_graph

    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
               plan={k: v for k, v in INT_W2A2.items() if k != "integer_residual"})
    assert m._lowbit_state.plan.integer_bias == "fine"
    x = _x(32, (1, 28, 28), seed=5)
    differ = {}
    for bias in ("coarse", "fine"):
        m._lowbit_state.plan.integer_bias = bias
        g = int_graph(m, x[:1])
        with torch.no_grad():
            assert np.array_equal(m(x).numpy().view(np.uint32), IntReference(g).run(x.numpy()).view(np.uint32))
        low = [f for bits, f, _ in code_agreement(m, x, g).values() if bits == 2]
        differ[bias] = float(np.mean(low))
        units = {op.name: (float(np.abs(real_multiplier(op.mult, op.shift)).max()), int(np.abs(op.lut).max()))
                 for op in g.ops if op.kind == "conv" and op.mult is not None and op.attrs.get("role") != "requant"}
        if bias == "coarse":
            assert max(u for u, _ in units.values()) > 0.25  # some 2-bit layers' units are that coarse
        else:
            assert all(u <= FINE_UNIT or 2 * top > 127 for u, top in units.values()), units
            # SAWB 2-bit integer weights -3, -1, 1, 3, times 2^k (k <= 5: int8)
            lut = {tuple(np.unique(op.lut)) for op in g.ops if op.kind == "conv" and op.wbits == 2}
            assert len(lut) > 1 and all(len(v) == 4 and v[2] == -v[1] and v[3] == 3 * v[2]
                                        and v[2] in (1, 2, 4, 8, 16, 32) for v in lut), lut
    assert differ["fine"] < 0.5 * differ["coarse"], differ


def test_train_mid_rounds_residual_convs_as_the_integer_network_does():
    """plan.integer_train_mid (an option with the output add): training rounds each residual conv's
    output to the integer network's 8-bit intermediate mid (straight-through gradient), so the float
    graph's residual sums match the integer codes; without it they differ wherever mid is coarser
    than the output step (8-bit residual streams)."""
    from lowbit.intmode import MidRound, code_agreement, int_graph

    from lowbit.export.intgraph import mid_step, residual_output_constants

    shape = (1, 16, 16)
    x = _x(32, shape, seed=5)
    differ, steps = {}, {}  # steps: residual conv -> (mid's step with the observed range, covering all)
    for mid, rng in ((False, "cover"), (True, "cover"), (True, "observed")):
        torch.manual_seed(0)
        m = _ready(create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25), shape,
                   plan={**{k: v for k, v in INT_W2A2.items() if k != "integer_residual"}, "integer_train_mid": mid,
                         "integer_mid_range": rng}, passes=2, batch=8)
        g = int_graph(m, x[:1])
        residual_convs = {op.name for op in g.ops if op.attrs.get("residual") == "output"}
        rounds = {n.rsplit(".", 1)[0]: mod for n, mod in m.named_modules() if isinstance(mod, MidRound)}
        assert set(rounds) == (residual_convs if mid else set()) and len(residual_convs) > 3
        if rng == "observed":  # training kept each residual conv's range; eval does not move it
            # mid covering only that range: never a coarser grid than covering the whole range, a finer one
            # somewhere (the same tensors' steps)
            for op in g.ops:
                if op.name in residual_convs:
                    cover = residual_output_constants(g.tensors[op.output], op.attrs["relu"],
                                                      g.tensors[op.inputs[1]], op.name)["s_mid"]
                    steps[op.name] = (mid_step(op, g.tensors[op.output]), cover)
            assert all(a <= c for a, c in steps.values()) and any(a < c for a, c in steps.values()), steps
            seen = {k: r.observed() for k, r in rounds.items()}
            assert all(v is not None and v[0] < 0 < v[1] for v in seen.values()), seen
            with torch.no_grad():
                m(x)
                m._lowbit_state.integer.gm(x)
            assert {k: r.observed() for k, r in rounds.items()} == seen
        adds = [g.ops[[op.name for op in g.ops].index(n)].output for n in residual_convs]
        agree = code_agreement(m, x, g)
        differ[rng if mid else None] = float(np.mean([agree[t][1] for t in adds if agree[t][0] == 8]))
        if mid:  # the gradient passes mid straight through to the residual conv's weights
            m.train()
            nn.functional.cross_entropy(m(x[:8]), torch.arange(8)).backward()
            conv = m.get_submodule(sorted(residual_convs)[0])
            assert conv.parametrizations.weight.original.grad.abs().sum() > 0
            m.zero_grad()
            m.eval()
    # what still differs with mid is carried from upstream code flips (2-bit layers), not made here
    assert differ["cover"] < 0.1 * differ[None] and differ["observed"] < 0.1 * differ[None], differ


def test_frozen_batchnorm_training_computes_the_float_graph_the_integer_network_is():
    """train.freeze_bn_after: with BatchNorm frozen, integer mode's training forward is the float graph
    on running statistics (bit for bit), whose codes the integer network computes (how closely:
    test_fine_bias_..., test_train_mid_...); with batch statistics it is another function."""
    from lowbit.fit import FitState, FreezeBatchNorm

    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
               plan={k: v for k, v in INT_W2A2.items() if k != "integer_residual"})
    x = _x(32, (1, 28, 28), seed=5)
    gm = m._lowbit_state.integer.gm
    with torch.no_grad():
        float_graph = gm(x)  # eval: BatchNorm on running statistics
        m.train()
        FreezeBatchNorm(0).on_step(FitState(m, None, None, None, 1, 1, torch.device("cpu")), 0)
        frozen = m(x)
        m.train()
        batch_stats = m(x)  # (and updates the running statistics: last)
    m.eval()
    assert torch.equal(frozen, float_graph) and not torch.allclose(batch_stats, float_graph, atol=1e-2)


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnxruntime_own_int8_reference_is_per_tensor_or_per_channel(tmp_path, per_channel):
    """The speed reference ``quantize_static_onnx``: one weight scale, or one per output channel."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.export.int_onnx import quantize_static_onnx

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 2, 3, 3)) * np.array([1, 10, 100]).reshape(3, 1, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [numpy_helper.from_array(w, "w")])
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q = quantize_static_onnx(fp32, rng.standard_normal((4, 2, 5, 5)).astype(np.float32), tmp_path / "f.onnx",
                             tmp_path / "q.onnx", per_channel=per_channel)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    wq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
          and inits[n.input[0]].dtype == np.int8]
    assert len(wq) == 1
    scale = inits[wq[0].input[1]]
    if per_channel:  # each channel's scale follows its own range: 1, 10, 100
        assert scale.shape == (3,) and scale[2] / scale[0] > 30
    else:
        assert scale.size == 1


class RGBNet(nn.Module):
    """Three input channels, each normalised with its own mean and std (CIFAR-like)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@needs_cc
@pytest.mark.parametrize("in_bits", [8, 2])
def test_raw_pixels_in_numpy_and_c_give_the_logits_of_the_normalised_image(tmp_path, in_bits):
    """lowbit_predict_pixels[_hwc]: a device feeds raw uint8 pixels and gets, bit for bit, the logits of the
    normalised float image: a table per channel (pixel_table) folds (p/255 - mean)/std and the input quantizer."""
    from lowbit.data.transforms import normalize, pixels_of
    from lowbit.export.c_export import run_c
    from lowbit.export.int_c import compile_int_c, write_int_c
    from lowbit.export.intgraph import IntReference, pixel_codes, pixel_table
    from lowbit.intmode import int_graph

    # in_bits 2: the plan quantizes the first conv too (its input codes are packed four to a byte)
    plan = {**INT_W2A2, "act": {"name": "pact", "bits": 2, "init": 2.0}, "keep_first": in_bits == 8}
    m = _ready(RGBNet(), (3, 10, 10), plan=plan, passes=10)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    px = torch.randint(0, 256, (12, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    px[0], px[1] = 0, 255  # both ends of the pixel range
    x = normalize(px, torch.tensor(mean), torch.tensor(std))
    assert torch.equal(pixels_of(x, mean, std), px)  # the export recovers the pixels of its normalised test images
    assert pixels_of(x + 1e-3, mean, std) is None
    g = int_graph(m, x[:1])
    with pytest.raises(ConfigError, match="no input normalisation recorded"):
        pixel_table(g)
    g.meta = {"input_normalisation": {"mean": list(mean), "std": list(std)}}
    ref = IntReference(g)
    want = ref.run(x.numpy())
    t = pixel_table(g)
    assert t.shape == (3, 256) and t.dtype == np.uint8
    assert g.tensors[g.input].bits == in_bits
    assert len(np.unique(t[0])) > (8 if in_bits == 8 else 2) and not np.array_equal(t[0], t[2])  # per channel
    assert np.array_equal(pixel_codes(g, px.numpy()), ref.input_codes(x.numpy()))
    assert np.array_equal(ref.run_pixels(px.numpy()).view(np.uint32), want.view(np.uint32))
    write_int_c(g, tmp_path / "c")
    assert "lowbit_predict_pixels_hwc" in (tmp_path / "c" / "model.h").read_text()
    exe = compile_int_c(tmp_path / "c")
    for got in (run_c(exe, x.numpy(), 10), run_c(exe, px.numpy(), 10, pixels="chw"),
                run_c(exe, px.numpy().transpose(0, 2, 3, 1), 10, pixels="hwc")):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # one-line errors: not uint8, wrong shape, a normalisation of the wrong width
    with pytest.raises(ConfigError, match="pixels must be uint8"):
        pixel_codes(g, x.numpy())
    with pytest.raises(ConfigError, match=r"expected \(N, 3, 10, 10\)"):
        pixel_codes(g, px.numpy()[:, :1])
    g.meta = {"input_normalisation": {"mean": [0.5], "std": [0.25]}}
    with pytest.raises(ConfigError, match="1 means / 1 stds for 3 input channels"):
        pixel_table(g)
    g.meta = {}
    write_int_c(g, tmp_path / "c2")  # without a normalisation: the float and code entry points only
    assert "lowbit_predict_pixels" not in (tmp_path / "c2" / "model.h").read_text()
    compile_int_c(tmp_path / "c2")


def test_an_integer_run_folder_through_info_and_export(tmp_path, capsys):
    """lowbit info on an integer-mode run shows the integer package lowbit export writes (before session 21: the
    float-mode package, another size, with BatchNorm "kept"), and lowbit export writes only the formats asked for."""
    from pathlib import Path

    from lowbit import cli
    from lowbit.config import load_config
    from lowbit.train import run

    cfg = load_config(Path(__file__).parent.parent / "configs" / "w2a2_integer.yaml",
                      ["model.width=0.25", "data.limit=300", "train.epochs=1", "train.batch_size=100",
                       "train.progress=false", "train.threads=1"])
    run(cfg, tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "run")]) == 0
    info = capsys.readouterr().out
    assert "(BN kept)" not in info and "conv1" in info and "requantize" in info
    size = int(info.split("integer package ")[1].split(" B")[0].replace(",", ""))
    assert cli.main(["export", str(tmp_path / "run"), "--format", "packed", "--limit", "20", "--out",
                     str(tmp_path / "export")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["packed"]
    assert (tmp_path / "export" / "packed" / "model.safetensors").stat().st_size == size
    # the package names the weights it holds: best.pt's epoch and checksum (session 28)
    import torch

    from lowbit.export.intgraph import load_int_package

    meta = load_int_package(tmp_path / "export" / "packed").meta
    assert meta["epoch"] == 1 and meta["checkpoint_sha256"] == torch.load(tmp_path / "run" / "best.pt",
                                                                           weights_only=True)["sha256"]


def test_the_integer_reference_refuses_bad_inputs_in_one_line(resnet_int):
    """One image without its batch dimension, an empty batch, NaN, and input codes beyond the input's bits: one-line
    errors (before session 21 a misleading shape message, a NumPy concatenate error, and silent logits)."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    x = _x(2, (1, 28, 28), seed=3).numpy()
    ref = IntReference(int_graph(resnet_int, torch.from_numpy(x[:1])))
    with pytest.raises(ConfigError, match=r"input shape \(1, 28, 28\) is one image: give a batch \(N, 1, 28, 28\)"):
        ref.run(x[0])
    with pytest.raises(ConfigError, match=r"input shape \(2, 28, 28\): expected a batch \(N, 1, 28, 28\)"):
        ref.run(x[:, 0])
    with pytest.raises(ConfigError, match="input batch is empty"):
        ref.run(x[:0])
    bad = x.copy()
    bad[1, 0, 3, 4] = np.nan
    with pytest.raises(ConfigError, match="input has 1 NaN or infinite values"):
        ref.run(bad)
    codes = ref.input_codes(x)
    assert np.array_equal(ref.run(codes, codes=True), ref.run(x))
    with pytest.raises(ConfigError, match=rf"input codes must be in 0\.\.255, got {codes.min()}\.\.256"):
        ref.run(np.where(codes == codes.max(), 256, codes), codes=True)


@needs_cc
def test_the_generated_host_program_checks_its_arguments(resnet_int, tmp_path):
    """main.c of the C export: N must be a whole number above 0 and INPUT must hold exactly N inputs (before
    session 21, N = abc exited 0 with no output and 32x32 images were read as 28x28 chunks)."""
    from lowbit.export.int_api import export_int_model
    from lowbit.export.int_c import compile_int_c

    x = _x(2, (1, 28, 28), seed=3)
    export_int_model(resnet_int, x, tmp_path, formats="c", c_images=None)
    exe = compile_int_c(tmp_path / "c")
    good = tmp_path / "x.f32"
    x.numpy().astype(np.float32).tofile(good)
    big = tmp_path / "big.f32"
    np.zeros((2, 1, 32, 32), np.float32).tofile(big)

    def run(*args):
        r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
        return r.returncode, r.stderr.strip()

    assert run(good, 2, tmp_path / "y.f32") == (0, "")
    assert np.fromfile(tmp_path / "y.f32", np.float32).shape == (20,)
    for n in ("abc", "-1", "0", "2x"):
        assert run(good, n, tmp_path / "y.f32") == (2, "N must be a whole number above 0")
    assert run(big, 2, tmp_path / "y.f32") == (2, f"{big} holds 8192 bytes, not 2 inputs of 3136 bytes (wrong N or "
                                                  "image size?)")
    assert run(good, 3, tmp_path / "y.f32")[1].startswith(f"{good} holds 6272 bytes, not 3 inputs")
    assert run(tmp_path / "missing.f32", 1, tmp_path / "y.f32") == (2, f"cannot open {tmp_path / 'missing.f32'}")
    code, err = run("--bad")  # (this package records no input normalisation: no pixel entry points to name)
    assert code == 2 and err == f"usage: {exe} [INPUT.f32 N OUTPUT.f32]"


def test_onnx_files_say_what_they_expect_and_store_weights_as_raw_bytes():
    """Session 24 (a consumer's audit): every ONNX file carries its input's layout and normalisation, the output,
    the quantizers and lowbit's version in metadata_props; integer weights are raw bytes, one per int8 (as varint
    int32_data they took ~5.5 bytes each: the integer files were 3.5x larger than needed)."""
    import json

    import torch
    from onnx import TensorProto

    from lowbit.export import onnx_export as ox
    from lowbit.export.int_onnx import eff_scales, to_fp32_onnx, variants
    from lowbit.intmode import int_graph

    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
               plan=INT_W2A2)
    x = _x(8, (1, 28, 28), seed=3)
    g = int_graph(m, x[:1])
    g.meta = {"input_normalisation": {"mean": [0.25], "std": [0.5]}, "dataset": "fashion-mnist", "classes": 10,
              "weight": "sawb2", "act": "pact2"}
    models = {**variants(g), "fp32": to_fp32_onnx(g, eff_scales(g))}
    for name, model in models.items():
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["input_mean"]) == [0.25] and json.loads(props["input_std"]) == [0.5], name
        assert "(pixel / 255 - mean) / std" in props["input"] and props["input"].startswith(g.input + "__in:")
        assert props["classes"] == "10" and props["weight"] == "sawb2" and props["lowbit_version"]
        assert "logits N x 10" in props["output"] and model.doc_string.startswith("lowbit ")
    assert "com.microsoft" in {p.key: p.value for p in models["integer_fused"].metadata_props}["runtime"]
    ints = [i for i in models["integer"].graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    assert ints and all(i.raw_data and not i.int32_data for i in ints)
    biggest = max(ints, key=lambda i: len(i.raw_data))
    assert len(biggest.raw_data) == int(np.prod(biggest.dims))  # one byte per weight
    with torch.no_grad():  # still the same network, bit for bit
        y = m(x).numpy()
    assert np.array_equal(ox.run(ox.session(models["integer"]), x.numpy()).view(np.uint32), y.view(np.uint32))


@pytest.mark.parametrize("rule", ["mul_clip", "clip_div"])
def test_onnx_input_codes_are_the_quantizers_own_even_at_half_steps(rule):
    """The integer ONNX files quantize the float input by the quantizer's own float32 rule: QuantizeLinear's x/s
    (before session 24) gave another code than x·(1/s) for 19 % of inputs placed at half steps, and other
    logits. ``clip_div``: the input quantizer set to PACT 8 on the stem (plan.layers)."""
    import torch

    from lowbit.export import onnx_export as ox
    from lowbit.export.int_onnx import variants
    from lowbit.intmode import int_graph

    plan = {**INT_W2A2, "integer_residual": "output"}
    if rule == "clip_div":
        plan["layers"] = {"conv1": {"act": {"name": "pact", "bits": 8}}}
    torch.manual_seed(0)
    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
               plan=plan)
    g = int_graph(m, _x(1, (1, 28, 28)))
    a = g.ops[0].act
    assert a.rule == rule
    k = np.random.default_rng(0).integers(0, a.qmax - a.qmin, size=(16, 1, 28, 28))
    x = ((k + a.qmin + 0.5) * np.float32(a.step) + np.float32(a.lo if rule == "clip_div" else 0)).astype(np.float32)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
    for name in ("integer", "integer_fused"):  # the two exact forms (the FP32 twin is float)
        assert np.array_equal(ox.run(ox.session(variants(g)[name]), x).view(np.uint32), y.view(np.uint32)), name


@needs_cc
def test_the_runtime_is_compiled_once_per_process_and_flags(resnet_int, tmp_path, monkeypatch):
    """compile_int_c compiles lowbit_rt.c (the same package files in every export, 90 % of a build) once per
    compiler and flags and links that object: the same program, bit for bit; an edited runtime copy is compiled
    again."""
    import subprocess

    from lowbit.export.c_export import run_c
    from lowbit.export.int_c import compile_int_c, write_int_c
    from lowbit.intmode import int_graph

    monkeypatch.setenv("LOWBIT_CFLAGS", "-DLB_TEST_RT_CACHE")  # flags of this test alone: a fresh cache entry
    x = _x(4, (1, 28, 28))
    g = int_graph(resnet_int, x[:1])
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, *a, **k: (calls.append(list(map(str, cmd))), real(cmd, *a, **k))[1])
    exes = []
    for k in range(3):
        write_int_c(g, tmp_path / f"c{k}")
        if k == 2:  # an edited copy of the runtime
            with open(tmp_path / "c2" / "lowbit_rt.c", "a") as f:
                f.write("\n/* edited */\n")
        exes.append(compile_int_c(tmp_path / f"c{k}"))
    rt = [c for c in calls if "lowbit_rt.c" in c]
    assert len(rt) == 2, rt  # the first build and the edited copy's
    assert exes[0].read_bytes() == exes[1].read_bytes()
    with torch.no_grad():
        y = resnet_int(x).numpy()
    for exe in exes:
        assert np.array_equal(run_c(exe, x.numpy(), 10).view(np.uint32), y.view(np.uint32))


def test_integer_network_is_the_same_under_autocast():
    """The integer network computes its accumulators exactly whatever the caller's context: integer-mode eval and
    IntReference under torch.autocast give the logits they give outside it, bit for bit. Before session 29 the
    reference's float32 convs (exact integer sums) ran in bfloat16 under autocast: integer-mode evaluation (the
    validation accuracy that picks the best epoch, a fit wrapped in autocast) computed another network, and an
    export under autocast reported mismatches with the NumPy package that were not there."""
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    m = _ready(create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25), (1, 8, 8),
               plan={"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}, "integer": True})
    x = _x(16, (1, 8, 8), seed=5)
    g = int_graph(m, x[:1])
    want = IntReference(g).run(x.numpy())
    with torch.no_grad():
        assert np.array_equal(m(x).numpy(), want)  # builds and caches the integer network outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x).numpy()
            ref = IntReference(g).run(x.numpy())
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(ref.view(np.uint32), want.view(np.uint32))
