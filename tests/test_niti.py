"""NITI integer-only training (lowbit.methods.niti, lowbit.ondevice.intops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit.data import BatchLoader, load_dataset
from lowbit.errors import ConfigError
from lowbit.methods.niti import integer_evaluate, integer_forward
from lowbit.ondevice import intops
from lowbit.ondevice.intops import IntT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAN = {"weight": {"name": "pow2int", "bits": 8}, "keep_first": False, "keep_last": False,
        "method": {"name": "niti"}}


def niti_model(name="vgg_small", bits=8, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"width": 0.125, **kw} if name == "vgg_small" else {"width": 0.25, **kw}
    m = lowbit.create_model(name, in_channels=1, num_classes=10, image_size=8, batch_norm=False, bias=False, **kw)
    return lowbit.quantize(m, {**PLAN, "weight": {"name": "pow2int", "bits": bits}})


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    train = [b for _, b in zip(range(12), BatchLoader(d.train, d.info, 64, shuffle=True, seed=0))]
    return train, BatchLoader(d.test, d.info, 400)


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every tensor an aten op reads or writes."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.seen.setdefault(str(t.dtype), set()).add(func.__name__)
        return out


def test_integer_step_touches_only_integer_tensors(digits):
    m = niti_model("resnet8")  # convs, strided 1x1 shortcuts, residual adds, pooling, linear
    method = lowbit.quant_state(m).method
    method.setup(m, 10, 10)
    x, y = digits[0][0]
    xi = intops.from_float(x[:16])
    y = y[:16]  # the data arriving (outside the step)
    before = [p.code.clone() for p in m.modules() if hasattr(p, "code")]
    with DtypeRecorder() as rec:
        method.integer_step(m, xi, y)
    ints = {"torch.int8", "torch.int16", "torch.int32", "torch.int64", "torch.bool"}
    assert set(rec.seen) <= ints, {k: sorted(v)[:5] for k, v in rec.seen.items() if k not in ints}
    assert "torch.int32" in rec.seen and "torch.int8" in rec.seen
    after = [p.code for p in m.modules() if hasattr(p, "code")]
    assert all(a.dtype == torch.int8 for a in after)
    assert sum(int((a != b).sum()) for a, b in zip(after, before)) > 0  # the step updated weights


def test_niti_steps_lower_the_loss_and_float_twin_matches(digits):
    train, test = digits
    m = niti_model("vgg_small")
    x, y = next(iter(test))
    loss0 = F.cross_entropy(m(x), y).item()
    hist = lowbit.fit(m, train, epochs=2)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] < 2.5
    assert F.cross_entropy(m(x), y).item() < loss0 - 0.3
    assert integer_evaluate(m, test)["acc"] > 0.4  # chance is 0.1
    # the float twin (what evaluate/export see) is code * 2^e exactly; integer and float forward agree
    for mod in m.modules():
        if hasattr(mod, "code"):
            assert torch.equal(mod(mod.code.float()), mod.code.float() * 2.0 ** int(mod.exp))
    agree = (integer_forward(m, x).q.argmax(1) == m(x).argmax(1)).float().mean().item()
    assert agree > 0.9


def test_stochastic_rounding_is_unbiased_on_a_hand_case():
    g = torch.Generator().manual_seed(0)
    # 5 / 4 = 1.25 and -5 / 4 = -1.25: round to 1/2 (or -2/-1) with probabilities 3/4, 1/4
    x = torch.tensor([5, -5, 6, -7], dtype=torch.int32).repeat(20000, 1)
    r = intops.stochastic_shift(x, 2, g).double().mean(0)
    assert torch.allclose(r, torch.tensor([1.25, -1.25, 1.5, -1.75], dtype=torch.float64), atol=0.02)
    assert set(intops.stochastic_shift(x, 2, g)[:, 0].unique().tolist()) == {1, 2}
    # round to nearest: ties up
    assert intops.round_shift(torch.tensor([5, 6, -6, -5]), 2).tolist() == [1, 2, -1, -1]
    # NITI's pseudo-stochastic rounding (upper half of the dropped bits vs the lower half) is not
    # unbiased: over all remainders it rounds up with mean E[hi]/2^(s/2) instead of E[r]/2^s, low by
    # (2^-(s/2) - 2^-s)/2 (0.094 units at s = 4, 0.016 at s = 10: small for a gradient's 10+ dropped bits)
    for s in (4, 10):
        v = torch.arange(-(1 << (s + 3)), 1 << (s + 3), dtype=torch.int64)
        bias = intops.pseudo_stochastic_shift(v, s).double().mean().item() - v.double().mean().item() / 2**s
        assert bias == pytest.approx(-(2.0 ** -(s / 2) - 2.0**-s) / 2, abs=1e-9)


def test_integer_conv_gradients_equal_float_autograd():
    g = torch.Generator().manual_seed(1)
    for stride, pad, k, h in ((1, 1, 3, 7), (2, 1, 3, 8), (2, 0, 1, 7)):
        x = torch.randint(-5, 6, (2, 3, h, h), generator=g).to(torch.int8)
        w = torch.randint(-5, 6, (4, 3, k, k), generator=g).to(torch.int8)
        xf, wf = x.double().requires_grad_(), w.double().requires_grad_()
        out = F.conv2d(xf, wf, stride=stride, padding=pad)
        assert torch.equal(intops.conv_forward(x, w, stride, pad).double(), out.detach())
        err = torch.randint(-5, 6, out.shape, generator=g).to(torch.int8)
        out.backward(err.double())
        assert torch.equal(intops.conv_input_error(err, w, x.shape, stride, pad).double(), xf.grad)
        assert torch.equal(intops.conv_weight_grad(x, err, k, stride, pad).double(), wf.grad)


def test_integer_ce_error_follows_softmax_minus_onehot():
    z = torch.tensor([[40, 10, -20, 0], [0, 0, 0, 0]], dtype=torch.int8)
    err = intops.ce_error(IntT(z, -4), torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    ref = torch.softmax(z.double() * 2.0**-4, 1) - F.one_hot(torch.tensor([1, 2]), 4)
    got = err.q.double() * 2.0**err.e
    assert torch.allclose(got, ref, atol=0.06)  # base-2 softmax with integer floors: close, not equal
    assert (got.sign() == ref.sign()).all()


def test_ce_error_of_tiny_logits_is_the_uniform_softmax():
    # logits q·2^e with e far below -7 (a layer dead for the batch: the exponent falls by every later layer's
    # weight exponent): softmax(z) = 1/C to 8 bits. 2^(1-2e) overflowed int64 (e <= -26: a wrong error signal;
    # e <= -32: OverflowError in the step)
    y = torch.tensor([3, 1])
    q = torch.randint(-5, 6, (2, 10), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    want = intops.ce_error(IntT(q, -20), y, torch.Generator().manual_seed(0)).q
    for e in (-26, -31, -40):
        got = intops.ce_error(IntT(q, e), y, torch.Generator().manual_seed(0)).q
        assert (got.int() - want.int()).abs().max() <= 1, (e, got.tolist())


def test_four_bit_weights_stay_on_the_grid(digits):
    m = niti_model("vgg_small", bits=4)
    lowbit.fit(m, digits[0][:4], epochs=1)
    codes = torch.cat([mod.code.flatten() for mod in m.modules() if hasattr(mod, "code")])
    assert codes.abs().max() <= 7 and len(codes.unique()) <= 15
    assert lowbit.layer_bits(m)["features.0"].weight == 4


def test_niti_exports_like_any_other(digits, tmp_path):
    from lowbit.export import export_model

    m = niti_model("vgg_small")
    lowbit.fit(m, digits[0][:4], epochs=1)
    x, _ = next(iter(digits[1]))
    report = export_model(m, x[:64], tmp_path, formats=("packed",))
    assert report["numpy"]["agreement"] == 1.0
    manifest = (tmp_path / "packed" / "model.json").read_text()
    assert '"pow2int8"' in manifest


def test_niti_refuses_what_it_cannot_train():
    m = lowbit.create_model("vgg_small", in_channels=1, image_size=8, width=0.125, bias=False)  # with BN
    lowbit.quantize(m, PLAN)
    with pytest.raises(ConfigError, match="BatchNorm"):
        lowbit.fit(m, [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))])
    m = lowbit.create_model("vgg_small", in_channels=1, image_size=8, width=0.125, batch_norm=False)
    with pytest.raises(ConfigError, match="bias"):
        lowbit.quantize(m, PLAN)
    m = lowbit.create_model("vgg_small", in_channels=1, image_size=8, width=0.125, batch_norm=False, bias=False)
    with pytest.raises(ConfigError, match="plan.act"):
        lowbit.quantize(m, {**PLAN, "act": {"name": "pact", "bits": 8}})
    with pytest.raises(ConfigError, match="keep_last"):
        lowbit.fit(lowbit.quantize(m, {**PLAN, "keep_last": True}), [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))])


def test_niti_refuses_a_forward_it_would_not_replay():
    """NITI replays a model's modules in registration order: before session 23 a forward that applied F.relu
    itself, or called its modules in another order, trained another network than the model evaluates (a user's
    module: 49 % by its forward against 71 % by the integer program) without a word."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, functional: bool):
            super().__init__()
            self.functional = functional
            self.c1, self.p1 = nn.Conv2d(1, 4, 3, bias=False), nn.MaxPool2d(2)
            if not functional:
                self.r1 = nn.ReLU()  # registered after the pool it runs before
            self.flat, self.fc = nn.Flatten(), nn.Linear(36, 10, bias=False)

        def forward(self, x):
            x = self.c1(x)
            x = F.relu(x) if self.functional else self.r1(x)
            return self.fc(self.flat(self.p1(x)))

    batch = [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ConfigError, match="method niti: the model's forward computes 'relu' itself"):
        lowbit.fit(lowbit.quantize(Net(True), PLAN), batch)
    with pytest.raises(ConfigError, match="method niti: the model's forward calls 'r1' where its registration "
                                          "order has 'p1'"):
        lowbit.fit(lowbit.quantize(Net(False), PLAN), batch)


@pytest.mark.parametrize("pool", [torch.nn.MaxPool2d(2, dilation=2), torch.nn.MaxPool2d(2, ceil_mode=True)])
def test_integer_forward_pools_as_the_float_twin(pool):
    """Session 26: the integer max-pool dropped MaxPool2d's dilation (another network trained than the float twin
    evaluates: 0.106 off on the logits for ~0.005 of rounding) and ceil_mode (a matmul shape error)."""
    from torch import nn

    torch.manual_seed(0)
    x = torch.rand(2, 1, 7, 7)
    body = [nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), pool, nn.Flatten()]
    n = nn.Sequential(*body)(x).shape[1]
    m = lowbit.quantize(nn.Sequential(*body, nn.Linear(n, 10, bias=False)), PLAN)
    out = integer_forward(m, x)
    assert (m(x) - out.q.float() * 2.0**out.e).abs().max() < 0.02
    lowbit.quant_state(m).method.integer_step(m, intops.from_float(x), torch.tensor([1, 2]))  # backward runs
